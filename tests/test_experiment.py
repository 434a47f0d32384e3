"""``kldwrm mnist``: files, resume equivalence, divergence records, option errors, summary."""


import numpy as np
import pytest

from kldwrm_ref import optim
from kldwrm_ref.experiments import report
from kldwrm_ref.experiments import runner as experiment
from kldwrm_ref.experiments.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kldwrm_ref.experiments.cli import main
from kldwrm_ref.experiments.config import expand, validate_config
from kldwrm_ref.experiments.report import collect, paired_table
from kldwrm_ref.experiments.runner import run_experiment
from kldwrm_ref.storage import read_csv, read_json

TINY = dict(
    name="tiny",
    optimizers=["kfac", "qe-kld-wrm"],
    architectures=[[12, 8, 10]],
    epochs=2,
    seeds=[0, 1],
    batch=40,
    dtype="float64",
    data=dict(source="synthetic", n_train=320, n_test=100),
    hyper={"*": {"period": 3}},
)


def run_files(root, cfg):
    return [root / spec.label for spec in expand(validate_config(cfg))]


def test_tiny_end_to_end_writes_every_file(tmp_path, monkeypatch):
    root = run_experiment(TINY, tmp_path, progress=False, log=lambda *_: None)
    runs = run_files(root, TINY)
    assert len(runs) == 4
    for run_dir in runs:
        status = read_json(run_dir / "status.json")
        assert status == dict(state="finished", epochs_completed=2)
        rows = read_csv(run_dir / "metrics.csv")
        assert [int(r["epoch"]) for r in rows] == [1, 2]
        assert set(rows[0]) == set(experiment.METRIC_FIELDS)
        assert int(rows[-1]["steps"]) == 2 * (320 // 40)
        config = read_json(run_dir / "config.json")
        assert config["resolved_hyper"]["period"] == 3 and config["kldwrm_ref_version"]
        _, state, scalars = load_checkpoint(run_dir / "checkpoint.npz")
        assert scalars["epoch"] == 2 and state.step == 16 and state.inverse is None
        assert not (run_dir / "checkpoint.pkl").exists()
    summary = (root / "summary.md").read_text()
    assert "| 12-8-10 | kfac | 2/2 |" in summary and "qe-kld-wrm" in summary and "![12-8-10](12-8-10.png)" in summary
    assert (root / "12-8-10.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_plot(root, monkeypatch, tmp_path)


def check_plot(root, monkeypatch, tmp_path):
    """What the summary plot draws, read from its matplotlib objects: per optimiser, the mean over
    seeds of each run's metrics.csv (test accuracy in %, training loss) against epochs and
    against the mean training wall time; labels, axes and scales."""
    figures = []
    monkeypatch.setattr(report, "write_figure", lambda path, fig: figures.append(fig))
    assert report.plot(collect(root, validate_config(TINY)), "12-8-10", tmp_path / "plot.png", "tiny") is not None
    (fig,) = figures
    by_epoch_acc, by_time_acc, by_epoch_loss, by_time_loss = fig.axes
    for name in TINY["optimizers"]:
        rows = [read_csv(root / f"12-8-10/{name}/seed-{seed}/metrics.csv") for seed in TINY["seeds"]]
        column = lambda key, rows=rows: np.mean([[float(r[key]) for r in run] for run in rows], axis=0)  # noqa: E731
        expected = {
            by_epoch_acc: ([1, 2], 100 * column("test_accuracy")), by_time_acc: (column("wall_time"), 100 * column("test_accuracy")),
            by_epoch_loss: ([1, 2], column("train_loss")), by_time_loss: (column("wall_time"), column("train_loss")),
        }
        for ax, (x, y) in expected.items():
            (line,) = [line for line in ax.get_lines() if line.get_label() == f"{name} (n=2 seeds)"]
            np.testing.assert_allclose(line.get_xdata(), x, rtol=1e-12)
            np.testing.assert_allclose(line.get_ydata(), y, rtol=1e-12)
    for ax in (by_epoch_acc, by_time_acc):
        assert ax.get_ylabel() == "test accuracy (%)" and ax.get_ylim()[1] <= 100.0
        assert sorted(line.get_ydata()[0] for line in ax.get_lines() if line.get_label().startswith("_")) == [97.0, 98.0]  # the dotted thresholds
    for ax in (by_epoch_loss, by_time_loss):
        assert ax.get_ylabel() == "training loss (full training set)" and ax.get_yscale() == "log"
    assert [ax.get_xlabel() for ax in fig.axes] == ["epoch", "training wall time (s)"] * 2


def test_evaluation_matches_the_model(tmp_path):
    """The CSV's accuracies are those of the checkpointed theta, recomputed independently."""
    root = run_experiment({**TINY, "optimizers": ["kfac"], "seeds": [0]}, tmp_path, progress=False, log=lambda *_: None)
    run_dir = root / "12-8-10/kfac/seed-0"
    theta = load_checkpoint(run_dir / "checkpoint.npz")[0]
    data = experiment.load_data(validate_config(TINY)["data"], 12, "float64")
    from kldwrm_ref import MLP

    logits = MLP([12, 8, 10]).logits(theta, data.X_test)
    row = read_csv(run_dir / "metrics.csv")[-1]
    assert float(row["test_accuracy"]) == np.mean(np.argmax(logits, 1) == data.y_test)


def test_evaluation_in_passes_of_any_size_scores_every_row_once():
    """Trainer.evaluate in passes of 7 rows, of the default (512 on the CPU) and of all 1,100 rows
    equals an independent score of the whole split at once: the mean of -log softmax at the label
    by logsumexp, and the argmax accuracy."""
    from kldwrm_ref import MLP
    from kldwrm_ref.experiments.trainers import EVAL_ROWS_HOST, Trainer

    net = MLP([12, 8, 10])
    rng = np.random.default_rng(3)
    theta, X, y = net.init(1), rng.standard_normal((1100, 12)), rng.integers(0, 10, 1100)
    logits = net.logits(theta, X)
    shifted = logits - logits.max(axis=1, keepdims=True)
    want_loss = float(np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(1100), y]))
    want_correct = np.argmax(logits, axis=1) == y
    opt = optim.make("kfac", net, preset="paper", backend="numpy")
    assert Trainer(opt, net, 40).chunk == EVAL_ROWS_HOST == 512
    for chunk in (7, None, 1100):
        trainer = Trainer(opt, net, 40, chunk)
        trainer.start(theta, opt.init(theta), X, y)
        loss, accuracy, correct = trainer.evaluate(X, y)
        assert loss == pytest.approx(want_loss, rel=1e-12) and accuracy == np.mean(want_correct)
        np.testing.assert_array_equal(correct, want_correct)


class _Interrupt(Exception):
    pass


_REAL_MAKE = optim.make


def patch_steps(monkeypatch, before_step):
    """Make every optimiser call ``before_step(call number)`` before each of its steps."""
    calls = {"n": 0}

    def make(*args, **kwargs):
        opt = _REAL_MAKE(*args, **kwargs)

        def step(*step_args):
            calls["n"] += 1
            before_step(calls["n"])
            return opt.step(*step_args)

        return opt._replace(step=step)

    monkeypatch.setattr(optim, "make", make)


def test_resume_after_interrupt_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = {**TINY, "epochs": 3, "seeds": [0]}
    whole = run_experiment(cfg, tmp_path / "whole", progress=False, log=lambda *_: None)

    def interrupt(call):
        if call == 13:  # in the middle of epoch 2 of the first run (8 steps per epoch)
            raise _Interrupt

    patch_steps(monkeypatch, interrupt)
    with pytest.raises(_Interrupt):
        run_experiment(cfg, tmp_path / "resumed", progress=False, log=lambda *_: None)
    interrupted = tmp_path / "resumed/tiny/12-8-10/kfac/seed-0"
    assert read_json(interrupted / "status.json") == dict(state="running", epochs_completed=1)
    assert len(read_csv(interrupted / "metrics.csv")) == 1
    monkeypatch.undo()
    resumed = run_experiment(cfg, tmp_path / "resumed", progress=False, log=lambda *_: None)

    for spec in expand(validate_config(cfg)):
        a, b = whole / spec.label, resumed / spec.label
        assert read_json(b / "status.json") == dict(state="finished", epochs_completed=3)
        rows_a, rows_b = read_csv(a / "metrics.csv"), read_csv(b / "metrics.csv")
        timeless = [k for k in experiment.METRIC_FIELDS if k not in ("wall_time", "epoch_time")]
        assert [[r[k] for k in timeless] for r in rows_a] == [[r[k] for k in timeless] for r in rows_b]
        np.testing.assert_array_equal(load_checkpoint(a / "checkpoint.npz")[0], load_checkpoint(b / "checkpoint.npz")[0])


def test_finished_runs_are_skipped_and_can_be_extended(tmp_path, monkeypatch):
    cfg = {**TINY, "optimizers": ["kfac"], "seeds": [0], "epochs": 1}
    run_experiment(cfg, tmp_path, progress=False, log=lambda *_: None)

    def forbid(call):
        raise AssertionError("a finished run took a step")

    patch_steps(monkeypatch, forbid)
    run_experiment(cfg, tmp_path, progress=False, log=lambda *_: None)
    monkeypatch.undo()
    root = run_experiment({**cfg, "epochs": 2}, tmp_path, progress=False, log=lambda *_: None)
    rows = read_csv(root / "12-8-10/kfac/seed-0/metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2] and int(rows[-1]["steps"]) == 16


def test_changed_run_in_the_same_folder_is_refused(tmp_path):
    cfg = {**TINY, "optimizers": ["kfac"], "seeds": [0], "epochs": 1}
    run_experiment(cfg, tmp_path, progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="different batch"):
        run_experiment({**cfg, "batch": 20}, tmp_path, progress=False, log=lambda *_: None)


def test_a_run_that_never_finished_an_epoch_is_replaced_by_a_changed_command(tmp_path, monkeypatch):
    """A run stopped in its first epoch (status running, no epoch) holds nothing worth keeping: the
    corrected command (another batch) replaces it without asking anyone to delete it."""
    cfg = {**TINY, "optimizers": ["kfac"], "seeds": [0], "epochs": 1}

    class Stopped(Exception):
        pass

    class StopsInFirstEpoch:
        def __init__(self, *args, **kwargs):
            pass

        def start(self, *args):
            pass

        def run_epoch(self, *args):
            raise Stopped

    monkeypatch.setattr(experiment, "Trainer", StopsInFirstEpoch)
    with pytest.raises(Stopped):
        run_experiment(cfg, tmp_path, progress=False, log=lambda *_: None)
    run_dir = tmp_path / "tiny/12-8-10/kfac/seed-0"
    assert read_json(run_dir / "status.json") == dict(state="running", epochs_completed=0)
    monkeypatch.undo()
    messages = []
    run_experiment({**cfg, "batch": 20}, tmp_path, progress=False, log=messages.append)
    assert read_json(run_dir / "status.json") == dict(state="finished", epochs_completed=1)
    assert read_json(run_dir / "config.json")["run"]["batch"] == 20 and int(read_csv(run_dir / "metrics.csv")[0]["steps"]) == 320 // 20
    assert any("replacing a run of different batch that had not finished an epoch" in m for m in messages)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_is_recorded_and_the_sweep_goes_on(tmp_path):
    cfg = {**TINY, "optimizers": ["sgd", "kfac"], "seeds": [0], "hyper": {"sgd": {"step_size": 1e200}}}
    root = run_experiment(cfg, tmp_path, progress=False, log=lambda *_: None)
    status = read_json(root / "12-8-10/sgd/seed-0/status.json")
    assert status["state"] == "diverged" and status["step"] >= 1 and "not finite" in status["message"]
    assert read_json(root / "12-8-10/kfac/seed-0/status.json")["state"] == "finished"
    summary = (root / "summary.md").read_text()
    assert "diverged: seed 0 step" in summary


def test_non_finite_curvature_is_recorded_as_divergence_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """A curvature estimate with a NaN (not the gradient) ends that run as diverged, not the sweep."""
    from kldwrm_ref.curvature import estimators

    real = estimators.kfac_factors
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        factors = real(*args, **kwargs)
        if calls["n"] == 2:  # the second refresh of the first run
            factors[0].G[0, 0] = np.nan
        return factors

    monkeypatch.setattr(estimators, "kfac_factors", poisoned)
    cfg = {**TINY, "optimizers": ["kfac", "so-kld-wrm"], "seeds": [0]}
    root = run_experiment(cfg, tmp_path, progress=False, log=lambda *_: None)
    status = read_json(root / "12-8-10/kfac/seed-0/status.json")
    assert status["state"] == "diverged" and status["quantity"] == "curvature" and status["step"] == 3  # period 3
    assert read_json(root / "12-8-10/so-kld-wrm/seed-0/status.json")["state"] == "finished"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "epochs must be an integer >= 1"),
        (["--hyper", "nonsense=1"], "unknown hyperparameter"),
        (["--hyper", "rho=1.5"], "rho must be"),
        (["--architectures", "784-256-9"], "10 classes"),
        (["--architectures", "100-10"], "does not match MNIST"),
        (["--seeds", "-1"], "seeds must be"),
        (["--hyper", "novalue"], "KEY=VALUE"),
    ],
)
def test_bad_options_fail_with_clear_messages(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", "/nonexistent-never-written"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_runs_synthetic_and_prints_the_table(tmp_path, capsys):
    assert main(["--synthetic", "--architectures", "12-8-10", "--epochs", "1", "--seeds", "0", "--optimizers", "kfac", "--batch", "100", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| 12-8-10 | kfac | 1/1 | 1 |" in out


def test_paired_table_differences(tmp_path):
    """Paired differences recomputed from the CSVs by hand."""
    cfg = {**TINY, "optimizers": ["kfac", "so-kld-wrm"]}
    root = run_experiment(cfg, tmp_path, progress=False, log=lambda *_: None)
    diffs = []
    for seed in (0, 1):
        so = read_csv(root / f"12-8-10/so-kld-wrm/seed-{seed}/metrics.csv")
        kf = read_csv(root / f"12-8-10/kfac/seed-{seed}/metrics.csv")
        diffs.append(100 * (float(so[-1]["test_accuracy"]) - float(kf[-1]["test_accuracy"])))
    expected = f"{np.mean(diffs):.2f} ± {np.std(diffs, ddof=1):.2f}"
    table = paired_table(collect(root, validate_config(cfg)), "kfac")
    assert expected in table.splitlines()[-1].split("|")[5]


def test_checkpoint_round_trip_restores_every_array_and_type(tmp_path):
    """K-FAC (KFACFactors), QE (a wake of iterates, Previous) and a CNN (ConvFactors) states come back exactly."""
    from kldwrm_ref import MLP
    from kldwrm_ref.data import synthetic_classification
    from kldwrm_ref.model import paper_cnn

    X, y = synthetic_classification(40, 784, 10, seed=0)
    for net, name in ((MLP([784, 8, 10]), "qe-kld-wrm"), (paper_cnn(), "q-kld-wrm")):
        opt = optim.make(name, net, platform="kfac", preset="paper", period=2)
        theta = net.init(0)
        state = opt.init(theta)
        for _ in range(4):
            theta, state, _ = opt.step(theta, state, X, y)
        save_checkpoint(tmp_path / "c.npz", theta, state, epoch=3, wall_time=1.5)
        theta2, state2, scalars = load_checkpoint(tmp_path / "c.npz")
        assert scalars == {"epoch": 3, "wall_time": 1.5}
        np.testing.assert_array_equal(theta2, theta)
        expected, got = state._replace(inverse=None), state2
        assert type(got.ea.average[0]) is type(expected.ea.average[0]) and got.previous.alpha == expected.previous.alpha
        flat = lambda s: [np.asarray(leaf) for leaf in _leaves(s)]  # noqa: E731
        for a, b in zip(flat(expected), flat(got), strict=True):
            np.testing.assert_array_equal(a, b)
        # resuming from the loaded state continues exactly as the original
        np.testing.assert_array_equal(opt.step(theta2, state2, X, y)[0], opt.step(theta, state, X, y)[0])


def _leaves(tree):
    if tree is None:
        return []
    if isinstance(tree, tuple):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]


def test_damaged_or_foreign_checkpoints_are_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, theta=np.zeros(3))  # an npz without the tree
    with pytest.raises(CheckpointError, match="no valid tree entry"):
        load_checkpoint(path)
    path.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
    np.savez(path, __tree__=np.array('{"format": "kldwrm-checkpoint-1", "theta": {"array": "theta"}, "state": null, "scalars": {"dict": {}}}'))
    with pytest.raises(CheckpointError, match="array 'theta' is missing"):
        load_checkpoint(path)
    np.save(tmp_path / "obj.npy", np.array([object()], dtype=object), allow_pickle=True)
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:  # an npz whose array is a pickled object array
        archive.write(tmp_path / "obj.npy", "theta.npy")
        archive.writestr("__tree__.npy", (tmp_path / "obj.npy").read_bytes())
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_a_pickle_checkpoint_of_an_older_version_is_refused_unread(tmp_path):
    cfg = {**TINY, "optimizers": ["kfac"], "seeds": [0], "epochs": 1}
    run_dir = tmp_path / "tiny/12-8-10/kfac/seed-0"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pkl").write_bytes(b"\x80\x04cos\nsystem\n.")  # would run code if unpickled
    with pytest.raises(CheckpointError, match="never unpickled; delete it"):
        run_experiment(cfg, tmp_path, progress=False, log=lambda *_: None)


def test_the_paper_cnn_runs_end_to_end_from_the_command_line(tmp_path, capsys):
    """``--architectures paper-cnn``: the authors' network trains with every KLD-WRM method (synthetic data)."""
    argv = ["--synthetic", "--architectures", "paper-cnn", "--epochs", "1", "--seeds", "0", "--batch", "50", "--out", str(tmp_path), "--no-progress"]
    assert main([*argv, "--optimizers", "kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm"]) == 0
    out = capsys.readouterr().out
    for name in ("kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm"):
        assert f"| paper-cnn | {name} | 1/1 |" in out
    config = read_json(tmp_path / "quick/paper-cnn/kfac/seed-0/config.json")
    assert config["run"]["architecture"] == "paper-cnn" and config["resolved_hyper"]["bias"] == "separate"


def test_budget_table_reads_the_last_epoch_within_each_budget():
    """Accuracy at fixed epoch and wall-time budgets, recomputed by hand from the metrics."""
    from kldwrm_ref.experiments.report import budget_table, budgets

    def run(seed, accuracies, walls):
        metrics = dict(epoch=np.arange(1, 11), test_accuracy=np.array(accuracies), wall_time=np.array(walls, dtype=float))
        return dict(seed=seed, status=dict(state="finished"), metrics=metrics, correct=None)

    fast = [run(s, np.linspace(0.90, 0.98 + 0.001 * s, 10), np.arange(1, 11) * 2.0) for s in (0, 1)]
    slow = [run(s, np.linspace(0.91, 0.99, 10), np.arange(1, 11) * 6.0) for s in (0, 1)]
    groups = {("a", "kfac"): fast, ("a", "qe"): slow}
    epochs, seconds = budgets(groups, "a")
    assert epochs == [2, 5, 10] and seconds == [5.0, 10.0, 20.0]  # the fastest method trains 20 s
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in budget_table(groups, "a").splitlines()[2:]}
    at_epoch_5 = [100 * r["metrics"]["test_accuracy"][4] for r in fast]
    assert rows["kfac"][1] == f"{np.mean(at_epoch_5):.2f} ± {np.std(at_epoch_5, ddof=1):.2f}"
    assert rows["kfac"][3].startswith(f"{100 * fast[0]['metrics']['test_accuracy'][1]:.2f}")  # 5 s: epoch 2 (4 s)
    assert rows["qe"][3] == "- (0/2)"  # no epoch of the slow method fits in 5 s
    assert rows["qe"][5] == f"{100 * slow[0]['metrics']['test_accuracy'][2]:.2f} ± 0.00"  # 20 s: epoch 3 (18 s)
