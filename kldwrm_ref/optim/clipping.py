"""The trust-region clips of the preconditioned direction v (docs/theory.md §6.2-§6.3)."""

from __future__ import annotations

import numpy as np

from kldwrm_ref.model.network import Network
from kldwrm_ref.optim.hyper import RMS_CLIP_GROUPS, Hyper
from kldwrm_ref.validation import check_choice


def clip_groups(net: Network, per: str) -> list[slice]:
    """The parameter groups of the RMS clip: whole layers (all their tensors) or every tensor."""
    per = check_choice(per, "rms_clip_per", RMS_CLIP_GROUPS)
    tensors = [slice(t.offset, t.offset + t.size) for t in net.tensors]
    if per == "tensor":
        return tensors
    layers: dict[int, slice] = {}
    for t, sl in zip(net.tensors, tensors):
        layers[t.layer] = slice(layers[t.layer].start, sl.stop) if t.layer in layers else sl
    return list(layers.values())


def _group_factors(v: np.ndarray, limit: float, groups: list[slice]) -> np.ndarray:
    """Per group, min(1, limit / RMS(v_t)) with RMS = |v_t| / sqrt(size) (1 for a zero group)."""
    factors = []
    for sl in groups:
        rms = np.linalg.norm(v[sl]) / np.sqrt(v[sl].size)
        factors.append(min(1.0, limit / rms) if rms > 0 else 1.0)
    return np.array(factors, dtype=np.float64)


def _scaled(v: np.ndarray, factors: np.ndarray, groups: list[slice]) -> np.ndarray:
    out = v.copy()
    for sl, factor in zip(groups, factors):
        out[sl] *= factor
    return out


def rms_clip(net: Network, v: np.ndarray, limit: float, per: str = "layer") -> tuple[np.ndarray, float]:
    """Per group v_t *= min(1, limit / RMS(v_t)), RMS = |v_t| / sqrt(size); returns (v, smallest factor)."""
    groups = clip_groups(net, per)
    factors = _group_factors(v, limit, groups)
    return _scaled(v, factors, groups), float(factors.min())


def kl_clip_factor(v: np.ndarray, ghat: np.ndarray, alpha: float, kl_clip: float) -> float:
    """Trust region nu = min(1, sqrt(kl_clip / (alpha^2 v^T ghat))) for the preconditioned v."""
    vg = float(v @ ghat) * alpha * alpha
    return min(1.0, float(np.sqrt(kl_clip / vg))) if vg > 0 else 1.0


def clip_direction(net: Network, v: np.ndarray, ghat: np.ndarray, alpha: float, hyper: Hyper) -> tuple[np.ndarray, dict]:
    """Apply the RMS clip and the kl_clip trust region to v; returns (v, info with the factors:
    "rms_clip_factors" per group, their minimum "rms_clip_factor", and "kl_clip_factor").

    clip_order="sequential": nu is computed from the RMS-clipped v; "joint" (the authors'): nu
    from the unclipped v, and both factors are applied together.
    """
    info: dict = {}
    joint = hyper.clip_order == "joint"
    nu = kl_clip_factor(v, ghat, alpha, hyper.kl_clip) if hyper.kl_clip is not None and joint else None
    if hyper.rms_clip is not None:
        groups = clip_groups(net, hyper.rms_clip_per)
        info["rms_clip_factors"] = _group_factors(v, hyper.rms_clip, groups)
        info["rms_clip_factor"] = float(info["rms_clip_factors"].min())
        v = _scaled(v, info["rms_clip_factors"], groups)
    if hyper.kl_clip is not None:
        info["kl_clip_factor"] = nu if joint else kl_clip_factor(v, ghat, alpha, hyper.kl_clip)
        v = v * info["kl_clip_factor"]
    return v, info
