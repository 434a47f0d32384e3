"""The tuned comparison protocol (``kldwrm tune``): validation split, grid, selection, final stage."""

import csv
import json
import shutil

import numpy as np
import pytest
from scipy import stats

from kldwrm_ref.data import synthetic_classification
from kldwrm_ref.experiments import tune
from kldwrm_ref.experiments.cli import tune_main
from kldwrm_ref.experiments.run_folder import VALIDATION_FIELDS, metric_fields, read_metrics
from kldwrm_ref.experiments.runner import load_data, run_experiment
from kldwrm_ref.storage import read_json

PROTOCOL = dict(
    name="tiny",
    experiment=dict(
        optimizers=["kfac", "so-kld-wrm"], architectures=[[20, 16, 10]], batch=50, backend="numpy", dtype="float64",
        data=dict(source="synthetic", pool=1, n_train=400, n_test=200),
    ),
    validation=100,
    grid={"*": {"step_size": [0.003, 0.03, 0.3], "damping": [0.01, 0.1]}},
    tune=dict(epochs=2, seeds=[7, 8]),
    final=dict(epochs=2, seeds=[0, 1, 2]),
)


def test_validation_split_is_the_held_out_tail_of_the_training_set():
    data = load_data(dict(source="synthetic", pool=1, subset=None, n_train=400, n_test=200, validation=100), 20, "float64")
    X, y = synthetic_classification(600, 20, 10, seed=1234)
    np.testing.assert_array_equal(data.X_train, X[:300])
    np.testing.assert_array_equal(data.X_val, X[300:400])
    np.testing.assert_array_equal(data.y_val, y[300:400])
    np.testing.assert_array_equal(data.X_test, X[400:])
    assert load_data(dict(source="synthetic", pool=1, subset=None, n_train=400, n_test=200), 20, "float64").X_val is None


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    config = out / "protocol.json"
    config.write_text(json.dumps(PROTOCOL))
    assert tune_main(["--config", str(config), "--out", str(out / "runs"), "--no-progress"]) == 0
    return out / "runs"


def test_grid_runs_train_on_the_split_and_report_validation(protocol_run):
    root = protocol_run / "tiny"
    folders = sorted((root / "tune" / "20-16-10").glob("*/*/seed-*"))
    assert len(folders) == 2 * 6 * 2  # optimisers x grid points x tuning seeds: the same budget for each
    for folder in folders:
        metrics = read_metrics(folder / "metrics.csv")
        assert set(VALIDATION_FIELDS) <= set(metrics) and len(metrics["epoch"]) == 2
        run = read_json(folder / "config.json")["run"]
        assert run["data"]["validation"] == 100 and run["epochs"] == 2 and run["seed"] in (7, 8)
        point = dict(item.split("=") for item in folder.parent.name.split(","))
        assert float(point["step_size"]) == run["hyper"]["step_size"] and float(point["damping"]) == run["hyper"]["damping"]


def test_selection_is_the_best_mean_validation_accuracy(protocol_run):
    """Recompute the choice from the run folders' metrics, independently of tuning.csv."""
    root = protocol_run / "tiny"
    selected = read_json(root / "selected.json")["20-16-10"]
    for name in ("kfac", "so-kld-wrm"):
        scores = {}
        for point_dir in (root / "tune" / "20-16-10" / name).iterdir():
            finals = [read_metrics(seed / "metrics.csv") for seed in point_dir.glob("seed-*")]
            scores[point_dir.name] = (np.mean([m["val_accuracy"][-1] for m in finals]), -np.mean([m["val_loss"][-1] for m in finals]))
        best = max(scores, key=scores.get)
        assert tune.point_label(selected[name]["hyper"]) == best
        assert selected[name]["val_accuracy"] == pytest.approx(scores[best][0])
    with open(root / "tuning.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 24


def test_final_stage_runs_the_selected_settings_on_the_full_training_set(protocol_run):
    root = protocol_run / "tiny"
    selected = read_json(root / "selected.json")["20-16-10"]
    final = read_json(root / "final-20-16-10.json")
    assert final["seeds"] == [0, 1, 2] and final["epochs"] == 2 and "validation" not in final["data"]
    for name in ("kfac", "so-kld-wrm"):
        assert final["hyper"][name] == selected[name]["hyper"]
        for seed in (0, 1, 2):
            run_dir = protocol_run / "tiny-final-20-16-10" / "20-16-10" / name / f"seed-{seed}"
            run = read_json(run_dir / "config.json")["run"]
            assert run["hyper"] == selected[name]["hyper"] and "validation" not in run["data"]
            assert "val_accuracy" not in read_metrics(run_dir / "metrics.csv")
    assert (root / "sensitivity-20-16-10.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    final_summary = (protocol_run / "tiny-final-20-16-10" / "summary.md").read_text()
    assert "final test acc %" in final_summary and "final acc - kfac" in final_summary
    assert "best test acc" not in final_summary and "best acc -" not in final_summary  # no best-epoch-on-test column


def test_the_verdict_is_the_paired_t_test_of_the_final_accuracies(protocol_run):
    """The summary's sentence for so-kld-wrm, recomputed from the final runs' metrics.csv: mean
    paired difference in points, its 95% t interval, the paired t p (one comparison: Holm leaves
    it as it is), and the outcome the p and the sign of the mean give."""
    final = protocol_run / "tiny-final-20-16-10" / "20-16-10"
    accuracy = {name: np.array([100 * read_metrics(final / name / f"seed-{seed}" / "metrics.csv")["test_accuracy"][-1] for seed in (0, 1, 2)]) for name in ("kfac", "so-kld-wrm")}
    d = accuracy["so-kld-wrm"] - accuracy["kfac"]
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    p = stats.ttest_rel(accuracy["so-kld-wrm"], accuracy["kfac"]).pvalue if d.std() > 0 else np.nan
    outcome = ("beats" if d.mean() > 0 else "is beaten by") if p < 0.05 else "does not differ significantly from"
    p_text = "-" if np.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"
    expected = f"- so-kld-wrm {outcome} kfac: {d.mean():+.2f} points [95% CI {d.mean() - half:+.2f}, {d.mean() + half:+.2f}], Holm-adjusted paired t p = {p_text} over 3 seeds."
    assert expected in (protocol_run / "tiny" / "summary.md").read_text().splitlines()


def test_the_sensitivity_plot_draws_the_mean_validation_accuracy_per_grid_point(protocol_run, monkeypatch):
    """Read from the figure's matplotlib objects: one panel per optimiser, one line per damping,
    x the step sizes, y the mean over the tuning seeds of the final validation accuracy in %
    (read here from each run's metrics.csv), a log step-size axis and its labels."""
    cfg = tune.validate_protocol(PROTOCOL)
    root = protocol_run / "tiny"
    figures = []
    monkeypatch.setattr(tune, "write_figure", lambda path, fig: figures.append(fig))
    tune.sensitivity_plot(cfg, tune.tuning_table(cfg, root), "20-16-10", root / "unused.png")
    (fig,) = figures
    assert [ax.get_title() for ax in fig.axes] == ["kfac", "so-kld-wrm"]
    assert fig.axes[0].get_ylabel() == "validation accuracy after 2 epochs (%)"
    steps = [0.003, 0.03, 0.3]
    for ax, name in zip(fig.axes, ("kfac", "so-kld-wrm")):
        assert ax.get_xscale() == "log" and ax.get_xlabel() == "step size"
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"damping=0.01", "damping=0.1"}
        for damping in (0.01, 0.1):
            mean = []
            for step in steps:
                point = root / "tune" / "20-16-10" / name / tune.point_label(dict(step_size=step, damping=damping))
                finals = [0.0 if read_json(point / f"seed-{seed}" / "status.json")["state"] == "diverged" else 100 * read_metrics(point / f"seed-{seed}" / "metrics.csv")["val_accuracy"][-1] for seed in (7, 8)]
                mean.append(np.mean(finals))
            np.testing.assert_allclose(lines[f"damping={damping:g}"].get_xdata(), steps)
            np.testing.assert_allclose(lines[f"damping={damping:g}"].get_ydata(), mean, rtol=1e-12)


def test_rerun_skips_finished_runs(protocol_run, tmp_path):
    """Runs are idempotent: a second invocation trains nothing and rewrites the same selection."""
    before = (protocol_run / "tiny" / "selected.json").read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in (protocol_run / "tiny" / "tune").rglob("checkpoint.npz")}
    config = tmp_path / "protocol.json"
    config.write_text(json.dumps(PROTOCOL))
    assert tune_main(["--config", str(config), "--out", str(protocol_run), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (protocol_run / "tiny" / "selected.json").read_bytes() == before


def test_summary_pairs_the_tuned_final_runs_with_the_as_published_runs(protocol_run, tmp_path):
    """An untuned experiment sharing seeds 0-1 with the final stage: the summary's paired cells
    must equal the differences recomputed here from the two sets of metrics files."""
    experiment = dict(PROTOCOL["experiment"], name="published", epochs=2, seeds=[0, 1, 4])
    run_experiment(experiment, tmp_path, progress=False, log=lambda *_: None)
    config = tmp_path / "protocol.json"
    config.write_text(json.dumps({**PROTOCOL, "published": str(tmp_path / "published")}))
    assert tune_main(["--config", str(config), "--out", str(protocol_run), "--stage", "summary", "--no-progress"]) == 0
    summary = (protocol_run / "tiny" / "summary.md").read_text()

    def final_acc(root, name, seed):
        return 100 * read_metrics(root / "20-16-10" / name / f"seed-{seed}" / "metrics.csv")["test_accuracy"][-1]

    table = summary.split("| tuned optimizer |")[1].splitlines()[2:4]
    rows = {line.strip("| ").split(" | ")[0]: line.strip("| ").split(" | ")[1:] for line in table}
    for name in ("kfac", "so-kld-wrm"):
        for cell, against in zip(rows[name], (name, "kfac")):
            tuned = np.array([final_acc(protocol_run / "tiny-final-20-16-10", name, s) for s in (0, 1)])
            published = np.array([final_acc(tmp_path / "published", against, s) for s in (0, 1)])
            d = tuned - published
            half = stats.t.ppf(0.975, 1) * d.std(ddof=1) / np.sqrt(2)
            p = stats.ttest_rel(tuned, published).pvalue if d.std() > 0 else np.nan
            p_text = "-" if np.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"
            assert cell == f"{d.mean():+.2f} [{d.mean() - half:+.2f}, {d.mean() + half:+.2f}], p {p_text}, n 2", (cell, d)


def _row(name, step, damping, seed, accuracy, loss, state="finished", epochs=2):
    point = dict(step_size=step, damping=damping)
    return dict(architecture="20-16-10", optimizer=name, point=tune.point_label(point), **point, seed=seed, state=state, epochs=epochs, val_accuracy=accuracy, val_loss=loss)


def test_select_confirms_the_top_points_by_hand_made_scores():
    """Hand-made rows: the grid ranks (0.03, 0.1) first and (0.3, 0.01) second for both optimisers;
    the confirmation reverses kfac's order (onto the step-size edge), breaks so's accuracy tie by
    loss, and a diverged confirmation seed counts as accuracy 0."""
    cfg = tune.validate_protocol({**PROTOCOL, "confirm": dict(top=2, epochs=5, seeds=[9, 10])})
    rows = []
    for name in ("kfac", "so-kld-wrm"):
        for step in (0.003, 0.03, 0.3):
            for damping in (0.01, 0.1):
                accuracy = {(0.03, 0.1): 0.9, (0.3, 0.01): 0.8}.get((step, damping), 0.5)
                rows += [_row(name, step, damping, seed, accuracy, 1.0) for seed in (7, 8)]
    confirm = [
        *[_row("kfac", 0.03, 0.1, seed, 0.85, 0.3, epochs=5) for seed in (9, 10)],
        *[_row("kfac", 0.3, 0.01, seed, 0.95, 0.2, epochs=5) for seed in (9, 10)],  # reverses the grid order
        *[_row("so-kld-wrm", 0.03, 0.1, seed, 0.9, 0.3, epochs=5) for seed in (9, 10)],
        *[_row("so-kld-wrm", 0.3, 0.01, seed, 0.9, 0.2, epochs=5) for seed in (9, 10)],  # same accuracy, lower loss
    ]
    chosen = tune.select(cfg, rows, confirm)["20-16-10"]
    assert chosen["kfac"]["hyper"] == dict(step_size=0.3, damping=0.01) and chosen["kfac"]["on_grid_edge"] == ["step_size"]
    assert chosen["kfac"]["grid_choice"]["hyper"] == dict(step_size=0.03, damping=0.1) and chosen["kfac"]["epochs"] == 5
    assert chosen["kfac"]["candidates"] == [dict(step_size=0.03, damping=0.1), dict(step_size=0.3, damping=0.01)]
    assert chosen["so-kld-wrm"]["hyper"] == dict(step_size=0.3, damping=0.01) and chosen["so-kld-wrm"]["val_loss"] == pytest.approx(0.2)
    diverged = [dict(r, state="diverged", val_accuracy=np.nan, val_loss=np.nan) if (r["optimizer"], r["step_size"], r["seed"]) == ("kfac", 0.3, 10) else r for r in confirm]
    chosen = tune.select(cfg, rows, diverged)["20-16-10"]["kfac"]  # (0.3, 0.01) now scores (0.95 + 0) / 2
    assert chosen["hyper"] == dict(step_size=0.03, damping=0.1) and chosen["val_accuracy"] == pytest.approx(0.85)
    assert [c["diverged_seeds"] for c in chosen["confirmation"]] == [0, 1]
    pending = tune.select(cfg, rows, confirm[1:])["20-16-10"]["kfac"]
    assert pending["complete"] is False and pending["stage"] == "confirm" and pending["points_done"] == 1 and "hyper" not in pending
    # an included point (ranked low on the grid) is confirmed beside the top 2 and can win there
    cfg = tune.validate_protocol({**PROTOCOL, "confirm": dict(top=2, epochs=5, seeds=[9, 10], include=[dict(step_size=0.003, damping=0.01)])})
    included = [_row(name, 0.003, 0.01, seed, 0.97, 0.1, epochs=5) for name in ("kfac", "so-kld-wrm") for seed in (9, 10)]
    chosen = tune.select(cfg, rows, confirm + included)["20-16-10"]
    for name in ("kfac", "so-kld-wrm"):
        assert chosen[name]["candidates"] == [dict(step_size=0.003, damping=0.01), dict(step_size=0.03, damping=0.1), dict(step_size=0.3, damping=0.01)]
        assert chosen[name]["hyper"] == dict(step_size=0.003, damping=0.01) and chosen[name]["confirmation"][0]["grid_val_accuracy"] == pytest.approx(0.5)


def test_final_runs_of_an_earlier_selection_are_neither_reported_nor_extended(protocol_run, tmp_path):
    """Narrow kfac's grid to a point it did not select: the selection changes, and the finished
    final runs (of the old selection) must stay untouched and out of the verdict."""
    runs = tmp_path / "runs"
    shutil.copytree(protocol_run, runs)
    old = read_json(runs / "tiny" / "selected.json")["20-16-10"]["kfac"]["hyper"]
    other = next(p for p in tune.grid_points(tune.validate_protocol(PROTOCOL), "kfac") if p != old)
    config = tmp_path / "protocol.json"
    config.write_text(json.dumps({**PROTOCOL, "grid": {**PROTOCOL["grid"], "kfac": {key: [value] for key, value in other.items()}}}))
    stamps = {p: p.stat().st_mtime_ns for p in (runs / "tiny-final-20-16-10").rglob("*.csv")}
    assert tune_main(["--config", str(config), "--out", str(runs), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert read_json(runs / "tiny" / "final-20-16-10.json")["hyper"]["kfac"] == other
    summary = (runs / "tiny" / "summary.md").read_text()
    assert "holds final runs of an earlier selection (20-16-10/kfac)" in summary
    assert "significantly" not in summary and "beats" not in summary and "tuned optimizer" not in summary


@pytest.fixture(scope="module")
def confirm_run(tmp_path_factory):
    """The tiny protocol with a confirm stage: first the grid alone, then every stage."""
    out = tmp_path_factory.mktemp("confirm")
    config = out / "protocol.json"
    config.write_text(json.dumps({**PROTOCOL, "name": "tinyc", "confirm": dict(top=2, epochs=3, seeds=[9])}))
    assert tune_main(["--config", str(config), "--out", str(out / "runs"), "--stage", "tune", "--no-progress"]) == 0
    after_grid = read_json(out / "runs" / "tinyc" / "selected.json")
    assert not (out / "runs" / "tinyc" / "confirm").exists() and not (out / "runs" / "tinyc" / "final-20-16-10.json").exists()
    assert tune_main(["--config", str(config), "--out", str(out / "runs"), "--stage", "confirm", "--no-progress"]) == 0
    assert len(list((out / "runs" / "tinyc" / "confirm").rglob("metrics.csv"))) == 2 * 2  # optimisers x candidates x seeds
    assert (out / "runs" / "tinyc" / "final-20-16-10.json").exists() and not (out / "runs" / "tinyc-final-20-16-10").exists()  # no final runs yet
    assert tune_main(["--config", str(config), "--out", str(out / "runs"), "--no-progress"]) == 0
    return out / "runs", after_grid


def _mean_final_validation(point_dir):
    finals = [read_metrics(seed / "metrics.csv") for seed in sorted(point_dir.glob("seed-*"))]
    return np.mean([m["val_accuracy"][-1] for m in finals]), -np.mean([m["val_loss"][-1] for m in finals])


def test_confirm_stage_reruns_the_top_grid_points_at_its_budget_and_selects_among_them(confirm_run):
    """Recompute the candidates from the grid folders and the choice from the confirmation folders."""
    runs, after_grid = confirm_run
    root = runs / "tinyc"
    selected = read_json(root / "selected.json")["20-16-10"]
    final = read_json(root / "final-20-16-10.json")
    for name in ("kfac", "so-kld-wrm"):
        assert after_grid["20-16-10"][name]["complete"] is False and after_grid["20-16-10"][name]["points_done"] == 0  # grid alone: no selection yet
        assert "hyper" not in after_grid["20-16-10"][name]
        grid = {d.name: _mean_final_validation(d) for d in (root / "tune" / "20-16-10" / name).iterdir()}
        top = sorted(grid, key=grid.get, reverse=True)[:2]
        confirmed = {d.name: _mean_final_validation(d) for d in (root / "confirm" / "20-16-10" / name).iterdir()}
        assert sorted(confirmed) == sorted(top)  # exactly the two best grid points ran again
        for point in top:
            run = read_json(root / "confirm" / "20-16-10" / name / point / "seed-9" / "config.json")["run"]
            assert run["epochs"] == 3 and run["data"]["validation"] == 100 and run["seed"] == 9
            assert len(read_metrics(root / "confirm" / "20-16-10" / name / point / "seed-9" / "metrics.csv")["epoch"]) == 3
        best = max(confirmed, key=confirmed.get)
        assert tune.point_label(selected[name]["hyper"]) == best and final["hyper"][name] == selected[name]["hyper"]
        assert selected[name]["val_accuracy"] == pytest.approx(confirmed[best][0]) and selected[name]["epochs"] == 3
        assert tune.point_label(selected[name]["grid_choice"]["hyper"]) == top[0]
    summary = (root / "summary.md").read_text()
    assert "Confirmation" in summary and "after 3 epochs" in summary
    with open(root / "confirm.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 2 * 2


def test_a_run_that_has_not_finished_an_epoch_is_listed_as_running(tmp_path):
    """The summary stage may run while a sweep is training: a run folder with a header-only
    metrics.csv counts as running with no epochs, and its point is not selected yet."""
    cfg = tune.validate_protocol(PROTOCOL)
    spec, run_dir, _, _ = tune.tuning_runs(cfg, tmp_path)[0]
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text(json.dumps(dict(state="running", epochs_completed=0)))
    (run_dir / "metrics.csv").write_text(",".join(metric_fields(True)) + "\n")
    rows = tune.tuning_table(cfg, tmp_path)
    assert (rows[0]["state"], rows[0]["epochs"]) == ("running", 0) and np.isnan(rows[0]["val_accuracy"])
    assert tune.select(cfg, rows)["20-16-10"][spec.optimizer]["complete"] is False


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(validation=0), "validation must be"),
        (dict(grid={"sgd": {"step_size": [0.1]}}), "grid: keys must be"),
        (dict(grid={"*": {"learning_rate": [0.1]}}), "unknown hyperparameter 'learning_rate'"),
        (dict(grid={"*": {"step_size": [0.1, 0.1]}}), "distinct values"),
        (dict(grid={"*": {"damping": [-1.0]}}), "damping"),
        (dict(tune=dict(epochs=0, seeds=[1])), "tune.epochs"),
        (dict(final=dict(epochs=2, seeds=[])), "final.seeds"),
        (dict(experiment=dict(PROTOCOL["experiment"], seeds=[1])), "experiment.seeds: set by the protocol"),
        (dict(surprise=1), "unknown"),
        (dict(confirm=dict(top=0, epochs=2, seeds=[1])), "confirm.top"),
        (dict(confirm=dict(epochs=2, seeds=[1])), "confirm must be an object with exactly"),
        (dict(confirm=dict(top=2, epochs=2, seeds=[1])), "confirm.epochs must exceed tune.epochs"),
        (dict(confirm=dict(top=2, epochs=3, seeds=[1], include=[dict(step_size=0.01, damping=0.01)])), "confirm.include must be a list of grid points"),
    ],
)
def test_bad_protocols_are_refused_naming_the_field(change, message, tmp_path, capsys):
    config = tmp_path / "protocol.json"
    config.write_text(json.dumps({**PROTOCOL, **change}))
    assert tune_main(["--config", str(config), "--out", str(tmp_path), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()
