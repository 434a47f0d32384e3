"""Significance of paired comparisons between optimisers (the summary of ``kldwrm mnist``).

- :func:`paired_comparison`: per-seed metrics of a method and the baseline, paired by seed: mean
  difference, its t confidence interval, the paired t-test and the Wilcoxon signed-rank test;
- :func:`holm`: Holm-Bonferroni adjusted p-values over a family of comparisons;
- :func:`mcnemar`: the exact McNemar test on the per-example correctness of two classifiers on
  the same test set.

Where a test is undefined (too few pairs, all differences zero) its p-value is NaN and ``note``
says why.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats

from kldwrm_ref.validation import check_finite


class PairedComparison(NamedTuple):
    """Differences a - b over n pairs; p-values are two-sided."""

    n: int
    mean: float  # mean difference
    std: float  # sample standard deviation of the differences (ddof=1)
    ci_low: float  # the (1 - alpha) t confidence interval of the mean difference
    ci_high: float
    t_p: float  # paired t-test
    wilcoxon_p: float  # Wilcoxon signed-rank test (zero differences dropped)
    note: str  # why a value is NaN, or a caveat; "" if none


class McNemar(NamedTuple):
    """Discordant counts b (only a correct) and c (only b correct) and the exact two-sided p."""

    b: int
    c: int
    p: float


def _paired_arrays(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be 1-D of the same length (one value per seed), got shapes {a.shape} and {b.shape}")
    check_finite("a", a)
    check_finite("b", b)
    return a, b


def paired_comparison(a, b, alpha: float = 0.05) -> PairedComparison:
    """Compare ``a[i]`` with ``b[i]`` (the same seed i) by their differences ``a - b``.

    Differences are rounded to 12 significant digits of the data's scale, so that differences
    equal up to round-off (0.9830 - 0.9824 and 0.9827 - 0.9821) are equal: tied, or zero.
    """
    a, b = _paired_arrays(a, b)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    n, notes = len(a), []
    scale = max(float(np.abs(a).max()), float(np.abs(b).max())) if n else 0.0
    d = np.round((a - b) / scale, 12) * scale if scale > 0 else a - b
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        notes.append(f"{n} pair(s): the t interval and both tests need at least 2")
        return PairedComparison(n, mean, math.nan, math.nan, math.nan, math.nan, math.nan, "; ".join(notes))
    std = float(d.std(ddof=1))
    half = float(stats.t.ppf(1.0 - alpha / 2.0, n - 1)) * std / math.sqrt(n)
    if std == 0.0:
        t_p = math.nan
        notes.append("all differences are equal: the t statistic is undefined")
    else:
        t_p = float(stats.ttest_rel(a, b).pvalue)
    nonzero = int(np.count_nonzero(d))
    if nonzero == 0:
        wilcoxon_p = math.nan
        notes.append("all differences are zero: the signed-rank test is undefined")
    else:
        wilcoxon_p = float(stats.wilcoxon(d).pvalue)
        floor = min(1.0, 2.0 / 2.0**nonzero)
        if floor > alpha:
            notes.append(f"with {nonzero} nonzero differences the signed-rank p cannot go below {floor:.3g}")
    return PairedComparison(n, mean, std, mean - half, mean + half, t_p, wilcoxon_p, "; ".join(notes))


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order; NaNs stay NaN and are not counted."""
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1 or np.any((p < 0) | (p > 1)):
        raise ValueError(f"pvalues must be a 1-D sequence of numbers in [0, 1] (or NaN), got {pvalues!r}")
    adjusted = np.full(p.shape, math.nan)
    finite = np.flatnonzero(~np.isnan(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    # the i-th smallest (from 0) is scaled by m - i; the running maximum keeps the adjusted values monotone
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    return adjusted


def mcnemar(correct_a, correct_b) -> McNemar:
    """Exact McNemar test of two classifiers' per-example correctness on the same examples.

    Under the null hypothesis each discordant example is equally likely to favour either, so the
    smaller discordant count is tested as Binomial(b + c, 1/2); with no discordant example p = 1.
    """
    a, b_ = np.asarray(correct_a), np.asarray(correct_b)
    for name, x in (("correct_a", a), ("correct_b", b_)):
        if x.ndim != 1 or x.dtype != bool:
            raise ValueError(f"{name} must be a 1-D boolean array (one entry per test example), got dtype {x.dtype} and shape {x.shape}")
    if a.shape != b_.shape:
        raise ValueError(f"correct_a and correct_b must have the same length, got {len(a)} and {len(b_)}")
    b, c = int(np.count_nonzero(a & ~b_)), int(np.count_nonzero(~a & b_))
    p = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)
    return McNemar(b, c, p)
