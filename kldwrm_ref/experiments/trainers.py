"""Where the runner's training loop computes: on the host, or device-resident on a GPU.

A trainer holds theta and the optimiser state between epochs: :meth:`start` takes host ones,
:meth:`run_epoch` takes the steps of one epoch over a row order, :meth:`snapshot` gives host ones
back (for checkpoints) and :meth:`evaluate` scores a split.  :func:`make_trainer` picks the
:class:`DeviceTrainer` (:mod:`kldwrm_ref.gpu`) for ``backend="cuda"`` when the optimiser can run
device-resident, else the :class:`HostTrainer`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kldwrm_ref import optim
from kldwrm_ref.backends import NUMPY
from kldwrm_ref.model import Network, losses


def score(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(summed cross-entropy, as mean times count, and per-example correctness) of logits against labels."""
    return float(losses.cross_entropy(logits, y, NUMPY)[0].mean()) * len(y), np.argmax(logits, axis=1) == y


class HostTrainer:
    """The optimiser's own step on host arrays; a batch is X[rows] of the epoch's order.  The
    evaluation's logits come from the optimiser's network (its backend: the auto backend's Numba
    max-pooling makes the CNN's evaluation 0.77x; the logits equal the NumPy backend's bit for
    bit), its losses from the NumPy reference kernel."""

    def __init__(self, opt: optim.Optimizer, net: Network, batch: int, chunk: int = 10000):
        self.opt, self.batch, self.chunk = opt, batch, chunk
        self.net = net if opt.network is None or opt.backend == "cuda" else opt.network

    def start(self, theta: np.ndarray, state: optim.OptState, X: np.ndarray, y: np.ndarray) -> None:
        self.theta, self.state, self.X, self.y = theta, state, X, y

    def run_epoch(self, order: np.ndarray, on_step) -> None:
        for start in range(0, len(order) - self.batch + 1, self.batch):
            rows = order[start : start + self.batch]
            self.theta, self.state, info = self.opt.step(self.theta, self.state, self.X[rows], self.y[rows])
            on_step(info)

    def snapshot(self) -> tuple[np.ndarray, optim.OptState]:
        return self.theta, self.state

    def evaluate(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float, np.ndarray]:
        """Mean cross-entropy, accuracy and per-example correctness over all of (X, y), in chunks."""
        total, correct = 0.0, np.empty(len(y), dtype=bool)
        for start in range(0, len(y), self.chunk):
            rows = slice(start, start + self.chunk)
            total_part, correct[rows] = score(self.net.logits(self.theta, X[rows]), y[rows])
            total += total_part
        return total / len(y), np.count_nonzero(correct) / len(y), correct


class DeviceTrainer:
    """The device-resident step (docs/gpu.md): the training set is uploaded once per run, each
    epoch's order once per epoch; theta and the state come back to the host only in :meth:`snapshot`."""

    def __init__(self, opt: optim.Optimizer, net: Network, batch: int, chunk: int = 10000):
        from kldwrm_ref import gpu

        self.gpu, self.net, self.batch, self.chunk = gpu, net, batch, chunk
        self.device = gpu.make_device(opt)
        self.uploaded: dict[int, Any] = {}

    def _data(self, X: np.ndarray, y: np.ndarray):
        if id(X) not in self.uploaded:  # each split once per run
            self.uploaded[id(X)] = (X, self.gpu.DeviceData(X, y, self.net.input_shape, self.net.dtype))
        return self.uploaded[id(X)][1]

    def start(self, theta: np.ndarray, state: optim.OptState, X: np.ndarray, y: np.ndarray) -> None:
        self.theta, self.state = self.device.upload(theta, state)
        self.train = self._data(X, y)

    def run_epoch(self, order: np.ndarray, on_step) -> None:
        for X_batch, y_batch in self.train.batches(order, self.batch):
            self.theta, self.state, info = self.device.step(self.theta, self.state, X_batch, y_batch)
            on_step(info)

    def snapshot(self) -> tuple[np.ndarray, optim.OptState]:
        return self.device.download(self.theta, self.state)

    def evaluate(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float, np.ndarray]:
        data = self._data(X, y)
        total, correct = 0.0, np.empty(len(y), dtype=bool)
        for rows, X_chunk in data.chunks(self.chunk):
            logits = self.gpu.to_host(self.device.device_net.forward(self.theta, X_chunk).logits)
            total_part, correct[rows] = score(logits, y[rows])
            total += total_part
        return total / len(y), np.count_nonzero(correct) / len(y), correct


def make_trainer(opt: optim.Optimizer, net: Network, batch: int, log=print) -> HostTrainer | DeviceTrainer:
    """The device-resident trainer for backend "cuda" when ``opt`` supports it, else the host one."""
    if opt.backend != "cuda":
        return HostTrainer(opt, net, batch)
    from kldwrm_ref.gpu import unsupported_reason

    reason = unsupported_reason(opt)
    if reason is None:
        return DeviceTrainer(opt, net, batch)
    log(f"{opt.name}: not device-resident ({reason}); every kernel copies to the GPU and back")
    return HostTrainer(opt, net, batch)
