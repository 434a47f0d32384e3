"""Faults: real SIGKILLs of a sweep, two sweeps on one folder, damaged run files, bad configurations.

The kill campaign (``tests/kill_campaign.py``) runs small in CI; the full campaigns
(20 kills, serial and ``--jobs 2``) are marked slow.  Damaged files are fuzzed with hypothesis:
truncation at any byte and a flipped bit anywhere.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kldwrm_ref.experiments.checkpoint import CheckpointError, load_checkpoint
from kldwrm_ref.experiments.cli import main as mnist_main
from kldwrm_ref.experiments.config import check_fields, expand, read_config, validate_config
from kldwrm_ref.experiments.lock import LOCK_NAME, LockHeld, acquire_run_lock
from kldwrm_ref.experiments.report import collect
from kldwrm_ref.experiments.run_folder import EXPORTS, RunFolderError, read_metrics, read_status, restore
from kldwrm_ref.experiments.runner import run_experiment
from kldwrm_ref.storage import WRITE_DELAY_VARIABLE, atomic_write, remove_stale_temporaries

import kill_campaign as faults

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fault tests read the process tree from /proc")

TINY = dict(
    name="tiny", optimizers=["kfac", "sgd"], architectures=[[12, 8, 10]], epochs=2, seeds=[0], batch=40, dtype="float64",
    backend="numpy", data=dict(source="synthetic", n_train=200, n_test=60), hyper={"*": {"period": 3}},
)
QUIET = dict(progress=False, log=lambda *_: None)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """A finished two-run sweep; tests copy it before damaging it."""
    out = tmp_path_factory.mktemp("sweep")
    run_experiment(TINY, out, **QUIET)
    return out


def copy_of(tree, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(tree, target)
    return target


def files_of(run_dir):
    """Each file's bytes; for test_correct.npz its content (a zip's timestamps differ between writes)."""
    from kldwrm_ref.storage import read_bools

    return {p.name: (read_bools(p)[0].tobytes(), read_bools(p)[1]) if p.name == "test_correct.npz" else p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------- kill campaign
def test_the_ci_kill_campaign_reproduces_the_uninterrupted_sweep(tmp_path):
    report = faults.run_campaign(tmp_path, kills=5, jobs=1, seed=1, epochs=4, log=lambda *_: None)
    assert report["kills_sent"] == 5 and report["restarts"] == 5
    assert report["kills_inside_a_write"] >= 1  # the write-delay hook put kills inside writes
    assert report["runs_bit_identical"] == report["runs"] == 6
    assert report["whole_epochs_lost"] == 0 and not report["differences"] and not report["leftover_files"] and not report["unreadable_files"]
    assert any(r["runs_in_flight"] for r in report["kills"])  # some kills interrupted training, not only start-up


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_the_full_kill_campaign(tmp_path, jobs):
    pytest.importorskip("joblib")
    report = faults.run_campaign(tmp_path, kills=20, jobs=jobs, seed=jobs, epochs=8, log=print)
    assert report["kills_sent"] == 20 and report["runs_bit_identical"] == report["runs"]
    assert report["whole_epochs_lost"] == 0
    if jobs == 1:
        assert report["kills_inside_a_write"] >= 3
    else:  # in parallel, kills aimed at writes land only while workers still train; killing workers is what matters here
        assert report["worker_kills"] >= 1


@given(st.integers(0, 400), st.integers(1, 30), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_each_kill_leaves_an_epoch_to_run_after_those_in_flight(remaining, kills_left, jobs, seed):
    """A kill is set after a share of the remaining progress that leaves, beyond the ``jobs - 1``
    other epochs that may be in flight when the count is reached, an epoch to land in."""
    lead = faults.kill_progress(np.random.default_rng(seed), remaining, kills_left, jobs)
    assert 0.0 <= lead <= max(remaining - jobs, 0)
    assert lead >= min(0.3 * remaining / (kills_left + 1), remaining - jobs) - 1e-12


def test_a_campaign_detects_a_sweep_that_differs(tmp_path, finished_sweep):
    """The comparison the campaign relies on is not vacuous: a changed step size shows up."""
    labels = [s.label for s in expand(validate_config(TINY))]
    other = tmp_path / "other"
    run_experiment({**TINY, "hyper": {"*": {"period": 3}, "sgd": {"step_size": 0.05}}}, other, **QUIET)
    found = faults.differences(finished_sweep / "tiny", other / "tiny", labels)
    assert any(d.startswith("12-8-10/sgd/seed-0: metrics.csv") for d in found) and any("checkpoint theta" in d for d in found)
    assert not any(d.startswith("12-8-10/kfac") for d in found)
    assert faults.differences(finished_sweep / "tiny", finished_sweep / "tiny", labels) == []


# ------------------------------------------------------------------------------- temporaries and locks
def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead, live = tmp_path / f".metrics.csv.{dead_pid()}.abc123.tmp", tmp_path / f".status.json.{os.getpid()}.xyz789.tmp"
    other = tmp_path / "notes.tmp"
    for path in (dead, live, other):
        path.write_text("x")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and other.exists()


def test_the_write_delay_hook_leaves_the_temporary_visible_until_the_rename(tmp_path, monkeypatch):
    monkeypatch.setenv(WRITE_DELAY_VARIABLE, "0.2")
    import threading

    writer = threading.Thread(target=atomic_write, args=(tmp_path / "x.json", lambda fh: fh.write(b"{}")))
    writer.start()
    time.sleep(0.1)
    seen = [p.name for p in tmp_path.iterdir()]
    writer.join()
    assert len(seen) == 1 and seen[0].startswith(f".x.json.{os.getpid()}.") and seen[0].endswith(".tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.parametrize("plot", ["summary", "any figure"])
def test_a_plot_that_fails_mid_save_leaves_the_old_png(tmp_path, finished_sweep, monkeypatch, plot):
    """The summary's and the tuning's plots go through the atomic writer: a save that dies after
    writing part of the file (a kill, a full disk) leaves the previous plot whole."""
    import matplotlib.figure
    from matplotlib import pyplot as plt

    from kldwrm_ref.experiments import report
    from kldwrm_ref.storage import write_figure

    old = b"\x89PNG\r\n\x1a\n the previous plot IEND\xaeB`\x82"
    target = tmp_path / "plot.png"
    target.write_bytes(old)

    def dies_mid_save(self, fname, *args, **kwargs):
        (fname.write if hasattr(fname, "write") else Path(fname).write_bytes)(b"\x89PNG\r\n\x1a\n half")
        raise OSError("killed mid-save")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", dies_mid_save)
    with pytest.raises(OSError, match="killed mid-save"):
        if plot == "summary":
            report.plot(collect(finished_sweep / "tiny", validate_config(TINY)), "12-8-10", target, "tiny")
        else:  # the tuning's sensitivity plot is saved by this function too
            write_figure(target, plt.figure())
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # the temporary is gone


def test_a_lock_held_by_a_live_process_is_refused_naming_it(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stat = open(f"/proc/{sleeper.pid}/stat").read().rsplit(")", 1)[1].split()[19]
        (tmp_path / LOCK_NAME).write_text(json.dumps(dict(pid=sleeper.pid, host=os.uname().nodename, start=stat)))
        with pytest.raises(LockHeld, match=f"process {sleeper.pid} on"):
            acquire_run_lock(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    with acquire_run_lock(tmp_path) as lock:  # the holder is gone: the lock is stale and taken over
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()
    assert lock.owner["pid"] == os.getpid()


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"pid": "x"}'])
def test_a_damaged_or_dead_lock_is_taken_over(tmp_path, content):
    (tmp_path / LOCK_NAME).write_text(content)
    with acquire_run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_recycled_process_id_does_not_keep_a_lock(tmp_path):
    """Our own pid with another start time: the recorded owner is gone, its pid was reused."""
    (tmp_path / LOCK_NAME).write_text(json.dumps(dict(pid=os.getpid(), host=os.uname().nodename, start="1")))
    with acquire_run_lock(tmp_path) as lock:
        assert lock.owner["start"] != "1"


def test_two_sweeps_on_one_folder_share_the_runs_and_corrupt_nothing(tmp_path, finished_sweep):
    """Two real ``kldwrm mnist`` processes on the same --out: each run is trained by exactly one of them."""
    cfg = {**TINY, "seeds": [0]}
    config_path = tmp_path / "cfg.json"
    config_path.write_text(json.dumps(cfg))
    env = dict(os.environ, **{WRITE_DELAY_VARIABLE: "0.3"}, OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # slow writes: the runs overlap
    command = [sys.executable, "-m", "kldwrm_ref.cli", "mnist", "--config", str(config_path), "--out", str(tmp_path / "out"), "--no-progress"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first_lock = tmp_path / "out/tiny/12-8-10/kfac/seed-0" / LOCK_NAME
    deadline = time.monotonic() + 60
    while not first_lock.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out_first, out_second = first.communicate(timeout=120)[0], second.communicate(timeout=120)[0]
    assert first.returncode == 0 and second.returncode == 0, out_first + out_second
    assert f"being written by process {first.pid}" in out_second  # the second skipped the first's run, saying who holds it
    trained = [line.split(":")[0] for text in (out_first, out_second) for line in text.splitlines() if ": epoch 1/" in line]
    assert sorted(trained) == sorted(s.label for s in expand(validate_config(cfg)))  # every run trained once, by one process
    labels = [s.label for s in expand(validate_config(cfg))]
    assert faults.differences(finished_sweep / "tiny", tmp_path / "out/tiny", labels) == []
    assert not list((tmp_path / "out").rglob(".*"))  # no lock or temporary left


# ------------------------------------------------------------------------------- damaged run folders
def test_a_damaged_checkpoint_restarts_that_run_and_leaves_the_others_alone(tmp_path, finished_sweep):
    root = copy_of(finished_sweep, tmp_path)
    damaged, other = root / "tiny/12-8-10/kfac/seed-0", root / "tiny/12-8-10/sgd/seed-0"
    checkpoint = damaged / "checkpoint.npz"
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0x10
    checkpoint.write_bytes(bytes(data))
    untouched = files_of(other)
    messages = []
    run_experiment(TINY, root, progress=False, log=messages.append)
    assert any("checkpoint.npz" in m and "from scratch" in m for m in messages)
    assert (damaged / "checkpoint.npz.corrupt").read_bytes() == bytes(data)  # kept for inspection
    assert files_of(other) == untouched
    (damaged / "checkpoint.npz.corrupt").unlink()
    labels = [s.label for s in expand(validate_config(TINY))]
    assert faults.differences(finished_sweep / "tiny", root / "tiny", labels) == []


@settings(max_examples=20)
@given(export=st.sampled_from(EXPORTS), where=st.floats(0, 1, exclude_max=True), kind=st.sampled_from(["truncate", "flip", "delete"]), bit=st.integers(0, 7))
def test_a_damaged_export_is_rewritten_from_the_checkpoint(finished_sweep, tmp_path_factory, export, where, kind, bit):
    root = copy_of(finished_sweep, tmp_path_factory.mktemp("damage"))
    run_dir = root / "tiny/12-8-10/kfac/seed-0"
    original = files_of(run_dir)
    path = run_dir / export
    data = bytearray(path.read_bytes())
    position = int(where * len(data))
    if kind == "truncate":
        path.write_bytes(bytes(data[:position]))
    elif kind == "flip":
        data[position] ^= 1 << bit
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    try:  # a flip in a zip's timestamp leaves test_correct.npz's content intact: nothing to repair
        intact = files_of(run_dir) == original
    except Exception:
        intact = False
    messages = []
    record = restore(run_dir, messages.append)
    assert record is not None and record.epoch == 2
    assert files_of(run_dir) == original
    assert any(export in m and "rewrote" in m for m in messages) or (intact and export == "test_correct.npz")


@settings(max_examples=25)
@given(where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7), truncate=st.booleans())
def test_a_truncated_or_bit_flipped_checkpoint_is_refused_or_unchanged(finished_sweep, tmp_path_factory, where, bit, truncate):
    """Zip CRCs catch damage to the arrays and the tree; a flip that leaves them intact (a timestamp) changes nothing."""
    source = finished_sweep / "tiny/12-8-10/kfac/seed-0/checkpoint.npz"
    data = bytearray(source.read_bytes())
    position = int(where * len(data))
    if truncate:
        data = data[:position]
    else:
        data[position] ^= 1 << bit
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.npz"
    path.write_bytes(bytes(data))
    try:
        theta, state, scalars = load_checkpoint(path)
    except CheckpointError as error:
        assert str(path) in str(error)
        return
    theta0, state0, scalars0 = load_checkpoint(source)
    assert theta.tobytes() == theta0.tobytes()
    assert [np.asarray(x).tobytes() for x in faults._leaves(state)] == [np.asarray(x).tobytes() for x in faults._leaves(state0)]
    assert json.dumps({k: str(v) for k, v in scalars.items()}) == json.dumps({k: str(v) for k, v in scalars0.items()})


def test_a_checkpoint_whose_header_names_an_unknown_compression_is_refused(tmp_path, finished_sweep):
    """A flipped bit in the first entry's compression method (bytes 10-11 of the zip's first
    central-directory header: 0, stored, becomes 1, which zipfile cannot read) is one clear line,
    not a traceback."""
    data = bytearray((finished_sweep / "tiny/12-8-10/kfac/seed-0/checkpoint.npz").read_bytes())
    central = data.index(b"PK\x01\x02")
    assert data[central + 10 : central + 12] == b"\x00\x00"
    data[central + 10] ^= 1
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path}: not a readable checkpoint"):
        load_checkpoint(path)


def test_a_checkpoint_holding_an_object_array_is_refused(tmp_path, finished_sweep):
    source = finished_sweep / "tiny/12-8-10/kfac/seed-0/checkpoint.npz"
    path = tmp_path / "checkpoint.npz"
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(path, "w") as new:
        for item in old.infolist():
            if item.filename == "theta.npy":
                buffer = __import__("io").BytesIO()
                np.save(buffer, np.array([object()], dtype=object), allow_pickle=True)
                new.writestr(item, buffer.getvalue())
            else:
                new.writestr(item, old.read(item))
    with pytest.raises(CheckpointError, match=f"{path}.*not a readable checkpoint"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------- exports without a checkpoint
GOOD_ROW = "1,5,0.5,0.8,0.6,0.55,0.79,1.0,1.0,0,0"
HEADER = "epoch,steps,train_loss,train_accuracy,batch_loss,test_loss,test_accuracy,wall_time,epoch_time,kl_clip_active,rms_clip_active"


@pytest.mark.parametrize("text, message", [
    (f"{HEADER}\n{GOOD_ROW.replace('0.55', 'nan')}\n", "test_loss is nan, not finite"),
    (f"{HEADER}\n{GOOD_ROW.replace('0.55', 'inf')}\n", "test_loss is inf, not finite"),
    (f"{HEADER}\n{GOOD_ROW.replace('0.55', 'x')}\n", "line 2: test_loss is 'x', not a number"),
    (f"{HEADER}\n{GOOD_ROW.rsplit(',', 1)[0]}\n", "line 2: rms_clip_active is None, not a number"),
    (f"{HEADER}\n{GOOD_ROW},7\n", "line 2: more cells"),
    (f"{HEADER.replace('steps', 'step')}\n{GOOD_ROW}\n", "is not"),
    (f"{HEADER}\n{GOOD_ROW.replace('1,5', '2,5', 1)}\n", "are not 1, 2, 3"),
    (f"{HEADER}\n{GOOD_ROW}", "cut off"),
    (f"{HEADER}\n{GOOD_ROW.replace('1,5', '1.5,5', 1)}\n", "epoch is '1.5', not a number"),
])
def test_a_damaged_metrics_file_is_refused_naming_file_and_line(tmp_path, text, message):
    path = tmp_path / "metrics.csv"
    path.write_text(text)
    with pytest.raises(RunFolderError, match=f"{path}.*{message}"):
        read_metrics(path)


def test_a_good_metrics_file_reads_back_its_numbers(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(f"{HEADER}\n{GOOD_ROW}\n")
    columns = read_metrics(path)
    assert columns["test_loss"].tolist() == [0.55] and columns["steps"].tolist() == [5]


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"), ("[]", "not a run status"), ('{"state": "done", "epochs_completed": 1}', "not a run status"),
    ('{"state": "finished", "epochs_completed": -1}', "not a run status"), ('{"state": "diverged", "epochs_completed": 1}', "needs step, quantity and message"),
])
def test_a_damaged_status_file_is_refused(tmp_path, text, message):
    path = tmp_path / "status.json"
    path.write_text(text)
    with pytest.raises(RunFolderError, match=f"{path}.*{message}"):
        read_status(path)


def test_damaged_published_results_are_refused_by_the_summary_and_restarted_by_the_sweep(tmp_path, finished_sweep):
    root = copy_of(finished_sweep, tmp_path)
    run_dir = root / "tiny/12-8-10/sgd/seed-0"
    (run_dir / "checkpoint.npz").unlink()  # published results: exports only
    metrics = run_dir / "metrics.csv"
    lines = metrics.read_text().splitlines()
    cells = lines[2].split(",")
    cells[5] = "nan"  # epoch 2's test loss
    metrics.write_text("\n".join(lines[:2] + [",".join(cells)]) + "\n")
    with pytest.raises(RunFolderError, match=r"metrics\.csv"):
        collect(root / "tiny", validate_config(TINY))
    messages = []
    run_experiment(TINY, root, progress=False, log=messages.append)
    assert any("metrics.csv" in m and "from scratch" in m for m in messages)
    assert (run_dir / "metrics.csv.corrupt").exists()
    for corrupt in run_dir.glob("*.corrupt"):
        corrupt.unlink()
    labels = [s.label for s in expand(validate_config(TINY))]
    assert faults.differences(finished_sweep / "tiny", root / "tiny", labels) == []


# ------------------------------------------------------------------------------- experiment configurations
def refusal(argv: list[str]) -> list[str]:
    """The stderr lines of ``kldwrm mnist ARGV``, which must exit with status 2."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        mnist_main(argv)
    assert exit_.value.code == 2
    return err.getvalue().splitlines()


@settings(max_examples=25)
@given(where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_a_damaged_experiment_config_is_refused_in_one_line_or_still_valid(tmp_path_factory, where, bit):
    """A bit flipped anywhere: the command refuses it in exactly one line, the configuration's own
    error (as reading and validating the file directly gives it), no traceback; a flip that leaves
    a valid configuration is refused only because its --out holds no experiment (--summary-only)."""
    folder = tmp_path_factory.mktemp("config")
    data = bytearray(json.dumps(TINY).encode())
    data[int(where * len(data))] ^= 1 << bit
    path = folder / "cfg.json"
    path.write_bytes(bytes(data))
    try:
        cfg = validate_config(check_fields(read_config(path)))
        expected = f"--summary-only: {folder / 'out' / cfg['name']} holds no experiment"
    except ValueError as error:
        expected = " ".join(str(error).split())
    lines = refusal(["--config", str(path), "--out", str(folder / "out"), "--summary-only"])
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert lines[0].startswith(f"kldwrm mnist: error: {expected}"), (lines[0], expected)
    assert not (folder / "out").exists()


@pytest.mark.parametrize("text, message", [
    ("{", "not a readable JSON configuration"), ("[1]", "must hold a JSON object"), ('{"epochs": "5"}', "epochs must be a JSON int"),
    ('{"data": 3}', "data must be a JSON dict"), ('{"hyper": {"*": 1}}', "hyper must map"), ('{"seeds": [0, -1]}', "seeds must be"),
    ('{"seeds": [2, 2]}', "seeds must be distinct"), ('{"name": "../up"}', "name must be a plain folder name"),
])
def test_a_bad_experiment_config_is_refused_with_exit_status_2(tmp_path, text, message):
    path = tmp_path / "cfg.json"
    path.write_text(text)
    lines = refusal(["--config", str(path), "--out", str(tmp_path / "out")])
    assert len(lines) == 1 and lines[0].startswith("kldwrm mnist: error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists() and not (tmp_path / "up").exists()
