"""SGD with heavy-ball momentum: theta -= alpha u, u = momentum u + (g + wd theta)."""

from __future__ import annotations

import math
import time

import numpy as np

from kldwrm_ref.model.network import Network
from kldwrm_ref.optim.hyper import Hyper
from kldwrm_ref.optim.state import Optimizer, OptState, check_batch, finite_or_raise, step_size_or_raise


def make_sgd(net: Network, hyper: Hyper) -> Optimizer:
    def init(theta: np.ndarray) -> OptState:
        net.check_theta(theta)
        return OptState(0, velocity=net.backend.xp.zeros_like(theta))

    def step(theta: np.ndarray, state: OptState, X: np.ndarray, y: np.ndarray):
        start = time.perf_counter()
        k = state.step
        check_batch(k, X)
        loss, g, _ = net.loss_grad_cache(theta, X, y, net.training_rng((hyper.seed, k, 1)))
        finite_or_raise(k, "loss", loss)
        finite_or_raise(k, "gradient", g)
        g = g + hyper.weight_decay * theta
        assert state.velocity is not None
        velocity = hyper.momentum * state.velocity + g
        s = -step_size_or_raise(hyper.step_size, k) * velocity
        finite_or_raise(k, "step", s)
        elapsed = time.perf_counter() - start
        info = dict(loss=loss, step_norm=math.sqrt(float(s @ s)), time=dict(forward_backward=elapsed, total=elapsed))
        return theta + s, state._replace(step=k + 1, velocity=velocity), info

    return Optimizer("sgd", hyper, init, step)
