"""The optimisers, optax style: ``opt = make(name, net, ...)``, ``state = opt.init(theta)``,
``theta, state, info = opt.step(theta, state, X, y)`` with an immutable :class:`OptState`.

Names (docs/theory.md §2-§7):

- ``"sgd"``: theta -= alpha u, u = momentum u + g.
- ``"ea-cm"``: natural gradient with the exponentially averaged curvature,
  s = -alpha (Mbar_k + eta I)^{-1} g_k; on the K-FAC platform this is K-FAC, also named ``"kfac"``.
- ``"so-kld-wrm"`` (§4.2): s = -alpha (Mbar_k + eta I)^{-1} ghat_k, ghat_k = g_k - rho (alpha_{k-1}/alpha_k) g_{k-1}.
- ``"q-kld-wrm"`` (§4.3): s = -alpha (Mbar_k + eta I + alpha B_k)^{-1} ghat_k,
  ghat_k = g_k - rho (alpha_{k-1}/alpha_k) (g_{k-1} + B_{k-1} s_{k-1}) with the *actual* previous step.
- ``"qe-kld-wrm"`` (§4.4): the Q step, then an inner solve of E_k (exact KL to the last m iterates,
  evaluated on the current batch) started from it.

Weight decay wd is an L2 term of the loss: wd * theta is added to the (corrected) gradient
before preconditioning and wd to the damping (§6.1), as the authors do.  ``preset="paper"``
reproduces the authors' public optimisers step for step; where it departs from the theory:
(i) the empirical Fisher, (ii) refresh period T = 30 with the wake correction still applied every
step, (iii) separate bias blocks, (iv) eigenvalues <= 1e-6 floored to 0, (v) the kl_clip trust
region and, for Q and QE, the RMS clip (2.0) of every parameter tensor (``rms_clip_per="tensor"``:
W and b apart), with the kl factor computed from the *unclipped* direction and both factors applied
together (``clip_order="joint"``), (vi) weight decay 0.001, (vii) the "factored" Kronecker sum and
B_k := Mbar_k on steps without refresh (Q, QE), (viii) Q and QE: the authors' closed-form wake
correction (``correction="authors"``, §7), which uses the Q-step direction V_{k-1} and never QE's
final step, (ix) QE: symmetric KL, kappa = 1/660, 7 inner momentum-SGD steps of size 0.1 alpha,
momentum 0.5, no proximal damping term in the inner objective (``proximal=False``), and plain Q
steps until the wake holds m = 3 iterates.  ``preset="theory"`` keeps correction="exact",
rms_clip_per="layer", clip_order="sequential" and proximal=True.  ``momentum`` applies to SGD
only; the curvature methods reject it.  Every value is in :mod:`kldwrm_ref.optim.hyper`.
"""

from __future__ import annotations

from kldwrm_ref.arrays import is_numpy_namespace
from kldwrm_ref.backends import DEFAULT_BACKEND, Backend, get_backend
from kldwrm_ref.memory import reuses_memory
from kldwrm_ref.model.network import Network
from kldwrm_ref.optim.clipping import clip_direction, kl_clip_factor, rms_clip
from kldwrm_ref.optim.curvature_method import SPECS, MethodSpec, make_curvature_method
from kldwrm_ref.optim.hyper import NAMES, PLATFORMS, Hyper, resolve
from kldwrm_ref.optim.hyper import PRESETS_NAMES as PRESETS
from kldwrm_ref.optim.sgd import make_sgd
from kldwrm_ref.optim.state import DivergenceError, Optimizer, OptState, Previous, StepTrace
from kldwrm_ref.validation import check_choice

__all__ = [
    "NAMES", "PLATFORMS", "PRESETS", "SPECS", "DivergenceError", "Hyper", "MethodSpec", "OptState", "Optimizer",
    "Previous", "StepTrace", "clip_direction", "kl_clip_factor", "make", "rms_clip",
]


def make(name: str, net: Network, platform: str | None = None, preset: str = "theory", backend: str | Backend = DEFAULT_BACKEND, **overrides) -> Optimizer:
    """Build optimiser ``name`` for ``net`` (an :class:`~kldwrm_ref.model.MLP` or any Network).

    ``platform``: "dense" (exact curvature matrices) or "kfac" (default for ``name="kfac"``);
    ``preset``: "theory" or "paper"; ``overrides``: any :class:`Hyper` field.  The network is
    re-bound to ``backend`` (``Optimizer.network``).  The curvature methods put a
    :class:`StepTrace` of every step into ``info["trace"]``.  Every step runs inside
    :func:`kldwrm_ref.memory.reusing_memory` (its large NumPy blocks are reused across steps).
    """
    name = check_choice(name, "name", NAMES)
    platform = check_choice(platform or ("kfac" if name == "kfac" else "dense"), "platform", PLATFORMS)
    if name == "kfac" and platform != "kfac":
        raise ValueError("name='kfac' needs platform='kfac' (use 'ea-cm' for the dense platform)")
    preset = check_choice(preset, "preset", PRESETS)
    hyper = resolve(name, preset, overrides)
    resolved = get_backend(backend)
    if platform == "dense" and name != "sgd" and not is_numpy_namespace(resolved.xp):
        raise ValueError(f"platform 'dense' runs on the host with NumPy arrays only (dense Fisher matrices, for small nets); backend {resolved.name!r} uses another array namespace: use platform='kfac'")
    if net.backend is not resolved:
        net = net.with_backend(resolved)
    optimizer = make_sgd(net, hyper) if name == "sgd" else make_curvature_method(name, net, hyper, platform)
    return optimizer._replace(step=reuses_memory(optimizer.step), platform=platform, preset=preset, backend=resolved.name, network=net)
