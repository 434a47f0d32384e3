"""QE-KLD-WRM's inner solve: approximately minimise E_k from the Q step (docs/theory.md §4.4).

E_k(theta) = g_k^T s + 1/2 s^T B_k s + (kappa / alpha) sum_j wtilde_j [D(theta_j || theta) + (eta/2) |theta - theta_j|^2]

with s = theta - theta_k, D the forward or symmetric KL on the current batch, and the proximal
eta term only when ``proximal`` (the authors' objective has none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from kldwrm_ref.arrays import array_namespace, host_floats
from kldwrm_ref.curvature.averaging import truncated_wake_weights
from kldwrm_ref.curvature.estimators import Estimator
from kldwrm_ref.model import losses
from kldwrm_ref.model.network import Network, PreparedInput
from kldwrm_ref.optim.clipping import rms_clip_factors
from kldwrm_ref.optim.hyper import Hyper
from kldwrm_ref.optim.state import StepReadout


class WakeObjective(NamedTuple):
    """E_k on the batch X; ``ref_logits[j]`` are theta_j's logits on X (fixed within the step)."""

    net: Network
    theta_k: np.ndarray
    g: np.ndarray
    B_operator: Any
    scale: float  # kappa / alpha
    proximal: float  # eta of the proximal term, 0 without it
    kind: str
    centres: Sequence[np.ndarray]
    weights: np.ndarray
    ref_logits: Sequence[np.ndarray]
    X: PreparedInput  # the batch, prepared once for the step's passes
    masks: tuple[int, ...]  # the step's dropout-mask key: every pass of E_k uses the step's masks

    def value_and_gradient(self, theta: np.ndarray) -> tuple[Any, np.ndarray]:
        """E_k(theta) as a float64 0-d array (left where it is computed: only the line search reads
        it) and its gradient g + B s + scale (sum_j w_j [J^T dKL_j / N + eta (theta - theta_j)])."""
        xp = self.net.backend.xp
        s = theta - self.theta_k
        Bs = self.B_operator.matvec(s)
        cache = self.net.forward(theta, self.X, self.net.training_rng(self.masks), validate=False)
        total_dlogits = xp.zeros_like(cache.logits)
        wake_value = xp.zeros((), dtype=xp.float64)  # made on the device (a host value is a copy)
        for w, ref in zip(self.weights, self.ref_logits):
            values, dlogits = losses.kl(ref, cache.logits, self.kind, self.net.backend)
            wake_value += float(w) * xp.astype(xp.mean(values), xp.float64)
            total_dlogits += float(w) * dlogits
        grad = self.net.vjp(theta, cache, total_dlogits)
        grad *= self.scale / self.X.X.shape[0]
        if self.proximal:  # the proximal term only when present: no theta-sized temporaries otherwise
            for w, centre in zip(self.weights, self.centres):
                d = theta - centre
                wake_value += float(w) * 0.5 * self.proximal * xp.astype(d @ d, xp.float64)
                grad += float(self.scale * w * self.proximal) * d
        grad += self.g
        grad += Bs
        return xp.astype(self.g @ s + 0.5 * s @ Bs, xp.float64) + self.scale * wake_value, grad


def wake_objective(net: Network, estimator: Estimator, hyper: Hyper, theta_k, g, B, alpha: float, wake: Sequence[np.ndarray], X, k: int, masks: tuple[int, ...]) -> WakeObjective:
    """Assemble E_k of step k over the kept iterates ``wake`` (oldest first)."""
    indices, weights = truncated_wake_weights(hyper.rho, k, hyper.m)
    kept = list(wake[-len(indices):])
    proximal = hyper.total_damping if hyper.proximal else 0.0
    batch = net.prepare(X, validate=False)  # the step checked the batch
    ref_logits = [net.forward(t, batch, net.training_rng(masks), validate=False).logits for t in kept]
    return WakeObjective(net, theta_k, g, estimator.operator(B), hyper.kappa / alpha, proximal, hyper.kl, kept, weights, ref_logits, batch, masks)


def inner_solve(net: Network, estimator: Estimator, hyper: Hyper, theta_k, s_q, g, B, alpha: float, wake, X, readout: StepReadout, masks: tuple[int, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Approximately minimise E_k from theta_k + s_q; returns the final step s and the step
    theta^(i) - theta_k after each inner iteration i = 1..inner_steps (the last is s).  The
    iterates' checks join the step's ``readout``: the SGD solver reads nothing to the host; the
    line search makes one read per iteration and one per trial point.

    inner="sgd" (the authors'): s -= u, u = momentum u + step_factor alpha grad (RMS-clipped if set).
    inner="preconditioned": Gauss-Newton with backtracking (Armijo) line search,
    d = -P^{-1} grad E, P = B + c (F(theta) + eta I), c = kappa / alpha, F(theta) the batch
    curvature at the inner iterate; the line search makes every iteration decrease E_k, so it
    converges from the Q step however far that lands.
    """
    objective = wake_objective(net, estimator, hyper, theta_k, g, B, alpha, wake, X, readout.step, masks)
    xp = array_namespace(s_q)
    s = xp.asarray(s_q, copy=True)
    steps: list[np.ndarray] = []
    value, grad = objective.value_and_gradient(theta_k + s)
    if hyper.inner == "sgd":
        velocity = xp.zeros_like(s)
        for i in range(hyper.inner_steps):
            direction = grad
            if hyper.rms_clip is not None:
                direction, _ = rms_clip_factors(net, direction, hyper.rms_clip, hyper.rms_clip_per)
            velocity = hyper.inner_momentum * velocity + direction * hyper.inner_step_factor * alpha
            s = s - velocity
            readout.finite("inner-solve step", s)
            steps.append(s)
            if i + 1 < hyper.inner_steps:  # E_k at the final iterate would go unused
                value, grad = objective.value_and_gradient(theta_k + s)
        return s, steps
    c = hyper.kappa / alpha
    # P depends on the inner iterate only with the dense exact Fisher; otherwise factor it once
    fixed = None if estimator.exact_curvature else gauss_newton_inverse(estimator, hyper, B, c, theta_k, X)
    for _ in range(hyper.inner_steps):
        preconditioner = fixed if fixed is not None else gauss_newton_inverse(estimator, hyper, B, c, theta_k + s, X)
        direction = -preconditioner.matvec(grad)
        start_value, slope, grad_norm2 = host_floats(xp, value, grad @ direction, grad @ grad)
        if not (math.isfinite(slope) and math.isfinite(grad_norm2)):  # every trial point would be non-finite:
            s = s + direction  # stop at once with such a step (the step's readout reports it)
            steps.append(s)
            break
        t, grad_norm = 1.0, math.sqrt(grad_norm2)
        for _ in range(40):
            new_value, new_grad = objective.value_and_gradient(theta_k + s + t * direction)
            trial_value, trial_norm2 = host_floats(xp, new_value, new_grad @ new_grad)
            # Armijo decrease, or (near the minimiser, where E's round-off hides the decrease)
            # a smaller gradient norm
            if trial_value <= start_value + 1e-4 * t * slope or math.sqrt(trial_norm2) < grad_norm:
                break
            t *= 0.5
        s, value, grad = s + t * direction, new_value, new_grad
        steps.append(s)
    return s, steps


def gauss_newton_inverse(estimator: Estimator, hyper: Hyper, B, c: float, theta, X):
    """P^{-1} for the inner Gauss-Newton step.

    Dense platform with the exact Fisher: P = B + c F(theta) + c eta I, F re-evaluated at the inner
    iterate.  Otherwise (K-FAC, or a sampled / empirical Fisher that does not describe the KL's
    curvature): F(theta) is approximated by B itself, P = (1 + c) B + c eta I, which stays a
    single Kronecker-factored matrix.
    """
    damping = hyper.total_damping
    if estimator.exact_curvature:
        (F_here,) = estimator.compute(theta, X, None, None, None)
        return estimator.inverse((B[0] + c * F_here,), damping=c * damping)
    return _Scaled(estimator.inverse(B, damping=c * damping / (1.0 + c)), 1.0 / (1.0 + c))


class _Scaled(NamedTuple):
    operator: Any
    scale: float

    def matvec(self, v):
        return self.scale * self.operator.matvec(v)
