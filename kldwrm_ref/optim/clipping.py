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


def rms_clip(net: Network, v: np.ndarray, limit: float, per: str = "layer") -> tuple[np.ndarray, float]:
    """Per group v_t *= min(1, limit / RMS(v_t)), RMS = |v_t| / sqrt(size); returns (v, smallest factor)."""
    out, smallest = v.copy(), 1.0
    for sl in clip_groups(net, per):
        rms = np.linalg.norm(v[sl]) / np.sqrt(v[sl].size)
        factor = min(1.0, limit / rms) if rms > 0 else 1.0
        out[sl] *= factor
        smallest = min(smallest, factor)
    return out, smallest


def kl_clip_factor(v: np.ndarray, ghat: np.ndarray, alpha: float, kl_clip: float) -> float:
    """Trust region nu = min(1, sqrt(kl_clip / (alpha^2 v^T ghat))) for the preconditioned v."""
    vg = float(v @ ghat) * alpha * alpha
    return min(1.0, float(np.sqrt(kl_clip / vg))) if vg > 0 else 1.0


def clip_direction(net: Network, v: np.ndarray, ghat: np.ndarray, alpha: float, hyper: Hyper) -> tuple[np.ndarray, dict]:
    """Apply the RMS clip and the kl_clip trust region to v; returns (v, info with the factors).

    clip_order="sequential": nu is computed from the RMS-clipped v; "joint" (the authors'): nu
    from the unclipped v, and both factors are applied together.
    """
    info: dict = {}
    joint = hyper.clip_order == "joint"
    nu = kl_clip_factor(v, ghat, alpha, hyper.kl_clip) if hyper.kl_clip is not None and joint else None
    if hyper.rms_clip is not None:
        v, info["rms_clip_factor"] = rms_clip(net, v, hyper.rms_clip, hyper.rms_clip_per)
    if hyper.kl_clip is not None:
        info["kl_clip_factor"] = nu if joint else kl_clip_factor(v, ghat, alpha, hyper.kl_clip)
        v = v * info["kl_clip_factor"]
    return v, info
