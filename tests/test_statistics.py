"""Paired comparisons, Holm and McNemar, each against a computation that does not use scipy.stats."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, optimize

from kldwrm_ref.experiments.statistics import holm, mcnemar, paired_comparison


def t_density(x: float, df: int) -> float:
    """Student's t density written out from its definition."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def t_upper_tail(x: float, df: int) -> float:
    return integrate.quad(t_density, x, math.inf, args=(df,), epsabs=1e-13, epsrel=1e-12)[0]


def t_quantile(level: float, df: int) -> float:
    return optimize.brentq(lambda q: 1.0 - t_upper_tail(q, df) - level, 0.0, 100.0, xtol=1e-13)


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing the average of their positions."""
    out = np.empty(len(values))
    for i, v in enumerate(values):
        out[i] = np.sum(values < v) + (np.sum(values == v) + 1) / 2
    return out


def signed_rank_p(d: np.ndarray) -> float:
    """Two-sided signed-rank p by enumerating every sign pattern of the nonzero differences."""
    d = d[d != 0]
    r = ranks(np.abs(d))
    observed = r[d > 0].sum()
    totals = np.array([sum(ri for ri, s in zip(r, signs) if s) for signs in itertools.product((0, 1), repeat=len(d))])
    return min(1.0, 2 * min(np.mean(totals >= observed - 1e-9), np.mean(totals <= observed + 1e-9)))


A = np.array([0.9827, 0.9831, 0.9822, 0.9829, 0.9825])
B = np.array([0.9821, 0.9826, 0.9824, 0.9820, 0.9819])


def test_t_quantile_matches_printed_tables():
    assert t_quantile(0.975, 4) == pytest.approx(2.776, abs=5e-4)
    assert t_quantile(0.975, 9) == pytest.approx(2.262, abs=5e-4)


def test_mean_std_and_t_interval_from_first_principles():
    r = paired_comparison(A, B)
    d = A - B
    mean = sum(d) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    half = t_quantile(0.975, 4) * std / math.sqrt(5)
    assert r.n == 5 and r.mean == pytest.approx(mean, rel=1e-12) and r.std == pytest.approx(std, rel=1e-12)
    assert (r.ci_low, r.ci_high) == pytest.approx((mean - half, mean + half), rel=1e-9)
    r90 = paired_comparison(A, B, alpha=0.1)
    assert r90.ci_high - r90.mean == pytest.approx(t_quantile(0.95, 4) * std / math.sqrt(5), rel=1e-9)


def test_paired_t_p_is_the_one_sample_t_on_the_differences():
    for a, b in [(A, B), (B, A), (np.array([1.0, 2.0, 4.0]), np.array([1.5, 1.0, 2.0]))]:
        d = a - b
        t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
        assert paired_comparison(a, b).t_p == pytest.approx(2 * t_upper_tail(abs(t), len(d) - 1), rel=1e-8)


@pytest.mark.parametrize(
    "d",
    [
        [0.3, -0.1, 0.7, 0.2, 0.5, -0.4, 0.9],  # no ties: scipy's exact distribution
        [0.02, 0.02, -0.01, 0.03, 0.02, 0.0],  # ties and a zero: scipy's permutation test
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
    ],
)
def test_wilcoxon_p_equals_the_enumerated_sign_distribution(d):
    d = np.array(d)
    assert paired_comparison(d, np.zeros_like(d)).wilcoxon_p == pytest.approx(signed_rank_p(d), rel=1e-9)


def test_wilcoxon_floor_is_noted_for_few_seeds():
    r = paired_comparison([1.0, 2.0, 3.0, 4.0, 5.0], [0.0] * 5)
    assert r.wilcoxon_p == pytest.approx(2 / 2**5) and "cannot go below 0.0625" in r.note
    assert paired_comparison(np.arange(1.0, 8.0), np.zeros(7)).note == ""


def test_undefined_tests_are_nan_with_a_note():
    zero = paired_comparison([0.5, 0.7, 0.9], [0.5, 0.7, 0.9])
    assert zero.mean == 0 and zero.std == 0 and (zero.ci_low, zero.ci_high) == (0, 0)
    assert math.isnan(zero.t_p) and math.isnan(zero.wilcoxon_p)
    assert "t statistic is undefined" in zero.note and "all differences are zero" in zero.note
    equal = paired_comparison([0.9830, 0.9827, 0.9801], [0.9824, 0.9821, 0.9795])  # equal up to round-off
    assert equal.std == 0 and math.isnan(equal.t_p) and equal.wilcoxon_p == pytest.approx(signed_rank_p(np.array([1.0, 1.0, 1.0])))
    assert paired_comparison([0.9830, 0.9821], [0.9830 - 1e-14, 0.9821]).mean == 0  # below the rounding: zero
    one = paired_comparison([0.9], [0.8])
    assert one.n == 1 and one.mean == pytest.approx(0.1) and math.isnan(one.std) and math.isnan(one.t_p) and math.isnan(one.wilcoxon_p)
    assert "at least 2" in one.note


@pytest.mark.parametrize(
    "a, b, kwargs, message",
    [
        ([1.0, 2.0], [1.0], {}, "same length"),
        ([[1.0, 2.0]], [[1.0, 2.0]], {}, "1-D"),
        ([1.0, math.nan], [1.0, 2.0], {}, "a must be finite"),
        ([1.0, 2.0], [1.0, math.inf], {}, "b must be finite"),
        ([1.0, 2.0], [1.0, 3.0], dict(alpha=1.0), "alpha must lie in"),
    ],
)
def test_paired_comparison_rejects_bad_arguments(a, b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_comparison(a, b, **kwargs)


def holm_by_procedure(p: list[float]) -> list[float]:
    """Holm adjusted p by definition: the smallest level at which the step-down procedure rejects."""

    def rejected(level: float) -> set[int]:
        out: set[int] = set()
        for k, i in enumerate(sorted(range(len(p)), key=lambda i: p[i])):
            if p[i] * (len(p) - k) > level:  # p > level / (m - k), without the division's rounding
                break
            out.add(i)
        return out

    levels = sorted({pi * c for pi in p for c in range(1, len(p) + 1)})
    return [min(1.0, min(level for level in levels if i in rejected(level))) for i in range(len(p))]


def test_holm_on_a_textbook_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005, 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04)
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])


@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-12, 1.0)), min_size=1, max_size=7))  # no subnormals
def test_holm_equals_the_step_down_procedure(p):
    np.testing.assert_allclose(holm(p), holm_by_procedure(p), rtol=1e-12, atol=0)


def test_holm_leaves_nan_out_of_the_family():
    adjusted = holm([0.01, math.nan, 0.04])
    assert math.isnan(adjusted[1])
    np.testing.assert_allclose(adjusted[[0, 2]], [0.02, 0.04])
    assert holm([]).shape == (0,)
    with pytest.raises(ValueError, match="pvalues must be"):
        holm([0.5, 1.5])


def mcnemar_by_sum(b: int, c: int) -> float:
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n)


@pytest.mark.parametrize("b, c", [(3, 10), (10, 3), (0, 6), (7, 7), (40, 61), (1, 0)])
def test_mcnemar_is_the_two_sided_binomial_sum(b, c):
    rng = np.random.default_rng(b * 100 + c)
    both = rng.random(50) < 0.5
    correct_a = np.concatenate([np.ones(b, bool), np.zeros(c, bool), both])
    correct_b = np.concatenate([np.zeros(b, bool), np.ones(c, bool), both])
    order = rng.permutation(len(correct_a))
    result = mcnemar(correct_a[order], correct_b[order])
    assert (result.b, result.c) == (b, c)
    assert result.p == pytest.approx(mcnemar_by_sum(b, c), rel=1e-10)


def test_mcnemar_edge_cases_and_errors():
    same = np.array([True, False, True])
    assert mcnemar(same, same) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="correct_a must be a 1-D boolean"):
        mcnemar(np.array([1, 0]), np.array([True, False]))
    with pytest.raises(ValueError, match="same length"):
        mcnemar(np.array([True]), np.array([True, False]))


# ------------------------------------------------------------------ the summary's significance tables
SWEEP = dict(
    name="sig",
    optimizers=["kfac", "so-kld-wrm", "qe-kld-wrm"],
    architectures=[[12, 8, 10], [12, 6, 10]],
    epochs=2,
    seeds=[0, 1, 2],
    batch=40,
    dtype="float64",
    data=dict(source="synthetic", n_train=320, n_test=100),
    hyper={"*": {"period": 3}},
)


def table_row(summary: str, arch: str, name: str) -> list[str]:
    lines = summary.splitlines()
    start = lines.index(f"{arch}:")
    row = next(line for line in lines[start:] if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def independent_correctness(run_dir, arch):
    """Which test examples the checkpointed parameters classify correctly, from the network's logits."""
    from kldwrm_ref import MLP
    from kldwrm_ref.experiments.checkpoint import load_checkpoint
    from kldwrm_ref.experiments.config import validate_config
    from kldwrm_ref.experiments.runner import load_data

    data = load_data(validate_config(SWEEP)["data"], 12, "float64")
    theta = load_checkpoint(run_dir / "checkpoint.npz")[0]
    return np.argmax(MLP(arch).logits(theta, data.X_test), 1) == data.y_test


def test_significance_row_recomputed_from_the_run_files(tmp_path):
    from kldwrm_ref.experiments.runner import run_experiment
    from kldwrm_ref.storage import read_bools, read_csv

    root = run_experiment(SWEEP, tmp_path, progress=False, log=lambda *_: None)
    final = {
        (arch, name, seed): 100 * float(read_csv(root / f"{arch}/{name}/seed-{seed}/metrics.csv")[-1]["test_accuracy"])
        for arch in ("12-8-10", "12-6-10") for name in SWEEP["optimizers"] for seed in (0, 1, 2)
    }
    t_ps = {}
    for arch in ("12-8-10", "12-6-10"):
        for name in ("so-kld-wrm", "qe-kld-wrm"):
            d = np.array([final[arch, name, s] - final[arch, "kfac", s] for s in (0, 1, 2)])
            t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
            t_ps[arch, name] = 2 * t_upper_tail(abs(t), 2)
    holm_ps = dict(zip(t_ps, holm_by_procedure(list(t_ps.values()))))

    arch, name = "12-6-10", "qe-kld-wrm"
    d = np.array([final[arch, name, s] - final[arch, "kfac", s] for s in (0, 1, 2)])
    half = t_quantile(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    mcnemar_ps = []
    for seed in (0, 1, 2):
        a = independent_correctness(root / f"{arch}/{name}/seed-{seed}", [12, 6, 10])
        b = independent_correctness(root / f"{arch}/kfac/seed-{seed}", [12, 6, 10])
        np.testing.assert_array_equal(read_bools(root / f"{arch}/{name}/seed-{seed}/test_correct.npz")[0], a)
        mcnemar_ps.append(mcnemar_by_sum(int(np.sum(a & ~b)), int(np.sum(~a & b))))
    summary = (root / "summary.md").read_text()
    row = table_row(summary, arch, name)
    assert row[:3] == [name, "3", f"{d.mean():.2f} [{d.mean() - half:.2f}, {d.mean() + half:.2f}]"]
    assert float(row[3]) == pytest.approx(t_ps[arch, name], abs=5e-4)
    assert float(row[4]) == pytest.approx(signed_rank_p(d), abs=5e-4)
    assert float(row[5]) == pytest.approx(holm_ps[arch, name], abs=5e-4)
    assert row[6] == f"{sum(p < 0.05 for p in mcnemar_ps)}/3"
    assert "Holm t p (4 tests)" in summary and "signed-rank p cannot go below 0.25" in summary


def test_stale_test_correctness_is_ignored_by_the_summary_and_repaired_by_the_sweep(tmp_path):
    from kldwrm_ref.experiments.runner import run_experiment
    from kldwrm_ref.storage import read_bools, write_bools

    cfg = {**SWEEP, "optimizers": ["kfac", "so-kld-wrm"], "architectures": [[12, 8, 10]]}
    root = run_experiment(cfg, tmp_path, progress=False, log=lambda *_: None)
    path = root / "12-8-10/kfac/seed-0/test_correct.npz"
    original, meta = read_bools(path)
    assert meta == {"epoch": 2} and len(original) == 100
    write_bools(path, original, epoch=1)  # not the epoch of metrics.csv: the summary alone leaves it out of McNemar
    from kldwrm_ref.experiments.config import validate_config
    from kldwrm_ref.experiments.report import write_summary

    assert table_row(write_summary(root, validate_config(cfg)), "12-8-10", "so-kld-wrm")[6].endswith("/2")
    run_experiment(cfg, tmp_path, progress=False, log=lambda *_: None)  # the sweep rewrites it from the checkpoint
    assert read_bools(path)[1] == {"epoch": 2}
    assert table_row((root / "summary.md").read_text(), "12-8-10", "so-kld-wrm")[6].endswith("/3")
    path.unlink()  # a lost file: the next command writes it from the checkpoint
    run_experiment(cfg, tmp_path, progress=False, log=lambda *_: None)
    np.testing.assert_array_equal(read_bools(path)[0], original)
    assert table_row((root / "summary.md").read_text(), "12-8-10", "so-kld-wrm")[6].endswith("/3")


def test_bools_round_trip_bit_packed_without_pickle(tmp_path):
    from kldwrm_ref.storage import read_bools, write_bools

    values = np.random.default_rng(0).random(1003) < 0.9
    path = write_bools(tmp_path / "c.npz", values, epoch=7)
    assert read_bools(path)[1] == {"epoch": 7}
    np.testing.assert_array_equal(read_bools(path)[0], values)
    with np.load(path, allow_pickle=False) as saved:
        assert saved["bits"].dtype == np.uint8 and saved["bits"].size == 126
    with pytest.raises(ValueError, match="values must be a 1-D boolean"):
        write_bools(tmp_path / "d.npz", values.astype(int))
    with pytest.raises(ValueError, match="must not be named"):
        write_bools(tmp_path / "d.npz", values, size=3)
