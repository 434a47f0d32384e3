"""Every host <-> device copy of the device-resident path goes through here, and is counted.

:func:`to_device` and :func:`to_host` are the only copies :mod:`kldwrm_ref.gpu` makes (kernel
launches refuse host arrays: :func:`kldwrm_ref.backends.cuda.launch`), so :func:`counting` sees
all traffic of a step: the tests assert that a step between refreshes copies only a few scalars.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
from numba import cuda


class Transfer(NamedTuple):
    """One copy: ``direction`` "to_device" or "to_host", its size in bytes and the array's shape."""

    direction: str
    nbytes: int
    shape: tuple[int, ...]


_LOGS: list[list[Transfer]] = []


def _note(direction: str, array: np.ndarray) -> None:
    for log in _LOGS:
        log.append(Transfer(direction, int(array.nbytes), tuple(array.shape)))


@contextmanager
def counting() -> Iterator[list[Transfer]]:
    """Collect every transfer made inside the ``with`` block into the yielded list."""
    log: list[Transfer] = []
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def to_device(array, dtype=None):
    """A device copy of a host array (C-contiguous, cast to ``dtype`` when given)."""
    host = np.ascontiguousarray(array, dtype=dtype)
    _note("to_device", host)
    return cuda.to_device(host)


def to_host(device_array) -> np.ndarray:
    """A host copy of a device array."""
    host = device_array.copy_to_host()
    _note("to_host", host)
    return host


def is_device_array(value) -> bool:
    """Whether ``value`` is a (real or simulated) CUDA device array."""
    return not isinstance(value, np.ndarray) and hasattr(value, "copy_to_host")
