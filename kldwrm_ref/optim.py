"""The optimisers, optax style: ``opt = make(name, mlp, ...)``, ``state = opt.init(theta)``,
``theta, state, info = opt.step(theta, state, X, y)`` with an immutable :class:`OptState`.

Names (THEORY.md sections 2-5):

- ``"sgd"``: theta -= alpha v, v = momentum v + g.
- ``"ea-cm"``: natural gradient with the exponentially averaged curvature,
  s = -alpha (Mbar_k + eta I)^{-1} g_k; on the K-FAC platform this is K-FAC, also named ``"kfac"``.
- ``"so-kld-wrm"`` (4.1): s = -alpha (Mbar_k + eta I)^{-1} ghat_k, ghat_k = g_k - rho (alpha_{k-1}/alpha_k) g_{k-1}.
- ``"q-kld-wrm"`` (4.2): s = -alpha (Mbar_k + eta I + alpha B_k)^{-1} ghat_k,
  ghat_k = g_k - rho (alpha_{k-1}/alpha_k) (g_{k-1} + B_{k-1} s_{k-1}) with the *actual* previous step.
- ``"qe-kld-wrm"`` (4.3): the Q step, then an inner solve of E_k (exact KL to the last m iterates,
  evaluated on the current batch) started from it.

Weight decay wd is treated as an L2 term of the loss: wd * theta is added to the (corrected)
gradient before preconditioning and wd to the damping (curvature of wd/2 |theta|^2), as the
authors do.  ``preset="paper"`` reproduces the authors' public optimisers step for step; where it
departs from THEORY.md:
(i) the empirical Fisher, (ii) refresh period T = 30 with the wake correction still applied every
step, (iii) separate bias blocks, (iv) eigenvalues <= 1e-6 floored to 0, (v) the kl_clip trust
region and, for Q and QE, the RMS clip (2.0) of every parameter tensor (``rms_clip_per="tensor"``:
W and b apart), with the kl factor computed from the *unclipped* direction and both factors applied
together (``clip_order="joint"``), (vi) weight decay 0.001, (vii) the "factored" Kronecker sum and
B_k := Mbar_k on steps without refresh (Q, QE), (viii) Q and QE: the authors' closed-form wake
correction (``correction="authors"``, docs/theory.md section 7), which uses the Q-step direction
V_{k-1} and never QE's final step, (ix) QE: symmetric KL, kappa = 1/660, 7 inner momentum-SGD
steps of size 0.1 alpha, momentum 0.5, no proximal damping term in the inner objective
(``proximal=False``), and plain Q steps until the wake holds m = 3 iterates.
``preset="theory"`` keeps correction="exact", rms_clip_per="layer", clip_order="sequential" and
proximal=True.  ``momentum`` applies to SGD only; the curvature methods reject it.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import numpy as np

from kldwrm_ref.averaging import EAState, ExponentialAverage
from kldwrm_ref.backend import get_backend
from kldwrm_ref.curvature import DenseCurvature, KFACCurvature
from kldwrm_ref.fisher import FISHER_TYPES
from kldwrm_ref.kfac import BIAS_MODES, DAMPING_STYLES, KRON_SUM_MODES
from kldwrm_ref.mlp import MLP
from kldwrm_ref.validation import check_choice, check_nonnegative, check_positive, check_positive_int, check_rho
from kldwrm_ref.wake import authors_corrected_gradient, step_size_at, truncated_wake_weights, wake_corrected_gradient

NAMES = ("sgd", "ea-cm", "kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm")
PLATFORMS = ("dense", "kfac")
PRESETS = ("theory", "paper")
STALE_CURRENT = ("last", "average")
INNER_SOLVERS = ("sgd", "preconditioned")
KL_KINDS = ("forward", "symmetric")
CORRECTIONS = ("exact", "authors")
RMS_CLIP_GROUPS = ("layer", "tensor")
CLIP_ORDERS = ("sequential", "joint")
PAPER_RHO = {"ea-cm": 0.95, "kfac": 0.95, "so-kld-wrm": 0.33, "q-kld-wrm": 0.5, "qe-kld-wrm": 0.5, "sgd": 0.0}


class DivergenceError(FloatingPointError):
    """A training step produced a non-finite quantity; ``step`` and ``quantity`` say which."""

    def __init__(self, step: int, quantity: str):
        super().__init__(f"diverged at step {step}: {quantity} is not finite")
        self.step, self.quantity = step, quantity


class OptState(NamedTuple):
    """Optimiser state (immutable). Fields unused by a method stay None."""

    step: int
    ea: EAState | None = None
    inverse: Any = None  # cached (Mbar + eta I)^{-1}, or (key, (Mbar + eta I + alpha B)^{-1}) for Q / QE
    current: tuple | None = None  # the latest current curvature B (Q, QE)
    previous_model_gradient: np.ndarray | None = None  # grad h_{k-1}(theta_k) (correction="exact")
    previous_alpha: float | None = None
    previous_gradient: np.ndarray | None = None  # g_{k-1} (correction="authors")
    previous_corrected: np.ndarray | None = None  # ghat_{k-1} without weight decay (correction="authors")
    previous_direction: np.ndarray | None = None  # V_{k-1}, the clipped preconditioned Q direction
    wake: tuple = ()  # QE: the last m iterates, oldest first
    velocity: np.ndarray | None = None  # SGD momentum


class Optimizer(NamedTuple):
    name: str
    hyper: dict
    init: Callable[[np.ndarray], OptState]
    step: Callable[[np.ndarray, OptState, np.ndarray, np.ndarray], tuple[np.ndarray, OptState, dict]]


def default_hyper(name: str, platform: str, preset: str) -> dict:
    """The full hyperparameter set for (name, platform, preset), before user overrides."""
    hyper = dict(
        step_size=0.01, rho=PAPER_RHO[name], damping=0.01, weight_decay=0.0, momentum=0.0,
        period=1, fisher_type="exact", samples=1, seed=0, bias="joint", damping_style="eigen",
        kron_sum="exact", eig_floor=0.0, kl_clip=None, rms_clip=None, stale_current="last",
        m=3, kl="forward", kappa=1.0, inner="preconditioned", inner_steps=5, inner_step_factor=1.0,
        inner_momentum=0.0, inner_after_full_wake=False, correction="exact", rms_clip_per="layer",
        clip_order="sequential", proximal=True,
    )
    if name == "sgd":
        hyper.update(step_size=0.1)
    if preset == "paper":
        hyper.update(weight_decay=0.001, period=30, fisher_type="empirical", bias="separate", eig_floor=1e-6, kl_clip=0.1)
        if name in ("q-kld-wrm", "qe-kld-wrm"):
            hyper.update(rms_clip=2.0, kron_sum="factored", stale_current="average", correction="authors", rms_clip_per="tensor", clip_order="joint")
        if name == "qe-kld-wrm":
            hyper.update(kl="symmetric", kappa=1.0 / 660.0, inner="sgd", inner_steps=7, inner_step_factor=0.1, inner_momentum=0.5, inner_after_full_wake=True, proximal=False)
    return hyper


def validate_hyper(hyper: dict) -> dict:
    """Check every hyperparameter; errors name the argument and the accepted range."""
    h = dict(hyper)
    if not callable(h["step_size"]):
        check_positive(h["step_size"], "step_size")
    check_rho(h["rho"])
    check_nonnegative(h["damping"], "damping")
    check_nonnegative(h["weight_decay"], "weight_decay")
    if not 0 <= h["momentum"] < 1:
        raise ValueError(f"momentum must be in [0, 1), got {h['momentum']!r}")
    check_positive_int(h["period"], "period")
    check_choice(h["fisher_type"], "fisher_type", FISHER_TYPES)
    check_positive_int(h["samples"], "samples")
    check_choice(h["bias"], "bias", BIAS_MODES)
    check_choice(h["damping_style"], "damping_style", DAMPING_STYLES)
    check_choice(h["kron_sum"], "kron_sum", KRON_SUM_MODES)
    check_nonnegative(h["eig_floor"], "eig_floor")
    for clip in ("kl_clip", "rms_clip"):
        if h[clip] is not None:
            check_positive(h[clip], clip)
    check_choice(h["stale_current"], "stale_current", STALE_CURRENT)
    check_positive_int(h["m"], "m")
    check_choice(h["kl"], "kl", KL_KINDS)
    check_positive(h["kappa"], "kappa")
    check_choice(h["inner"], "inner", INNER_SOLVERS)
    if isinstance(h["inner_steps"], bool) or not isinstance(h["inner_steps"], int) or h["inner_steps"] < 0:
        raise ValueError(f"inner_steps must be an integer >= 0, got {h['inner_steps']!r}")
    check_positive(h["inner_step_factor"], "inner_step_factor")
    if not 0 <= h["inner_momentum"] < 1:
        raise ValueError(f"inner_momentum must be in [0, 1), got {h['inner_momentum']!r}")
    check_choice(h["correction"], "correction", CORRECTIONS)
    check_choice(h["rms_clip_per"], "rms_clip_per", RMS_CLIP_GROUPS)
    check_choice(h["clip_order"], "clip_order", CLIP_ORDERS)
    if not isinstance(h["proximal"], bool):
        raise ValueError(f"proximal must be True or False, got {h['proximal']!r}")
    return h


def make(name: str, mlp: MLP, platform: str | None = None, preset: str = "theory", backend: str = "auto", **overrides) -> Optimizer:
    """Build optimiser ``name`` for ``mlp``; see the module docstring and :func:`default_hyper`."""
    name = check_choice(name, "name", NAMES)
    platform = check_choice(platform or ("kfac" if name == "kfac" else "dense"), "platform", PLATFORMS)
    if name == "kfac" and platform != "kfac":
        raise ValueError("name='kfac' needs platform='kfac' (use 'ea-cm' for the dense platform)")
    preset = check_choice(preset, "preset", PRESETS)
    backend = get_backend(backend).name
    if mlp.backend.name != backend:
        mlp = mlp.with_backend(backend)
    hyper = default_hyper(name, platform, preset)
    unknown = set(overrides) - set(hyper)
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)}; accepted: {sorted(hyper)}")
    hyper = validate_hyper({**hyper, **overrides})
    if name != "sgd" and hyper["momentum"] != 0:
        raise ValueError(f"momentum applies to 'sgd' only; {name!r} takes no momentum (got momentum={hyper['momentum']!r})")
    hyper.update(platform=platform, preset=preset, backend=backend)
    if name == "sgd":
        return _make_sgd(mlp, hyper)
    return _make_curvature_method(name, mlp, hyper)


# ---------------------------------------------------------------------------------- helpers
def _finite_or_raise(step: int, quantity: str, value) -> None:
    if not np.all(np.isfinite(value)):
        raise DivergenceError(step, quantity)


def clip_groups(mlp: MLP, per: str) -> list[slice]:
    """The parameter groups of the RMS clip: whole layers ([W, b]) or every tensor (W, b apart)."""
    per = check_choice(per, "rms_clip_per", RMS_CLIP_GROUPS)
    groups = []
    for l, (out, inp) in enumerate(mlp.layer_shapes):
        start, stop = mlp.offsets[l], mlp.offsets[l + 1]
        groups += [slice(start, stop)] if per == "layer" else [slice(start, start + out * inp), slice(start + out * inp, stop)]
    return groups


def rms_clip(mlp: MLP, v: np.ndarray, limit: float, per: str = "layer") -> tuple[np.ndarray, float]:
    """Per group v_t *= min(1, limit / RMS(v_t)), RMS = |v_t| / sqrt(size) (docs/theory.md 6.3);
    groups are layers or tensors (:func:`clip_groups`); returns (v, smallest factor)."""
    out, smallest = v.copy(), 1.0
    for sl in clip_groups(mlp, per):
        rms = np.linalg.norm(v[sl]) / np.sqrt(v[sl].size)
        factor = min(1.0, limit / rms) if rms > 0 else 1.0
        out[sl] *= factor
        smallest = min(smallest, factor)
    return out, smallest


def kl_clip_factor(v: np.ndarray, ghat: np.ndarray, alpha: float, kl_clip: float) -> float:
    """Trust region nu = min(1, sqrt(kl_clip / (alpha^2 v^T ghat))) for the preconditioned v."""
    vg = float(v @ ghat) * alpha * alpha
    return min(1.0, float(np.sqrt(kl_clip / vg))) if vg > 0 else 1.0


def clip_direction(mlp: MLP, v: np.ndarray, ghat: np.ndarray, alpha: float, hyper: dict) -> tuple[np.ndarray, dict]:
    """Apply the RMS clip and the kl_clip trust region to the preconditioned direction v
    (docs/theory.md 6.2-6.3); returns (v, info with the factors applied).

    clip_order="sequential": nu is computed from the RMS-clipped v; "joint" (the authors'): nu
    is computed from the unclipped v and both factors are applied together.
    """
    info: dict = {}
    kl_clip, joint = hyper["kl_clip"], hyper["clip_order"] == "joint"
    nu = kl_clip_factor(v, ghat, alpha, kl_clip) if kl_clip is not None and joint else None
    if hyper["rms_clip"] is not None:
        v, info["rms_clip_factor"] = rms_clip(mlp, v, hyper["rms_clip"], hyper["rms_clip_per"])
    if kl_clip is not None:
        info["kl_clip_factor"] = nu if joint else kl_clip_factor(v, ghat, alpha, kl_clip)
        v = v * info["kl_clip_factor"]
    return v, info


def _authors_x(state: OptState, k: int, estimate, average: ExponentialAverage) -> np.ndarray:
    """X_k of the authors' correction (docs/theory.md 7): Gbar_{k-1} V_{k-1} Abar_{k-1} per block on
    the step right after a refresh (k = 1 mod T, k > 1), else ghat_{k-1} / (1 + alpha_{k-1})."""
    if k > 1 and k % average.period == 1 % average.period:
        return estimate.operator(average.value(state.ea)).matvec(state.previous_direction)
    return state.previous_corrected / (1.0 + state.previous_alpha)


def _make_sgd(mlp: MLP, hyper: dict) -> Optimizer:
    def init(theta):
        return OptState(0, velocity=np.zeros_like(theta))

    def step(theta, state, X, y):
        start = time.perf_counter()
        k = state.step
        loss, g, _ = mlp.loss_grad_cache(theta, X, y)
        _finite_or_raise(k, "loss", loss)
        _finite_or_raise(k, "gradient", g)
        g = g + hyper["weight_decay"] * theta
        velocity = hyper["momentum"] * state.velocity + g
        s = -step_size_at(hyper["step_size"], k) * velocity
        _finite_or_raise(k, "step", s)
        elapsed = time.perf_counter() - start
        info = dict(loss=loss, step_norm=float(np.linalg.norm(s)), time=dict(forward_backward=elapsed, total=elapsed))
        return theta + s, state._replace(step=k + 1, velocity=velocity), info

    return Optimizer("sgd", hyper, init, step)


def _make_curvature_method(name: str, mlp: MLP, hyper: dict) -> Optimizer:
    damping = hyper["damping"] + hyper["weight_decay"]
    common = dict(mlp=mlp, damping=damping, fisher_type=hyper["fisher_type"], samples=hyper["samples"], backend=hyper["backend"])
    if hyper["platform"] == "dense":
        estimate = DenseCurvature(**common)
    else:
        estimate = KFACCurvature(**common, bias=hyper["bias"], damping_style=hyper["damping_style"], kron_sum=hyper["kron_sum"], eig_floor=hyper["eig_floor"])
    average = ExponentialAverage.create(hyper["rho"], hyper["period"])
    backend = get_backend(hyper["backend"])
    rho, wd = hyper["rho"], hyper["weight_decay"]
    uses_current = name in ("q-kld-wrm", "qe-kld-wrm")
    corrects = name in ("so-kld-wrm", "q-kld-wrm", "qe-kld-wrm")

    def init(theta):
        mlp.check_theta(theta)
        return OptState(0, ea=average.init())

    def step(theta, state, X, y):
        times = {}
        clock = time.perf_counter()
        k = state.step
        alpha = step_size_at(hyper["step_size"], k)
        loss, g, cache = mlp.loss_grad_cache(theta, X, y)
        _finite_or_raise(k, "loss", loss)
        _finite_or_raise(k, "gradient", g)
        times["forward_backward"] = time.perf_counter() - clock

        clock = time.perf_counter()
        refresh = average.due(state.ea)
        current = state.current
        if refresh:
            rng = np.random.default_rng([hyper["seed"], k])
            current = estimate.compute(theta, X, y, cache, rng)
            for m in current:
                _finite_or_raise(k, "curvature", m)
        ea = average.update(state.ea, current if refresh else None, backend)
        averaged = average.value(ea)
        times["curvature"] = time.perf_counter() - clock

        clock = time.perf_counter()
        inverse = state.inverse
        if uses_current:
            B = current if (refresh or hyper["stale_current"] == "last") else averaged
            key = (ea.updates, alpha, refresh or hyper["stale_current"] == "last")
            if inverse is None or inverse[0] != key:  # only changes on refresh or with alpha
                inverse = (key, estimate.sum_inverse(averaged, B, alpha))
            solver = inverse[1]
        else:
            if refresh or inverse is None:
                inverse = estimate.inverse(averaged)
            solver = inverse
        times["inverse"] = time.perf_counter() - clock

        clock = time.perf_counter()
        ghat = g
        if corrects and k > 0:
            if uses_current and hyper["correction"] == "authors":
                ghat = authors_corrected_gradient(g, state.previous_gradient, state.previous_corrected, _authors_x(state, k, estimate, average), rho, alpha, state.previous_alpha)
            else:
                ghat = wake_corrected_gradient(g, state.previous_model_gradient, rho, alpha, state.previous_alpha)
        ghat_wd = ghat + wd * theta
        v, info = clip_direction(mlp, solver.matvec(ghat_wd), ghat_wd, alpha, hyper)
        s = -alpha * v
        _finite_or_raise(k, "step", s)
        times["precondition"] = time.perf_counter() - clock

        wake = state.wake
        if name == "qe-kld-wrm":
            clock = time.perf_counter()
            wake = (wake + (theta,))[-hyper["m"]:]
            if len(wake) == hyper["m"] or not hyper["inner_after_full_wake"]:
                s = _qe_inner_solve(mlp, hyper, backend, estimate, theta, s, g, B, alpha, wake, X, k)
                _finite_or_raise(k, "inner-solve step", s)
            times["inner"] = time.perf_counter() - clock

        previous_model_gradient = None
        if name == "so-kld-wrm":
            previous_model_gradient = g
        elif uses_current and hyper["correction"] == "exact":
            previous_model_gradient = g + estimate.operator(B).matvec(s)
        new_state = OptState(
            k + 1, ea, inverse, current, previous_model_gradient, alpha, wake=wake,
            previous_gradient=g, previous_corrected=ghat, previous_direction=v,
        )
        times["total"] = sum(times.values())
        info.update(loss=loss, step_norm=float(np.linalg.norm(s)), refreshed=refresh, time=times)
        return theta + s, new_state, info

    return Optimizer(name, hyper, init, step)


def qe_gradient(mlp: MLP, backend, theta_k, g, B_operator, alpha, kappa, damping, kind, wake, weights, ref_logits, X, theta) -> tuple[float, np.ndarray]:
    """E_k and its gradient at theta (section 4.3), KL terms on the batch X against ``ref_logits``.

    Each wake term is D(theta_j || theta) + (eta / 2) |theta - theta_j|^2: the damping is itself a
    wake (section 2), and without it E_k has no minimiser where the batch Fisher is singular.
    ``damping`` = 0 drops the proximal term (the authors' objective, ``proximal=False``).
    """
    s = theta - theta_k
    Bs = B_operator.matvec(s)
    cache = mlp.forward(theta, X)
    total_dlogits = np.zeros_like(cache.logits)
    kl_value = 0.0
    proximal_grad = np.zeros_like(theta)
    for w, ref, centre in zip(weights, ref_logits, wake):
        values, dlogits = backend.kl_and_grad(ref, cache.logits, kind)
        d = theta - centre
        kl_value += w * (float(values.mean()) + 0.5 * damping * float(d @ d))
        total_dlogits += w * dlogits
        proximal_grad += (w * damping) * d
    scale = kappa / alpha
    value = float(g @ s + 0.5 * s @ Bs) + scale * kl_value
    grad = g + Bs + scale * (mlp.vjp(theta, cache, total_dlogits) / X.shape[0] + proximal_grad)
    return value, grad


def _qe_inner_solve(mlp, hyper, backend, estimate, theta_k, s_q, g, B, alpha, wake, X, k):
    """Approximately minimise E_k from theta_k + s_q; returns the final step s.

    inner="sgd" (the authors'): s -= step_factor alpha v, v = momentum v + grad (RMS-clipped if set).
    inner="preconditioned": Gauss-Newton with backtracking (Armijo) line search,
    d = -P^{-1} grad E, P = B + c (F(theta) + eta I), c = lambda kappa, F(theta) the batch
    curvature at the inner iterate (the Gauss-Newton matrix of every forward-KL wake term); the
    line search makes every iteration decrease E_k, so it converges from the Q step however far
    that lands.
    """
    indices, weights = truncated_wake_weights(hyper["rho"], k, hyper["m"])
    kept = wake[-len(indices):]
    ref_logits = [mlp.logits(t, X) for t in kept]
    B_operator = estimate.operator(B)
    c = hyper["kappa"] / alpha
    damping = hyper["damping"] + hyper["weight_decay"]
    proximal = damping if hyper["proximal"] else 0.0

    def objective(step):
        return qe_gradient(mlp, backend, theta_k, g, B_operator, alpha, hyper["kappa"], proximal, hyper["kl"], kept, weights, ref_logits, X, theta_k + step)

    s = s_q.copy()
    value, grad = objective(s)
    velocity = np.zeros_like(s)
    # P depends on the inner iterate only with the dense exact Fisher; otherwise factor it once
    moving = hyper["platform"] == "dense" and hyper["fisher_type"] == "exact"
    fixed = None if moving or hyper["inner"] != "preconditioned" else _gauss_newton_inverse(estimate, hyper, B, c, damping, theta_k, X)
    for _ in range(hyper["inner_steps"]):
        if hyper["inner"] == "preconditioned":
            preconditioner = _gauss_newton_inverse(estimate, hyper, B, c, damping, theta_k + s, X) if moving else fixed
            direction = -preconditioner.matvec(grad)
            slope = float(grad @ direction)
            t, grad_norm = 1.0, np.linalg.norm(grad)
            for _ in range(40):
                new_value, new_grad = objective(s + t * direction)
                # Armijo decrease, or (near the minimiser, where E's round-off hides the decrease)
                # a smaller gradient norm
                if new_value <= value + 1e-4 * t * slope or np.linalg.norm(new_grad) < grad_norm:
                    break
                t *= 0.5
            s, value, grad = s + t * direction, new_value, new_grad
        else:
            direction = grad
            if hyper["rms_clip"] is not None:
                direction, _ = rms_clip(mlp, direction, hyper["rms_clip"], hyper["rms_clip_per"])
            velocity = hyper["inner_momentum"] * velocity + direction * hyper["inner_step_factor"] * alpha
            s = s - velocity
            value, grad = objective(s)
    return s


def _gauss_newton_inverse(estimate, hyper, B, c, damping, theta, X):
    """P^{-1} for the QE inner Gauss-Newton step.

    Dense platform with the exact Fisher: P = B + c F(theta) + c eta I, F re-evaluated at the inner
    iterate.  Otherwise (K-FAC, or a sampled / empirical Fisher that does not describe the KL's
    curvature): F(theta) is approximated by B itself, P = (1 + c) B + c eta I, which stays a
    single Kronecker-factored matrix.
    """
    if hyper["platform"] == "dense" and hyper["fisher_type"] == "exact":
        (F_here,) = estimate.compute(theta, X, None, None, None)
        return estimate.inverse((B[0] + c * F_here,), damping=c * damping)
    return _Scaled(estimate.inverse(B, damping=c * damping / (1.0 + c)), 1.0 / (1.0 + c))


class _Scaled(NamedTuple):
    operator: Any
    scale: float

    def matvec(self, v):
        return self.scale * self.operator.matvec(v)
