"""SGD with heavy-ball momentum: theta -= alpha u, u = momentum u + (g + wd theta)."""

from __future__ import annotations

import math
import time

import numpy as np

from kldwrm_ref.model.network import Network
from kldwrm_ref.optim.hyper import Hyper
from kldwrm_ref.optim.state import Optimizer, OptState, StepReadout, checked_batch, step_size_or_raise


def make_sgd(net: Network, hyper: Hyper) -> Optimizer:
    def init(theta: np.ndarray) -> OptState:
        net.check_theta(theta)
        return OptState(0, velocity=net.backend.xp.zeros_like(theta))

    def step(theta: np.ndarray, state: OptState, X: np.ndarray, y: np.ndarray):
        start = time.perf_counter()
        k = state.step
        alpha = step_size_or_raise(hyper.step_size, k)
        X, y = checked_batch(net, k, theta, X, y)  # the step's first host read
        readout = StepReadout(k, net.backend.xp)  # its second, at the end
        loss, g, _ = net.training_pass(theta, X, y, net.training_rng((hyper.seed, k, 1)), validate=False)
        readout.finite("loss", loss)
        readout.finite("gradient", g)
        g = g + hyper.weight_decay * theta
        assert state.velocity is not None
        velocity = hyper.momentum * state.velocity + g
        s = -alpha * velocity
        readout.finite("step", s)
        readout.value("loss", loss)
        readout.value("step_norm2", s @ s)
        read = readout.read()
        elapsed = time.perf_counter() - start
        info = dict(loss=float(read["loss"]), step_norm=math.sqrt(float(read["step_norm2"])), time=dict(forward_backward=elapsed, total=elapsed))
        return theta + s, state._replace(step=k + 1, velocity=velocity), info

    return Optimizer("sgd", hyper, init, step)
