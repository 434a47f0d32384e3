"""The trust-region clips of the preconditioned direction v (docs/theory.md §6.2-§6.3).

The clip factors are computed where v lives, in float64 from a few scalars (group norms,
v . ghat), and v is scaled by them there: no phase of a step waits for a host read (on a GPU each
is a synchronisation).  :func:`clip_factors` returns the factors as arrays for the step to read
with its other scalars; :func:`clip_direction`, :func:`rms_clip` and :func:`kl_clip_factor` read
them at once.  The factors are rounded to v's dtype only when they scale it, as a Python float
would be, so the results equal a host computation bit for bit.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from kldwrm_ref.arrays import array_namespace, from_numpy, to_numpy
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


def _bounded(xp: Any, limit: float, value: Any) -> Any:
    """min(1, limit / value) where value > 0, else 1 (float64 arrays, elementwise), computed as
    limit / value where value > limit (no division that could overflow) and 1 elsewhere: the same
    numbers, since limit / value >= 1 exactly when 0 < value <= limit."""
    one = xp.ones((), dtype=xp.float64)  # made on the device: a host value would be a copy, a synchronisation
    above = value > limit
    return xp.where(above, limit / xp.where(above, value, one), one)


def _rms_factors(v: Any, limit: float, groups: list[slice]) -> Any:
    """Per group, min(1, limit / RMS(v_t)) with RMS = |v_t| / sqrt(size) (1 for a zero group), float64:
    one dot product per group, then every group at once (:func:`_root_sizes`)."""
    xp = array_namespace(v)
    squares = xp.astype(xp.stack([v[sl] @ v[sl] for sl in groups]), xp.float64)
    return _bounded(xp, limit, xp.sqrt(squares) / _root_sizes(xp, tuple(sl.stop - sl.start for sl in groups)))


def _kl_factor(vg: Any, alpha: float, kl_clip: float) -> Any:
    """nu = min(1, sqrt(kl_clip / (alpha^2 v^T ghat))), 1 where v^T ghat <= 0, from the 0-d v^T ghat."""
    xp = array_namespace(vg)
    quadratic = xp.astype(vg, xp.float64) * alpha * alpha
    return xp.sqrt(_bounded(xp, kl_clip, quadratic))


def _scaled(v: Any, factors: Any, groups: list[slice]) -> Any:
    """v with group t multiplied by factors[t] (the groups cover v in order)."""
    xp = array_namespace(v)
    factors = xp.astype(factors, v.dtype)
    return xp.concat([v[sl] * factors[t] for t, sl in enumerate(groups)])


@functools.lru_cache(maxsize=64)
def _root_sizes(xp: Any, sizes: tuple[int, ...]) -> Any:
    """sqrt of each group's size as a float64 array of ``xp``, made once per layout (one upload on
    a GPU, not one per step), so that every group's RMS is one division, not one per group; the
    same numbers as dividing group by group by the Python float sqrt(size), bit for bit."""
    return from_numpy(xp, np.sqrt(np.array(sizes, dtype=np.float64)))


def rms_clip_factors(net: Network, v: Any, limit: float, per: str = "layer") -> tuple[Any, Any]:
    """(v with group t scaled by min(1, limit / RMS(v_t)), the factors as a float64 array)."""
    groups = clip_groups(net, per)
    factors = _rms_factors(v, limit, groups)
    return _scaled(v, factors, groups), factors


def rms_clip(net: Network, v: Any, limit: float, per: str = "layer") -> tuple[Any, float]:
    """Per group v_t *= min(1, limit / RMS(v_t)), RMS = |v_t| / sqrt(size); returns (v, smallest factor)."""
    v, factors = rms_clip_factors(net, v, limit, per)
    return v, float(np.min(to_numpy(factors)))


def kl_clip_factor(v: Any, ghat: Any, alpha: float, kl_clip: float) -> float:
    """Trust region nu = min(1, sqrt(kl_clip / (alpha^2 v^T ghat))) for the preconditioned v."""
    return float(to_numpy(_kl_factor(v @ ghat, alpha, kl_clip)))


def clip_factors(net: Network, v: Any, ghat: Any, alpha: float, hyper: Hyper) -> tuple[Any, dict[str, Any]]:
    """Apply the RMS clip and the kl_clip trust region to v without a host read; returns (v, the
    factors as float64 arrays: "rms_clip_factors" per group and the 0-d "kl_clip_factor", for the
    clips that are set).

    clip_order="sequential": nu is computed from the RMS-clipped v; "joint" (the authors'): nu
    from the unclipped v, and both factors are applied together.
    """
    factors: dict[str, Any] = {}
    joint = hyper.clip_order == "joint"
    vg = v @ ghat if hyper.kl_clip is not None and joint else None
    if hyper.rms_clip is not None:
        v, factors["rms_clip_factors"] = rms_clip_factors(net, v, hyper.rms_clip, hyper.rms_clip_per)
    if hyper.kl_clip is not None:
        factors["kl_clip_factor"] = _kl_factor(vg if joint else v @ ghat, alpha, hyper.kl_clip)
        v = v * array_namespace(v).astype(factors["kl_clip_factor"], v.dtype)
    return v, factors


def clip_info(factors: dict[str, Any]) -> dict:
    """The step's ``info`` entries of the factors read to the host: "rms_clip_factors" (a float64
    array), their minimum "rms_clip_factor", and "kl_clip_factor"."""
    info: dict = {}
    if "rms_clip_factors" in factors:
        info["rms_clip_factors"] = np.asarray(to_numpy(factors["rms_clip_factors"]), dtype=np.float64)
        info["rms_clip_factor"] = float(info["rms_clip_factors"].min())
    if "kl_clip_factor" in factors:
        info["kl_clip_factor"] = float(to_numpy(factors["kl_clip_factor"]))
    return info


def clip_direction(net: Network, v: Any, ghat: Any, alpha: float, hyper: Hyper) -> tuple[Any, dict]:
    """:func:`clip_factors` with the factors read to the host (:func:`clip_info`)."""
    v, factors = clip_factors(net, v, ghat, alpha, hyper)
    return v, clip_info(factors)
