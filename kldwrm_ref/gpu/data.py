"""A data set uploaded to the device once per run; batches are gathered there (docs/gpu.md)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from kldwrm_ref.gpu import kernels
from kldwrm_ref.gpu.transfers import to_device


class DeviceData:
    """(X, y) on the device: X as (n, features) in ``dtype``, y as int64; batches come back in the
    per-sample ``input_shape`` the network takes."""

    def __init__(self, X: np.ndarray, y: np.ndarray, input_shape: Sequence[int], dtype):
        self.n = len(y)
        self.input_shape = tuple(input_shape)
        self.X = to_device(np.reshape(X, (self.n, -1)), dtype)
        self.y = to_device(y, np.int64)

    def batches(self, order: np.ndarray, batch: int) -> Iterator[tuple]:
        """(X_b, y_b) for each full batch of ``order`` (uploaded once: one copy per epoch)."""
        device_order = to_device(order, np.int64)
        for start in range(0, len(order) - batch + 1, batch):
            yield self.batch(device_order, start, batch)

    def batch(self, device_order, start: int, count: int) -> tuple:
        X = kernels.take_rows(self.X, device_order, start, count)
        return X.reshape(count, *self.input_shape), kernels.take_rows(self.y, device_order, start, count)

    def chunks(self, chunk: int) -> Iterator[tuple[slice, object]]:
        """(rows, X rows) over the whole set in order, for evaluation."""
        for start in range(0, self.n, chunk):
            stop = min(start + chunk, self.n)
            yield slice(start, stop), self.X[start:stop].reshape(stop - start, *self.input_shape)
