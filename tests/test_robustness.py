"""The robustness study (``kldwrm robustness``, docs/protocol.md §9): outcomes, region measures,
the paired tests, the decision rule, the heat map's data, and the command end to end."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from kldwrm_ref.experiments import robustness as rb
from kldwrm_ref.experiments import tune
from kldwrm_ref.experiments.cli import robustness_main, tune_main
from kldwrm_ref.experiments.run_folder import read_metrics
from kldwrm_ref.storage import read_json

NAN = math.nan

SWEEP = dict(
    name="tiny-sweep",
    experiment=dict(
        optimizers=["kfac", "so-kld-wrm"], architectures=[[20, 16, 10]], batch=50, backend="numpy", dtype="float64",
        data=dict(source="synthetic", pool=1, n_train=400, n_test=200),
    ),
    validation=100,
    grid={"*": {"step_size": [0.003, 0.3], "damping": [0.01, 0.1]}},
    tune=dict(epochs=1, seeds=[7, 8]),
    baseline="kfac",
    threshold=0.5,
    secondary_threshold=0.3,
    fresh_seeds=[8],
)


def _row(optimizer="kfac", point="damping=0.01,step_size=0.1", seed=0, state="finished", epochs=10, accuracy=0.98, loss=0.1):
    return dict(optimizer=optimizer, point=point, seed=seed, state=state, epochs=epochs, val_accuracy=accuracy, val_loss=loss)


# ----------------------------------------------------------------------------- outcome per run
@pytest.mark.parametrize(
    "row, expected",
    [
        (_row(accuracy=0.97), True),  # exactly at the threshold
        (_row(accuracy=0.9699), False),
        (_row(accuracy=0.99, loss=math.inf), False),  # a non-finite loss is no success
        (_row(accuracy=0.99, loss=NAN), False),
        (_row(state="diverged", accuracy=NAN, loss=NAN), False),
        (_row(state="running", epochs=4), None),  # not done
        (_row(state="finished", epochs=9), None),  # finished a shorter budget: not this run
        (_row(state="missing", epochs=0), None),
    ],
)
def test_outcome_of_a_run(row, expected):
    assert rb.succeeded(row, 0.97, 10) is expected


# ------------------------------------------------------------------------- region measures
def test_region_fraction_counts_done_runs_only():
    assert rb.region_fraction(np.array([[1.0, 0.0], [1.0, NAN], [0.0, 0.0]])) == pytest.approx(2 / 5)
    assert rb.region_fraction(np.ones((3, 5))) == 1.0  # all success
    assert rb.region_fraction(np.zeros((3, 5))) == 0.0  # all failure
    assert math.isnan(rb.region_fraction(np.full((2, 2), NAN)))


def test_widths_hand_computed():
    steps = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    rates = np.array(
        [
            [1.0, 0.8, 0.4, 0.6, 0.6, 1.0],  # 0.4 breaks the run: 2 then 3 -> 3 [4, 6]
            [0.6, 1.0, 0.2, 1.0, 0.6, 0.0],  # two runs of 2: the smaller step sizes win -> 2 [1, 2]
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all failure
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all success
            [0.5, NAN, 0.5, 0.6, 0.0, 0.4],  # exactly half is not more than half; NaN (not done) is not well
        ]
    )
    assert rb.widths(rates, steps) == [(3, 4.0, 6.0), (2, 1.0, 2.0), (0, None, None), (6, 1.0, 6.0), (1, 4.0, 4.0)]


def test_region_boundary_hand_computed():
    # one cell: its four sides
    assert sorted(rb.region_boundary(np.array([[True]]))) == sorted(
        [((-0.5, -0.5), (0.5, -0.5)), ((-0.5, 0.5), (0.5, 0.5)), ((-0.5, -0.5), (-0.5, 0.5)), ((0.5, -0.5), (0.5, 0.5))]
    )
    # an L of three cells (rows are y): (0,0), (0,1), (1,0); the shared sides are not drawn
    region = np.array([[True, True], [True, False]])
    expected = [
        ((-0.5, -0.5), (0.5, -0.5)), ((0.5, -0.5), (1.5, -0.5)),  # bottom edge
        ((-0.5, -0.5), (-0.5, 0.5)), ((-0.5, 0.5), (-0.5, 1.5)),  # left edge
        ((-0.5, 1.5), (0.5, 1.5)),  # top of (1,0)
        ((0.5, 0.5), (0.5, 1.5)),  # right of (1,0), against the empty (1,1)
        ((0.5, 0.5), (1.5, 0.5)),  # top of (0,1), against the empty (1,1)
        ((1.5, -0.5), (1.5, 0.5)),  # right of (0,1)
    ]
    assert sorted(rb.region_boundary(region)) == sorted(expected)
    assert rb.region_boundary(np.zeros((2, 3), bool)) == []


# ------------------------------------------------------------------------------ comparison
# 4 grid points x 3 seeds; rows: points.  Point 0: all success for both (ties); point 1: all failure
# for both (ties); point 2: the method wins 2 seeds, ties on one; point 3: the baseline wins one,
# the method's seed 2 diverged (a failure) while the baseline's succeeded, and seed 1 is not done.
METHOD = np.array([[1, 1, 1], [0, 0, 0], [1, 1, 0], [0, NAN, 0]], dtype=float)
BASE = np.array([[1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=float)


def test_mcnemar_and_difference_hand_computed():
    c = rb.compare(METHOD, BASE, resamples=200, seed=0)
    assert c.pairs == 11  # the pair whose method run is not done is left out
    assert (c.test.b, c.test.c) == (2, 2)  # b: point 2 seeds 0-1; c: point 3 seeds 0 and 2
    assert c.test.p == 1.0  # 2 vs 2: Binomial(4, 1/2) two-sided
    assert c.difference == pytest.approx((5 - 5) / 11)
    lopsided = np.array([[1, 1, 1], [1, 1, 1], [0, 0, 1]], dtype=float)
    c = rb.compare(lopsided, np.zeros((3, 3)), resamples=200, seed=0)
    assert (c.test.b, c.test.c) == (7, 0)
    assert c.test.p == pytest.approx(2 * 0.5**7)
    assert c.difference == pytest.approx(7 / 9)
    c = rb.compare(np.ones((2, 2)), np.ones((2, 2)), resamples=50, seed=0)  # all ties: no discordant pair
    assert (c.test.b, c.test.c, c.test.p, c.difference, c.ci_low, c.ci_high) == (0, 0, 1.0, 0.0, 0.0, 0.0)


def test_outcome_matrices_from_rows():
    sweep = rb.validate_sweep(SWEEP)
    rows = [
        _row("kfac", "damping=0.01,step_size=0.003", 7, accuracy=0.6, epochs=1),
        _row("kfac", "damping=0.01,step_size=0.003", 8, state="diverged", accuracy=NAN, loss=NAN, epochs=0),
        _row("so-kld-wrm", "damping=0.1,step_size=0.3", 8, accuracy=0.4, epochs=1),
        _row("so-kld-wrm", "damping=0.1,step_size=0.3", 7, state="running", epochs=0),
    ]
    m = rb.outcome_matrices(rows, sweep, 0.5)
    # grid order: step 0.003 x damping 0.01, 0.1; step 0.3 x damping 0.01, 0.1
    np.testing.assert_array_equal(m["kfac"], [[1, 0], [NAN, NAN], [NAN, NAN], [NAN, NAN]])
    np.testing.assert_array_equal(m["so-kld-wrm"], [[NAN, NAN], [NAN, NAN], [NAN, NAN], [NAN, 0]])
    rates = rb.success_rates(m["kfac"], sweep)  # dampings x steps
    np.testing.assert_array_equal(rates, [[0.5, NAN], [NAN, NAN]])


def test_paired_bootstrap_is_paired_and_matches_the_stratified_variance():
    rng = np.random.default_rng(1)
    a = (rng.random((30, 5)) < 0.6).astype(float)
    b = (rng.random((30, 5)) < 0.5).astype(float)
    # the same draws for both: a method against itself never moves
    assert rb.paired_bootstrap(a, a, 500, 3) == (0.0, 0.0, 0.0)
    # differences constant across the seeds of every point: every resample gives the estimate
    const = np.repeat(rng.integers(0, 2, (30, 1)), 5, axis=1).astype(float)
    estimate, low, high = rb.paired_bootstrap(const, np.zeros((30, 5)), 500, 3)
    assert low == pytest.approx(estimate) and high == pytest.approx(estimate)
    # stratified resampling: var = sum_p n_p * var_p(ddof 0) / N^2; the interval ~ +-1.96 sd
    d = a - b
    sd = math.sqrt(np.sum(5 * d.var(axis=1)) / 150**2)
    estimate, low, high = rb.paired_bootstrap(a, b, 20000, 40)
    assert estimate == pytest.approx(d.mean())
    assert (high - low) / (2 * stats.norm.ppf(0.975) * sd) == pytest.approx(1.0, abs=0.06)
    assert low < estimate < high
    # reproducible from its seed
    assert rb.paired_bootstrap(a, b, 300, 40) == rb.paired_bootstrap(a, b, 300, 40)


def test_paired_bootstrap_one_point_two_seeds_exact_distribution():
    # d = [1, 0]: the resampled mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4
    estimate, low, high = rb.paired_bootstrap(np.array([[1.0, 0.0]]), np.zeros((1, 2)), 4000, 0)
    assert (estimate, low, high) == (0.5, 0.0, 1.0)


def _comparison(b, c, low, high):
    return rb.Comparison(b + c, rb.McNemar(b, c, 0.0), (low + high) / 2, low, high)


@pytest.mark.parametrize(
    "p, comparison, decision",
    [
        (0.01, _comparison(9, 1, 0.02, 0.10), "more robust"),
        (0.01, _comparison(1, 9, -0.10, -0.02), "less robust"),
        (0.06, _comparison(9, 1, 0.02, 0.10), "no difference shown"),  # not significant after Holm
        (0.01, _comparison(9, 1, -0.01, 0.10), "no difference shown"),  # the interval covers 0
        (0.01, _comparison(1, 9, 0.01, 0.10), "no difference shown"),  # direction and interval disagree
        (0.05, _comparison(9, 1, 0.02, 0.10), "no difference shown"),  # p must be below alpha
        (NAN, _comparison(0, 0, 0.0, 0.0), "no difference shown"),
    ],
)
def test_decision_rule(p, comparison, decision):
    assert rb.decide(p, comparison) == decision


def test_holm_over_a_family_of_two_sweeps_and_interim():
    def analysis(ps, done, total=10):
        return dict(done=done, total=total, comparisons={f"m{i}": rb.Comparison(10, rb.McNemar(8, 0, p), 0.5, 0.1, 0.9) for i, p in enumerate(ps)})

    study = dict(holm_families=[["s1", "s2"], ["s3"]])
    analyses = {"s1": analysis([0.01, 0.04], 10), "s2": analysis([0.02], 10), "s3": analysis([0.02], 4)}
    out = rb.holm_decisions(study, analyses)
    # Holm on (0.01, 0.04, 0.02): sorted 0.01*3, 0.02*2, 0.04*1 -> 0.03, 0.04, max(0.04, 0.04)
    assert out[("s1", "m0")] == (pytest.approx(0.03), "more robust")
    assert out[("s2", "m0")] == (pytest.approx(0.04), "more robust")
    assert out[("s1", "m1")] == (pytest.approx(0.04), "more robust")
    assert out[("s3", "m0")] == (pytest.approx(0.02), "interim")  # its own family, not complete


# ----------------------------------------------------------------------------------- plots
def test_heatmap_draws_the_rates_and_the_baseline_outline():
    sweep = rb.validate_sweep(SWEEP)
    rates = {"kfac": np.array([[1.0, 0.0], [0.5, 1.0]]), "so-kld-wrm": np.array([[NAN, 1.0], [0.0, 0.0]])}
    fig = rb.heatmap_figure(sweep, rates)
    panels = [ax for ax in fig.axes if ax.get_title() in rates]
    assert [ax.get_title() for ax in panels] == ["kfac", "so-kld-wrm"]
    expected_outline = sorted(
        [((-0.5, -0.5), (0.5, -0.5)), ((-0.5, 0.5), (0.5, 0.5)), ((-0.5, -0.5), (-0.5, 0.5)), ((0.5, -0.5), (0.5, 0.5)),  # cell (0,0)
         ((0.5, 0.5), (1.5, 0.5)), ((0.5, 1.5), (1.5, 1.5)), ((0.5, 0.5), (0.5, 1.5)), ((1.5, 0.5), (1.5, 1.5))]  # cell (1,1)
    )
    for ax in panels:
        image = ax.images[0].get_array()
        np.testing.assert_array_equal(np.ma.filled(image, NAN), rates[ax.get_title()])
        assert bool(image.mask[0, 0]) is (ax.get_title() == "so-kld-wrm")  # not done: no colour
        (outline,) = ax.collections
        assert sorted(tuple(map(tuple, segment)) for segment in outline.get_segments()) == expected_outline
        assert [t.get_text() for t in ax.texts] == [f"{v:.1f}" for v in rates[ax.get_title()].ravel() if not np.isnan(v)]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0.003", "0.3"]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["0.01", "0.1"]
    import matplotlib.pyplot as plt

    plt.close(fig)


# -------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(baseline="ea-cm"), "baseline must be one of the sweep's optimizers"),
        (dict(threshold=1.5), "threshold must be a validation accuracy in (0, 1], got 1.5"),
        (dict(threshold=97), "threshold must be a JSON float, got 97"),
        (dict(fresh_seeds=[9]), "fresh_seeds must be seeds of tune.seeds"),
        (dict(grid={"*": {"damping": [0.1]}}), "needs a step_size axis"),
        (dict(final=dict(epochs=1, seeds=[0])), "a sweep has no final or confirm stage"),
    ],
)
def test_bad_sweeps_are_refused_naming_the_field(change, message, tmp_path, capsys):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({**SWEEP, **change}))
    study = tmp_path / "study.json"
    study.write_text(json.dumps(dict(name="s", sweeps=[str(sweep)], holm_families=[["tiny-sweep"]], bootstrap=dict(resamples=10, seed=0))))
    assert _exit_status(robustness_main, ["--config", str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _exit_status(command, argv) -> int:
    """The exit status of a command that refuses its arguments through the parser (SystemExit)."""
    try:
        return command(argv)
    except SystemExit as stop:
        return int(stop.code)


# ---------------------------------------------------------------------------- end to end
def test_command_end_to_end_on_a_tiny_synthetic_grid(tmp_path):
    """An earlier protocol's grid (one seed) is reused, the other seed is trained, and the summary's
    numbers equal those recomputed here from the run folders' metrics."""
    earlier = dict({k: v for k, v in SWEEP.items() if k in ("experiment", "validation", "grid")}, name="earlier", tune=dict(epochs=1, seeds=[7]), final=dict(epochs=1, seeds=[0]))
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    assert tune_main(["--config", str(tmp_path / "earlier.json"), "--out", str(tmp_path / "runs"), "--stage", "tune", "--no-progress"]) == 0
    sweep = dict(SWEEP, reuse=[str(tmp_path / "runs" / "earlier")])
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    study = dict(name="study", sweeps=[str(tmp_path / "sweep.json")], holm_families=[["tiny-sweep"]], bootstrap=dict(resamples=500, seed=40))
    (tmp_path / "study.json").write_text(json.dumps(study))
    assert robustness_main(["--config", str(tmp_path / "study.json"), "--out", str(tmp_path / "runs"), "--stage", "run", "--no-progress"]) == 0

    root = tmp_path / "runs" / "tiny-sweep" / "tune" / "20-16-10"
    # seed 7 reused: the files are the earlier ones, byte for byte
    assert len(list((tmp_path / "runs" / "earlier" / "tune" / "20-16-10").glob("*/*/seed-7"))) == 8
    for folder in (tmp_path / "runs" / "earlier" / "tune" / "20-16-10").glob("*/*/seed-7"):
        copy = root / folder.relative_to(tmp_path / "runs" / "earlier" / "tune" / "20-16-10")
        assert (copy / "metrics.csv").read_bytes() == (folder / "metrics.csv").read_bytes()
        assert read_json(copy / "config.json") == read_json(folder / "config.json")
    # recompute the outcomes from the metrics
    outcome = {}
    for name in ("kfac", "so-kld-wrm"):
        rows = []
        for point in tune.grid_points(rb.validate_sweep(sweep), name):
            for seed in (7, 8):
                metrics = read_metrics(root / name / tune.point_label(point) / f"seed-{seed}" / "metrics.csv")
                rows.append(float(metrics["val_accuracy"][-1] >= 0.5 and np.isfinite(metrics["val_loss"][-1])))
        outcome[name] = np.array(rows).reshape(4, 2)
    b = int(np.sum((outcome["so-kld-wrm"] == 1) & (outcome["kfac"] == 0)))
    c = int(np.sum((outcome["so-kld-wrm"] == 0) & (outcome["kfac"] == 1)))
    with open(tmp_path / "runs" / "study" / "comparisons.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["optimizer"], int(row["b"]), int(row["c"]), int(row["pairs"])) == ("so-kld-wrm", b, c, 8)
    assert float(row["fraction"]) == pytest.approx(outcome["so-kld-wrm"].mean())
    assert float(row["baseline_fraction"]) == pytest.approx(outcome["kfac"].mean())
    assert float(row["difference"]) == pytest.approx(outcome["so-kld-wrm"].mean() - outcome["kfac"].mean())
    assert float(row["mcnemar_p"]) == pytest.approx(1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue)
    assert row["decision"] in rb.DECISIONS and int(row["runs_done"]) == int(row["runs"]) == 16
    text = (tmp_path / "runs" / "study" / "summary.md").read_text()
    assert "## tiny-sweep (complete)" in text and "heatmap-tiny-sweep.png" in text
    assert (tmp_path / "runs" / "study" / "heatmap-tiny-sweep.png").exists()
    # the summary stage rebuilds the same files from the folders alone
    before = (tmp_path / "runs" / "study" / "comparisons.csv").read_text()
    assert robustness_main(["--config", str(tmp_path / "study.json"), "--out", str(tmp_path / "runs")]) == 0
    assert (tmp_path / "runs" / "study" / "comparisons.csv").read_text() == before


def test_reuse_refuses_a_run_with_other_settings(tmp_path):
    sweep = rb.validate_sweep(dict(SWEEP, reuse=[str(tmp_path / "earlier")]))
    spec, run_dir, _, _ = rb.sweep_runs(sweep, tmp_path / "new")[0]
    source = tmp_path / "earlier" / run_dir.relative_to(tmp_path / "new")
    source.mkdir(parents=True)
    run = dict(spec._asdict(), architecture=list(spec.architecture))
    (source / "status.json").write_text(json.dumps(dict(state="finished", epochs_completed=1)))
    (source / "config.json").write_text(json.dumps(dict(run=dict(run, hyper=dict(run["hyper"], step_size=0.03)))))
    assert rb.reuse_runs(sweep, tmp_path / "new", log=lambda _: None) == 0
    (source / "config.json").write_text(json.dumps(dict(run=dict(run, epochs=2))))  # another budget
    assert rb.reuse_runs(sweep, tmp_path / "new", log=lambda _: None) == 0
    (source / "config.json").write_text(json.dumps(dict(run=run)))
    assert rb.reuse_runs(sweep, tmp_path / "new", log=lambda _: None) == 1
    assert (run_dir / "status.json").exists() and not list(run_dir.parent.glob("*.reuse-partial"))


def test_run_order_most_informative_first():
    sweep = rb.validate_sweep(dict(SWEEP, grid={"*": {"step_size": [0.003, 0.03, 0.3], "damping": [0.01, 0.1]}}))
    runs = rb.sweep_runs(sweep, Path("/nowhere"))
    order = [(r[3]["step_size"], r[3]["damping"], r[0].seed, r[0].optimizer) for r in runs]
    points = list(dict.fromkeys((s, d) for s, d, _, _ in order))
    # rank sum: (0.3, 0.01) 0; (0.03, 0.01) 1, (0.3, 0.1) 1 -> smaller damping first; ...
    assert points == [(0.3, 0.01), (0.03, 0.01), (0.3, 0.1), (0.003, 0.01), (0.03, 0.1), (0.003, 0.1)]
    assert order[:4] == [(0.3, 0.01, 7, "kfac"), (0.3, 0.01, 7, "so-kld-wrm"), (0.3, 0.01, 8, "kfac"), (0.3, 0.01, 8, "so-kld-wrm")]
