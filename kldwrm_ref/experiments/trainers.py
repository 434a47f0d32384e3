"""The runner's training loop on the arrays of the optimiser's backend (docs/gpu.md).

A :class:`Trainer` holds theta and the optimiser state between epochs in the backend's array
namespace (NumPy on the CPU, CuPy on the GPU): :meth:`Trainer.start` takes host ones and moves
them there, together with the training set (once per run); :meth:`Trainer.run_epoch` takes the
steps of one epoch over a row order, gathering each batch where the data lives;
:meth:`Trainer.snapshot` gives host copies back (for checkpoints) and :meth:`Trainer.evaluate`
scores a split, reading the logits back in chunks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kldwrm_ref import optim
from kldwrm_ref.arrays import is_numpy_namespace, to_numpy
from kldwrm_ref.backends import NUMPY
from kldwrm_ref.model import Network, losses


def score(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(summed cross-entropy, as mean times count, and per-example correctness) of logits against labels."""
    return float(losses.cross_entropy(logits, y, NUMPY)[0].mean()) * len(y), np.argmax(logits, axis=1) == y


def map_arrays(fn, tree: Any) -> Any:
    """Apply ``fn`` to every array leaf of nested tuples / NamedTuples (None and scalars pass)."""
    if isinstance(tree, tuple):
        mapped = [map_arrays(fn, leaf) for leaf in tree]
        return type(tree)(*mapped) if hasattr(tree, "_fields") else tuple(mapped)
    return fn(tree) if hasattr(tree, "shape") and hasattr(tree, "dtype") else tree


EVAL_ROWS_HOST = 512  # rows per evaluation pass on the CPU: the paper CNN scored 8.5 us a row, against 14.6 in passes of 10,000
EVAL_ROWS_DEVICE = 10000  # on a GPU, few large passes (each is a chain of kernel launches)


class Trainer:
    """The optimiser's own step on arrays of its network's backend.  The evaluation's logits come
    from that network (the auto backend's Numba max-pooling makes the CNN's evaluation 0.77x; the
    logits equal the NumPy backend's bit for bit), its losses from the NumPy reference kernel, in
    passes of ``chunk`` rows (default :data:`EVAL_ROWS_HOST` on the CPU, where a pass's activations
    then stay in cache, and :data:`EVAL_ROWS_DEVICE` on a GPU)."""

    def __init__(self, opt: optim.Optimizer, net: Network, batch: int, chunk: int | None = None):
        self.opt, self.batch = opt, batch
        self.net = net if opt.network is None else opt.network
        self.backend = self.net.backend
        self.chunk = chunk or (EVAL_ROWS_HOST if is_numpy_namespace(self.backend.xp) else EVAL_ROWS_DEVICE)
        self.resident: dict[int, tuple[np.ndarray, Any, Any]] = {}

    def _on_device(self, X: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        """(X, y) in the backend's namespace: each split moved once per run (no copy on NumPy)."""
        if id(X) not in self.resident:
            self.resident[id(X)] = (X, self.backend.asarray(X), self.backend.asarray(y))
        _, X_dev, y_dev = self.resident[id(X)]
        return X_dev, y_dev

    def start(self, theta: np.ndarray, state: optim.OptState, X: np.ndarray, y: np.ndarray) -> None:
        self.theta = self.backend.asarray(theta)
        self.state = map_arrays(self.backend.asarray, state)
        self.X, self.y = self._on_device(X, y)

    def run_epoch(self, order: np.ndarray, on_step) -> None:
        xp = self.backend.xp
        order_dev = self.backend.asarray(order)
        for start in range(0, len(order) - self.batch + 1, self.batch):
            rows = order_dev[start : start + self.batch]
            X_batch = xp.take(self.X, rows, axis=0)
            y_batch = xp.take(self.y, rows, axis=0)
            self.theta, self.state, info = self.opt.step(self.theta, self.state, X_batch, y_batch)
            on_step(info)

    def snapshot(self) -> tuple[np.ndarray, optim.OptState]:
        return to_numpy(self.theta), map_arrays(to_numpy, self.state._replace(inverse=None))

    def evaluate(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float, np.ndarray]:
        """Mean cross-entropy, accuracy and per-example correctness over all of (X, y), in chunks."""
        X_dev, _ = self._on_device(X, y)
        total, correct = 0.0, np.empty(len(y), dtype=bool)
        for start in range(0, len(y), self.chunk):
            rows = slice(start, start + self.chunk)
            total_part, correct[rows] = score(to_numpy(self.net.logits(self.theta, X_dev[rows])), y[rows])
            total += total_part
        return total / len(y), np.count_nonzero(correct) / len(y), correct


