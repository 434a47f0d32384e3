"""The trust-region clips of the preconditioned direction v (docs/theory.md §6.2-§6.3).

The clip factors are Python floats computed from a few scalars (group norms, v . ghat) that each
phase reads to the host in one transfer (:func:`kldwrm_ref.arrays.host_floats`); v itself never
leaves its array namespace.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kldwrm_ref.arrays import array_namespace, host_floats
from kldwrm_ref.model.network import Network
from kldwrm_ref.optim.hyper import RMS_CLIP_GROUPS, Hyper
from kldwrm_ref.validation import check_choice


def clip_groups(net: Network, per: str) -> list[slice]:
    """The parameter groups of the RMS clip, in theta order and covering it: whole layers (all
    their tensors) or every tensor."""
    per = check_choice(per, "rms_clip_per", RMS_CLIP_GROUPS)
    tensors = [slice(t.offset, t.offset + t.size) for t in net.tensors]
    if per == "tensor":
        return tensors
    layers: dict[int, slice] = {}
    for t, sl in zip(net.tensors, tensors):
        layers[t.layer] = slice(layers[t.layer].start, sl.stop) if t.layer in layers else sl
    return list(layers.values())


def _factors_from_norms(norms: list[float], limit: float, groups: list[slice]) -> np.ndarray:
    """Per group, min(1, limit / RMS(v_t)) with RMS = |v_t| / sqrt(size) (1 for a zero group)."""
    factors = []
    for norm, sl in zip(norms, groups):
        rms = norm / math.sqrt(sl.stop - sl.start)
        factors.append(min(1.0, limit / rms) if rms > 0 else 1.0)
    return np.array(factors, dtype=np.float64)


def _squared_norms(v: Any, groups: list[slice]) -> list[Any]:
    return [v[sl] @ v[sl] for sl in groups]


def _scaled(v: Any, factors: np.ndarray, groups: list[slice]) -> Any:
    """v with group t multiplied by factors[t] (the groups cover v in order)."""
    xp = array_namespace(v)
    return xp.concat([v[sl] * float(factor) for sl, factor in zip(groups, factors)])


def rms_clip(net: Network, v: Any, limit: float, per: str = "layer") -> tuple[Any, float]:
    """Per group v_t *= min(1, limit / RMS(v_t)), RMS = |v_t| / sqrt(size); returns (v, smallest factor)."""
    groups = clip_groups(net, per)
    norms = [math.sqrt(n) for n in host_floats(array_namespace(v), *_squared_norms(v, groups))]
    factors = _factors_from_norms(norms, limit, groups)
    return _scaled(v, factors, groups), float(factors.min())


def _kl_factor(vg: float, alpha: float, kl_clip: float) -> float:
    vg = vg * alpha * alpha
    return min(1.0, math.sqrt(kl_clip / vg)) if vg > 0 else 1.0


def kl_clip_factor(v: Any, ghat: Any, alpha: float, kl_clip: float) -> float:
    """Trust region nu = min(1, sqrt(kl_clip / (alpha^2 v^T ghat))) for the preconditioned v."""
    return _kl_factor(float(v @ ghat), alpha, kl_clip)


def clip_direction(net: Network, v: Any, ghat: Any, alpha: float, hyper: Hyper) -> tuple[Any, dict]:
    """Apply the RMS clip and the kl_clip trust region to v; returns (v, info with the factors:
    "rms_clip_factors" per group, their minimum "rms_clip_factor", and "kl_clip_factor").

    clip_order="sequential": nu is computed from the RMS-clipped v; "joint" (the authors'): nu
    from the unclipped v, and both factors are applied together.  The scalars each order needs
    before scaling v are read in one transfer.
    """
    info: dict = {}
    joint = hyper.clip_order == "joint"
    groups = clip_groups(net, hyper.rms_clip_per) if hyper.rms_clip is not None else []
    wanted = _squared_norms(v, groups)
    if hyper.kl_clip is not None and joint:
        wanted.append(v @ ghat)
    read = host_floats(array_namespace(v), *wanted) if wanted else []
    if hyper.rms_clip is not None:
        info["rms_clip_factors"] = _factors_from_norms([math.sqrt(n) for n in read[: len(groups)]], hyper.rms_clip, groups)
        info["rms_clip_factor"] = float(info["rms_clip_factors"].min())
        v = _scaled(v, info["rms_clip_factors"], groups)
    if hyper.kl_clip is not None:
        info["kl_clip_factor"] = _kl_factor(read[-1], alpha, hyper.kl_clip) if joint else kl_clip_factor(v, ghat, alpha, hyper.kl_clip)
        v = v * info["kl_clip_factor"]
    return v, info
