"""The trust-region clips (docs/theory.md §6.2-§6.3) against a re-derivation in Python floats, on
NumPy in both precisions and on array-api-strict (the factors are computed where v lives)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kldwrm_ref.arrays import array_namespace, to_numpy
from kldwrm_ref.model import MLP
from kldwrm_ref.optim import clip_direction, kl_clip_factor, rms_clip
from kldwrm_ref.optim.clipping import clip_groups
from kldwrm_ref.optim.hyper import Hyper

xps = pytest.importorskip("array_api_strict")
NET = MLP([3, 4, 2])  # tensors: W1 (12), b1 (4), W2 (8), b2 (2)
TOL = {np.float32: 2e-6, np.float64: 1e-13}


def direction(dtype) -> np.ndarray:
    """v with a group far above the limit, one below it, and an all-zero bias."""
    rng = np.random.default_rng(3)
    v = rng.standard_normal(NET.n_params)
    v[:12] *= 10.0
    v[16:24] *= 1e-3
    v[24:26] = 0.0
    return v.astype(dtype)


def rms_factors_by_hand(v: np.ndarray, limit: float, per: str) -> list[float]:
    factors = []
    for sl in clip_groups(NET, per):
        rms = math.sqrt(sum(float(x) ** 2 for x in v[sl])) / math.sqrt(sl.stop - sl.start)
        factors.append(min(1.0, limit / rms) if rms > 0 else 1.0)
    return factors


def kl_factor_by_hand(v: np.ndarray, ghat: np.ndarray, alpha: float, kl_clip: float) -> float:
    q = sum(float(a) * float(b) for a, b in zip(v, ghat)) * alpha**2
    return min(1.0, math.sqrt(kl_clip / q)) if q > 0 else 1.0


def namespaces(v: np.ndarray):
    yield v
    yield xps.asarray(v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("per", ["tensor", "layer"])
def test_rms_clip_scales_each_group_to_the_limit(dtype, per):
    v = direction(dtype)
    want = rms_factors_by_hand(v, 0.5, per)
    assert min(want) < 0.1 and max(want) == 1.0  # the clip acts on some groups, not on others
    for v_ns in namespaces(v):
        clipped, smallest = rms_clip(NET, v_ns, 0.5, per)
        assert array_namespace(clipped) is array_namespace(v_ns) and clipped.dtype == v_ns.dtype
        assert smallest == pytest.approx(min(want), rel=TOL[dtype])
        expected = np.concatenate([v[sl] * f for sl, f in zip(clip_groups(NET, per), want)])
        np.testing.assert_allclose(to_numpy(clipped), expected, rtol=TOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kl_clip_factor_bounds_the_quadratic_model(dtype):
    v = direction(dtype)
    for ghat, acts in [(v, True), (-v, False), (np.zeros_like(v), False)]:  # v^T ghat > 0, < 0, = 0
        want = kl_factor_by_hand(v, ghat, 0.3, 1e-3)
        assert (want < 1.0) == acts
        for v_ns, g_ns in zip(namespaces(v), namespaces(ghat)):
            assert kl_clip_factor(v_ns, g_ns, 0.3, 1e-3) == pytest.approx(want, rel=TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["sequential", "joint"])
def test_clip_direction_composes_the_clips_in_its_order(dtype, order):
    """Joint (the authors'): nu from the unclipped v; sequential: nu from the RMS-clipped v.  Both
    factors are then applied; info reports them as host floats."""
    v = direction(dtype)
    ghat = (v * 0.5 + 0.1).astype(dtype)
    hyper = Hyper(kl_clip=1e-3, rms_clip=0.5, rms_clip_per="tensor", clip_order=order)
    rms = rms_factors_by_hand(v, 0.5, "tensor")
    after_rms = np.concatenate([v[sl] * f for sl, f in zip(clip_groups(NET, "tensor"), rms)])
    nu = kl_factor_by_hand(v if order == "joint" else after_rms, ghat, 0.3, 1e-3)
    results = []
    for v_ns, g_ns in zip(namespaces(v), namespaces(ghat)):
        clipped, info = clip_direction(NET, v_ns, g_ns, 0.3, hyper)
        assert isinstance(info["kl_clip_factor"], float) and isinstance(info["rms_clip_factor"], float)
        assert info["kl_clip_factor"] == pytest.approx(nu, rel=TOL[dtype])
        np.testing.assert_allclose(info["rms_clip_factors"], rms, rtol=TOL[dtype])
        np.testing.assert_allclose(to_numpy(clipped), after_rms * nu, rtol=4 * TOL[dtype], atol=0)
        results.append(to_numpy(clipped))
    np.testing.assert_array_equal(results[0], results[1])  # the same arithmetic in both namespaces
