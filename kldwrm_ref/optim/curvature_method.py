"""EA-CM / K-FAC and SO-, Q-, QE-KLD-WRM: one update rule in named phases (docs/theory.md §2-§7).

A step reads, in order:

1. gradient            g_k and the forward cache on the batch;
2. update curvature    on refresh steps the current estimate M_k, then the exponential average;
3. refresh inverse     (Mbar + eta I)^{-1}, or (Mbar + eta I + alpha B_k)^{-1} for Q / QE, rebuilt
                       only when the average (or alpha) changed;
4. wake-correct        ghat_k (SO: the previous gradient; Q / QE: the previous model's gradient,
                       or the authors' closed form);
5. precondition, clip  v = P^{-1} (ghat_k + wd theta_k), then the RMS and kl clips; s = -alpha v;
6. inner solve         QE only: minimise E_k from the Q step;
7. apply               theta_{k+1} = theta_k + s, and remember what step k+1's correction needs.

``info["trace"]`` holds references to what the phases computed (:class:`~kldwrm_ref.optim.state.StepTrace`;
:func:`kldwrm_ref.trajectory.record` copies them).

What tells the methods apart is a :class:`MethodSpec`, not string flags.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, NamedTuple

import numpy as np

from kldwrm_ref.curvature.averaging import ExponentialAverage
from kldwrm_ref.curvature.estimators import DenseEstimator, Estimator, KFACEstimator
from kldwrm_ref.curvature.inverses import SingularCurvatureError
from kldwrm_ref.curvature.linalg import CurvatureError
from kldwrm_ref.model.network import Network
from kldwrm_ref.optim.clipping import clip_factors, clip_info
from kldwrm_ref.optim.correction import authors_corrected_gradient, wake_corrected_gradient
from kldwrm_ref.optim.hyper import Hyper
from kldwrm_ref.optim.qe import inner_solve
from kldwrm_ref.optim.state import DivergenceError, Optimizer, OptState, Previous, StepReadout, StepTrace, checked_batch, finite_or_raise, step_size_or_raise


class MethodSpec(NamedTuple):
    """How a curvature method differs from EA-CM."""

    correction: Literal["none", "gradient", "model"]  # ghat_k: g_k; g_k - rho g_{k-1}; uses g_{k-1} + B s_{k-1}
    uses_current: bool  # preconditions with Mbar + alpha B_k (Q, QE)
    inner_solve: bool  # QE's inner minimisation of E_k


SPECS = {
    "ea-cm": MethodSpec("none", False, False),
    "kfac": MethodSpec("none", False, False),
    "so-kld-wrm": MethodSpec("gradient", False, False),
    "q-kld-wrm": MethodSpec("model", True, False),
    "qe-kld-wrm": MethodSpec("model", True, True),
}


class PhaseTimer:
    """Seconds spent per named phase of a step: ``with timer("inverse"): ...`` adds to times["inverse"]."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - start


def estimator_for(net: Network, hyper: Hyper, platform: str) -> Estimator:
    """The curvature estimator of ``platform`` ("dense" or "kfac") with damping eta + wd."""
    if platform == "dense":
        return DenseEstimator(net, hyper.total_damping, hyper.fisher_type, hyper.samples)
    return KFACEstimator(net, hyper.total_damping, hyper.fisher_type, hyper.samples, hyper.bias, hyper.damping_style, hyper.kron_sum, hyper.eig_floor)


def make_curvature_method(name: str, net: Network, hyper: Hyper, platform: str) -> Optimizer:
    spec = SPECS[name]
    estimator = estimator_for(net, hyper, platform)
    average = ExponentialAverage.create(hyper.rho, hyper.period)

    def init(theta: np.ndarray) -> OptState:
        net.check_theta(theta)
        return OptState(0, ea=average.init())

    def step(theta: np.ndarray, state: OptState, X: np.ndarray, y: np.ndarray):
        timer, k = PhaseTimer(), state.step
        assert state.ea is not None, "state was not made by this optimiser's init"
        alpha = step_size_or_raise(hyper.step_size, k)
        X, y = checked_batch(net, k, theta, X, y)  # the step's first host read
        readout = StepReadout(k, net.backend.xp)  # its second, at the end: checks and info's scalars

        with timer("forward_backward"):  # 1. gradient
            masks = (hyper.seed, k, 1)  # dropout masks of this step: the same in every pass of the step
            loss, g, cache = net.training_pass(theta, X, y, net.training_rng(masks), validate=False)
            readout.finite("loss", loss)
            readout.finite("gradient", g)

        with timer("curvature"):  # 2. update curvature
            refresh = average.due(state.ea)
            current = state.current
            labels = (hyper.seed, k)  # Monte-Carlo labels of this step: default_rng([seed, k])
            if refresh:
                readout.read_checks()  # no non-finite statistics reach the eigendecompositions
                current = estimator.compute(theta, X, y, cache, np.random.default_rng(labels))
                finite_or_raise(k, "curvature", current)
            ea = average.update(state.ea, current if refresh else None, net.backend)
            averaged = average.value(ea)

        with timer("inverse"):  # 3. refresh inverse
            B = None
            if spec.uses_current:
                B = current if (refresh or hyper.stale_current == "last") else averaged
            inverse, solver = _refreshed_inverse(estimator, state.inverse, ea.updates, refresh, averaged, B, alpha, hyper, k)

        with timer("precondition"):  # 4. wake-correct, 5. precondition and clip
            ghat = _corrected_gradient(spec, hyper, estimator, average, state, g, alpha, k)
            ghat_wd = ghat + hyper.weight_decay * theta
            unclipped = solver.matvec(ghat_wd)
            v, factors = clip_factors(net, unclipped, ghat_wd, alpha, hyper)
            s = q_step = -alpha * v
            readout.finite("step", s)

        wake, inner_steps = state.wake, None
        if spec.inner_solve:  # 6. inner solve
            with timer("inner"):
                wake = (wake + (theta,))[-hyper.m:]
                if len(wake) == hyper.m or not hyper.inner_after_full_wake:
                    s, inner_steps = inner_solve(net, estimator, hyper, theta, s, g, B, alpha, wake, X, readout, masks)
                    readout.finite("inner-solve step", s)

        # 7. apply, and remember what the next correction needs
        model_gradient = None
        if spec.correction == "gradient":
            model_gradient = g
        elif spec.correction == "model" and hyper.correction == "exact" and B is not None:
            model_gradient = g + estimator.operator(B).matvec(s)
        previous = Previous(alpha, g, ghat, v, model_gradient)
        new_state = OptState(k + 1, ea, inverse, current, previous, wake)
        timer.times["total"] = sum(timer.times.values())
        trace = StepTrace(alpha, masks, labels, g, current if refresh else None, averaged, solver, estimator.damping, ghat, ghat_wd, unclipped, v, q_step, inner_steps, s)
        for quantity, value in dict(factors, loss=loss, step_norm2=s @ s).items():
            readout.value(quantity, value)
        read = readout.read()
        info = clip_info({factor: read[factor] for factor in factors})
        info.update(loss=float(read["loss"]), step_norm=math.sqrt(float(read["step_norm2"])), refreshed=refresh, time=timer.times, trace=trace)
        return theta + s, new_state, info

    return Optimizer(name, hyper, init, step)


def _refreshed_inverse(estimator: Estimator, cached, updates: int, refresh: bool, averaged, B, alpha: float, hyper: Hyper, k: int):
    """(what to cache, the solver): the damped inverse, rebuilt on refresh; for Q / QE keyed by
    (updates, alpha, whether B is the fresh estimate) since it also changes with alpha."""
    try:
        if B is None:
            inverse = estimator.inverse(averaged) if (refresh or cached is None) else cached
            return inverse, inverse
        key = (updates, alpha, refresh or hyper.stale_current == "last")
        if cached is None or cached[0] != key:
            cached = (key, estimator.sum_inverse(averaged, B, alpha))
        return cached, cached[1]
    except (CurvatureError, SingularCurvatureError) as error:
        raise DivergenceError(k, "curvature inverse", f"failed: {error}") from error


def _corrected_gradient(spec: MethodSpec, hyper: Hyper, estimator: Estimator, average: ExponentialAverage, state: OptState, g, alpha: float, k: int) -> np.ndarray:
    """ghat_k (docs/theory.md §4.2, §4.3, §7); without weight decay."""
    previous = state.previous
    if spec.correction == "none" or previous is None:
        return g
    if spec.correction == "model" and hyper.correction == "authors":
        if k > 1 and k % average.period == 1 % average.period and state.ea is not None:  # right after a refresh: Gbar V Abar
            x_term = estimator.operator(average.value(state.ea)).matvec(previous.direction)
        else:
            x_term = previous.corrected / (1.0 + previous.alpha)
        return authors_corrected_gradient(g, previous.gradient, previous.corrected, x_term, hyper.rho, alpha, previous.alpha)
    return wake_corrected_gradient(g, previous.model_gradient, hyper.rho, alpha, previous.alpha)
