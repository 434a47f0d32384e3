"""Array namespaces: the engine is written once against the array API standard (docs/gpu.md).

Every array the step touches lives in one namespace - NumPy on the CPU, CuPy on the GPU, or any
other array-API library (``array-api-strict`` in the tests) - obtained from the arrays through
``array-api-compat``, as SciPy and scikit-learn do.  The engine never calls ``numpy`` on an array
of the step; what must cross to the host (eigendecompositions with a host fallback, Python
scalars that decide control flow) goes through :func:`to_numpy` and :func:`host_floats`, which a
test can count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_cupy_namespace, is_numpy_namespace

__all__ = ["array_namespace", "counting_transfers", "from_numpy", "host_arrays", "host_floats", "is_cupy_namespace", "is_numpy_namespace", "namespace_name", "to_numpy"]

NUMPY_NAMESPACE = array_namespace(np.empty(0))
_transfers: list[tuple[str, int]] | None = None


@contextmanager
def counting_transfers() -> Iterator[list[tuple[str, int]]]:
    """Within the context, every copy :func:`to_numpy` and :func:`from_numpy` make between the host
    and another namespace is logged as ("to host" | "to device", bytes) in the yielded list."""
    global _transfers
    outer, _transfers = _transfers, []
    try:
        yield _transfers
    finally:
        _transfers = outer


def _log(direction: str, nbytes: int) -> None:
    if _transfers is not None:
        _transfers.append((direction, int(nbytes)))


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy copy of ``x`` (no copy when it already is a NumPy array)."""
    if isinstance(x, np.ndarray | np.generic):  # NumPy's scalars too (a reduction of a 0-d array is one)
        return np.asarray(x)
    host = x.get() if hasattr(x, "get") and callable(x.get) else np.from_dlpack(x)  # CuPy: device to host
    _log("to host", host.nbytes)
    return host


def from_numpy(xp: Any, x: Any, dtype: Any = None) -> Any:
    """``x`` (a NumPy array or a Python value) as an array of namespace ``xp``."""
    if is_numpy_namespace(xp):
        return np.asarray(x, dtype=dtype)
    if dtype is not None and isinstance(dtype, np.dtype | type):
        dtype = getattr(xp, np.dtype(dtype).name)
    if isinstance(x, np.ndarray):
        _log("to device", x.nbytes)
    return xp.asarray(x, dtype=dtype)


def host_arrays(xp: Any, *arrays: Any) -> list[np.ndarray]:
    """Arrays of any shape (or Python numbers) read to the host as float64 NumPy arrays in one
    transfer: on a GPU each separate read is a synchronisation, so a step batches its reads."""
    if is_numpy_namespace(xp):
        return [np.asarray(a, dtype=np.float64) for a in arrays]
    flat = [xp.asarray(float(a), dtype=xp.float64) if isinstance(a, int | float) else xp.astype(a, xp.float64) for a in arrays]
    host = to_numpy(xp.concat([xp.reshape(a, (-1,)) for a in flat]))
    out, start = [], 0
    for a in flat:
        size = math.prod(a.shape)
        out.append(host[start : start + size].reshape(tuple(a.shape)))
        start += size
    return out


def host_floats(xp: Any, *scalars: Any) -> list[float]:
    """Several 0-d arrays (or Python numbers) read to the host as floats in one transfer
    (:func:`host_arrays`)."""
    return [float(a) for a in host_arrays(xp, *scalars)]


def namespace_name(xp: Any) -> str:
    """A short name of the namespace for messages ("numpy", "cupy", "array_api_strict", ...)."""
    return getattr(xp, "__name__", repr(xp)).replace("array_api_compat.", "")
