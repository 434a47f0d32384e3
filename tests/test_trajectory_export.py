"""``kldwrm trajectory export``: where it writes (a new, empty or trajectory directory, replaced
whole), how large the export is (said before the run, refused above --max-size, compressed step
files), what it records (--only / --skip), and the manifest's split of the hyperparameters into
those the method uses and those it ignores (checked by changing each one)."""

import zipfile

import numpy as np
import pytest

from kldwrm_ref import MLP, optim
from kldwrm_ref.cli import main as kldwrm
from kldwrm_ref.data import synthetic_classification
from kldwrm_ref.optim.hyper import FIELDS
from kldwrm_ref.trajectory import cli as trajectory_cli
from kldwrm_ref.trajectory import load, record

BASE = ["trajectory", "export", "--optimizer", "q-kld-wrm", "--architecture", "20-8-10", "--preset", "paper", "--batch", "16", "--synthetic", "--hyper", "period=2"]


def export(out, steps, *extra):
    return kldwrm([*BASE, "--steps", str(steps), *extra, "--out", str(out)])


def test_an_unwritable_out_is_one_line_before_the_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export("/proc/x", 2)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err == "kldwrm trajectory export: error: --out '/proc/x': cannot write in '/proc' (No such file or directory)\n"


def test_a_failed_write_after_the_run_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    def refuse(trajectory, directory):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(trajectory_cli, "save", refuse)
    with pytest.raises(SystemExit) as exit_:
        export(tmp_path / "t", 2)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err == f"kldwrm trajectory export: error: --out {str(tmp_path / 't')!r}: writing the trajectory failed (Permission denied)\n"


def test_an_export_replaces_an_older_trajectory_whole(tmp_path):
    out = tmp_path / "t"
    assert export(out, 4) == 0
    assert export(out, 2, "--seed", "1") == 0
    assert sorted(path.name for path in out.iterdir()) == ["manifest.json", "step-00000.npz", "step-00001.npz"]
    assert load(out).manifest["steps"] == 2 and load(out).manifest["data"]["seed"] == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["t"]  # no staging or old directory left beside it
    (tmp_path / "empty").mkdir()
    assert export(tmp_path / "empty", 1) == 0 and load(tmp_path / "empty").manifest["steps"] == 1


def test_a_directory_with_other_files_is_refused_untouched(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        export(tmp_path, 2)
    assert exit_.value.code == 2 and "holds files that are not part of a trajectory (notes.txt); choose a new or empty directory" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_the_expected_size_is_printed_first_and_close_to_the_written_size(tmp_path, capsys):
    assert export(tmp_path / "t", 6, "--hyper", "rms_clip=0.05") == 0
    first, last = capsys.readouterr().out.splitlines()
    expected = float(first.split("about ")[1].split(" MB")[0])
    written = sum(path.stat().st_size for path in (tmp_path / "t").glob("step-*.npz")) / 1e6
    assert first.startswith("expected size: about") and written == pytest.approx(expected, rel=0.1)
    total = sum(path.stat().st_size for path in (tmp_path / "t").iterdir()) / 1e6  # with the manifest
    assert last.endswith(f", {total:.3g} MB in {tmp_path / 't'}")


def test_an_export_above_max_size_is_refused_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export(tmp_path / "t", 6, "--max-size", "0.01")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "above --max-size 0.01 MB; record fewer --steps, fewer quantities (--only / --skip), or raise --max-size" in err
    assert not (tmp_path / "t").exists()


def test_step_files_are_compressed_npz(tmp_path):
    assert export(tmp_path / "t", 1) == 0
    with zipfile.ZipFile(tmp_path / "t" / "step-00000.npz") as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_DEFLATED}
        assert "theta.npy" in archive.namelist()


def test_only_and_skip_choose_the_recorded_quantities(tmp_path, capsys):
    assert export(tmp_path / "a", 2, "--only", "X", "y", "ghat") == 0
    trajectory = load(tmp_path / "a")
    assert [set(step) for step in trajectory.steps] == [{"X", "y", "theta", "loss", "g", "ghat", "s"}] * 2
    assert trajectory.manifest["recorded"] == ["X", "y", "theta", "loss", "g", "ghat", "s"]
    assert export(tmp_path / "b", 2, "--skip", "X", "current", "averaged") == 0
    assert not any(key.split(".")[0] in ("X", "current", "averaged") for step in load(tmp_path / "b").steps for key in step)
    for extra, message in [(["--skip", "theta"], "theta cannot be skipped: every trajectory holds theta, loss, g, s"), (["--only", "kl_clip"], "unknown quantity 'kl_clip' (did you mean 'kl_clip_factor'?)")]:
        with pytest.raises(SystemExit) as exit_:
            export(tmp_path / "c", 2, *extra)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------- used / ignored hyperparameters
# two other values of every hyperparameter (one of them differs from the current one)
ALTERNATIVES = dict(
    step_size=(0.03, 0.02), rho=(0.7, 0.6), damping=(0.02, 0.03), weight_decay=(0.01, 0.02), period=(3, 1), fisher_type=("exact", "empirical"),
    samples=(3, 1), seed=(5, 6), bias=("joint", "separate"), damping_style=("factored", "eigen"), kron_sum=("exact", "factored"), eig_floor=(0.5, 0.4),
    kl_clip=(1e-4, 2e-4), rms_clip=(0.02, 0.03), rms_clip_per=("layer", "tensor"), clip_order=("sequential", "joint"), stale_current=("last", "average"),
    correction=("exact", "authors"), m=(4, 1), kl=("forward", "symmetric"), kappa=(0.5, 0.25), proximal=(True, False), inner=("preconditioned", "sgd"),
    inner_steps=(3, 1), inner_step_factor=(0.3, 0.2), inner_momentum=(0.9, 0.8), inner_after_full_wake=(False, True),
)
# every part active: stale steps between refreshes, both clips, Monte-Carlo labels, QE's inner solve with momentum
ACTIVE = dict(period=2, step_size=0.05, rms_clip=0.1, kl_clip=1e-3)
SETTINGS = [
    ("kfac", "paper", ACTIVE),
    ("so-kld-wrm", "theory", dict(ACTIVE, fisher_type="mc", samples=2, damping_style="factored")),
    ("q-kld-wrm", "paper", ACTIVE),
    ("q-kld-wrm", "theory", dict(ACTIVE, kron_sum="exact")),
    ("qe-kld-wrm", "paper", dict(ACTIVE, inner_steps=2, m=2)),
    ("qe-kld-wrm", "theory", dict(ACTIVE, kron_sum="exact", inner_steps=2, m=2, fisher_type="mc", samples=2)),
]


def _thetas(name, preset, settings, X, y):
    net = MLP([6, 5, 4], "tanh")
    trajectory = record(optim.make(name, net, platform="kfac", preset=preset, backend="numpy", **settings), net.init(1), [(X[16 * k : 16 * k + 16], y[16 * k : 16 * k + 16]) for k in range(4)])
    return trajectory.manifest, np.stack([step["s"] for step in trajectory.steps])


@pytest.mark.parametrize("name, preset, settings", SETTINGS)
def test_the_manifest_lists_as_ignored_exactly_the_hyperparameters_without_effect(name, preset, settings):
    """Change every hyperparameter in turn: the steps stay bitwise the same exactly for those the
    manifest lists as ignored."""
    X, y = synthetic_classification(64, 6, 4, seed=3)
    manifest, steps = _thetas(name, preset, settings, X, y)
    ignored = set(manifest["hyper_ignored"])
    assert set(ALTERNATIVES) == set(FIELDS) - {"momentum"}  # every hyperparameter but SGD's momentum (refused by the others) is changed
    assert ignored | (set(manifest["hyper"]) & set(FIELDS)) == set(FIELDS) and "momentum" in ignored
    wrong = []
    for field, (first, second) in ALTERNATIVES.items():
        current = manifest["hyper"].get(field, manifest["hyper_ignored"].get(field))
        changed = dict(settings, **{field: first if first != current else second})
        _, other = _thetas(name, preset, changed, X, y)
        if np.array_equal(other, steps) != (field in ignored):
            wrong.append(f"{field}: {current!r} -> {changed[field]!r} {'changed' if field in ignored else 'did not change'} the steps")
    assert wrong == []


@pytest.mark.parametrize("name", ["kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm"])
def test_what_each_method_records_under_the_paper_preset(name):
    """The table of docs/trajectory-format.md, "What each method records", under preset paper."""
    X, y = synthetic_classification(64, 6, 4, seed=3)
    net = MLP([6, 5, 4], "tanh")
    trajectory = record(optim.make(name, net, platform="kfac", preset="paper", backend="numpy", period=2), net.init(1), [(X[16 * k : 16 * k + 16], y[16 * k : 16 * k + 16]) for k in range(4)])
    always = {"X", "y", "theta", "alpha", "loss", "g", "refreshed", "damping", "ghat", "d", "v_unclipped", "kl_clip_factor", "v", "s"}
    for k, step in enumerate(trajectory.steps):
        families = {key.split(".")[0] for key in step}
        expected = always | ({"current", "averaged"} if k % 2 == 0 else set())
        expected |= {"rms_clip_factors"} if name in ("q-kld-wrm", "qe-kld-wrm") else set()
        expected |= {"s_q", "inner_steps"} if name == "qe-kld-wrm" and k >= 2 else set()  # once the wake holds m = 3 iterates
        assert families == expected, k
        if name == "kfac":
            np.testing.assert_array_equal(step["ghat"], step["g"])
