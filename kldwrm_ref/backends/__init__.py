"""The seam between the engine and the array kernels it calls.

A :class:`Backend` is a named bundle of kernels with the signatures and results of the NumPy
twins in :mod:`kldwrm_ref.backends.reference`, the array namespace ``xp`` they take and return
(docs/gpu.md), and the matrix product.  It is resolved once from a name (:func:`get_backend`) and
then passed around as an object:

- ``"numpy"``: the reference twins and NumPy's BLAS;
- ``"numba"``: Numba-CPU kernels (:mod:`kldwrm_ref.backends.numba_cpu`), BLAS for products;
- ``"cuda"``: every array on the GPU as a CuPy array; numba-cuda kernels launched on them without
  a copy (:mod:`kldwrm_ref.backends.cuda`) and cuBLAS products; under ``NUMBA_ENABLE_CUDASIM=1``
  (tests, no GPU) the same kernels run on numba's simulator over NumPy arrays;
- ``"auto"`` (the default of every public entry point): on the CPU, per operation by a stated
  rule (:data:`AUTO_NUMPY`): NumPy where it already makes a single pass over the data (the two
  eigenbasis divides) and BLAS for products; Numba's one compiled pass wherever NumPy would make
  several passes with full-size temporaries (softmax rows, cotangent rows, label sampling,
  per-sample rows, the EA update, KL rows, im2col / col2im, max-pooling and its adjoint, the
  direct convolution and its weight gradient).  The convolutions' lowered rows are a NumPy copy of
  one strided view of the input on the Numba backend (the NumPy twin stacks the k taps).

:func:`host_hop_backend` serves any other array-API namespace (``array-api-strict`` in the tests)
with the reference twins through a host copy: the step itself is namespace-clean, the kernels
are per device by design.  The Numba and CUDA modules are imported on first use only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from kldwrm_ref.arrays import NUMPY_NAMESPACE, from_numpy, to_numpy
from kldwrm_ref.backends import reference
from kldwrm_ref.backends.probe import GPUUnavailableError, require_gpu_stack

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "NUMPY", "OPERATIONS", "Backend", "GPUUnavailableError", "get_backend", "host_hop_backend"]

BACKENDS = ("numpy", "numba", "cuda", "auto")
DEFAULT_BACKEND = "auto"
OPERATIONS = (
    *("softmax_cross_entropy", "sample_labels", "fisher_cotangents", "per_sample_rows", "ea_update", "eigen_divide", "kron_sum_divide", "kl_and_grad"),
    *("im2col", "col2im", "lower_rows", "conv2d", "conv2d_grads", "max_pool", "max_unpool", "matmul"),
)
_MODULES = {"numba": "kldwrm_ref.backends.numba_cpu", "cuda": "kldwrm_ref.backends.cuda"}


class Backend(NamedTuple):
    name: str
    xp: Any  # the array namespace the kernels take and return
    softmax_cross_entropy: Callable
    sample_labels: Callable
    fisher_cotangents: Callable
    per_sample_rows: Callable
    ea_update: Callable
    eigen_divide: Callable
    kron_sum_divide: Callable
    kl_and_grad: Callable
    im2col: Callable
    col2im: Callable
    lower_rows: Callable
    conv2d: Callable
    conv2d_grads: Callable
    max_pool: Callable
    max_unpool: Callable
    matmul: Callable

    def asarray(self, x: Any, dtype: Any = None) -> Any:
        """``x`` (host data) as an array of this backend's namespace (no copy on NumPy)."""
        return from_numpy(self.xp, x, dtype)

    def __reduce__(self):
        """Pickle by name (checkpoints hold the name, not the kernels)."""
        return get_backend, (self.name,)


NUMPY = Backend._make(["numpy", NUMPY_NAMESPACE, *(getattr(reference, op) for op in OPERATIONS[:-1]), np.matmul])

# "auto" on the CPU: the operations NumPy already computes in a single pass over the data (or in
# BLAS); every other operation takes Numba's kernel (module docstring).
AUTO_NUMPY = frozenset({"eigen_divide", "kron_sum_divide", "matmul"})

_BUILT: dict[str, Backend] = {"numpy": NUMPY}


def get_backend(name: str | Backend = DEFAULT_BACKEND) -> Backend:
    """The backend called ``name`` ("numpy", "numba", "cuda" or "auto"); a Backend passes through."""
    if isinstance(name, Backend):
        return name
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    if name == "cuda":
        require_gpu_stack()
    if name not in _BUILT:
        if name == "auto":
            _BUILT[name] = Backend(name, NUMPY_NAMESPACE, **{op: getattr(get_backend("numpy" if op in AUTO_NUMPY else "numba"), op) for op in OPERATIONS})
        else:
            module = importlib.import_module(_MODULES[name])
            _BUILT[name] = Backend._make([name, module.namespace(), *(getattr(module, op) for op in OPERATIONS)])
    return _BUILT[name]


def host_hop_backend(xp: Any) -> Backend:
    """Kernels for arrays of any array-API namespace ``xp``: each reference twin runs on a host
    copy of its operands and its results come back as ``xp`` arrays (``out`` arguments are
    written back); products are ``xp.matmul``.  Correct everywhere, fast nowhere: it proves
    that the engine around the kernels uses nothing but the standard."""

    def hop(op: str) -> Callable:
        twin = getattr(reference, op)

        def call(*args, **kwargs):
            result = twin(*(to_numpy(a) if _is_array(a) else a for a in args), **{k: to_numpy(v) if _is_array(v) else v for k, v in kwargs.items()})
            out = args[2] if op == "per_sample_rows" else kwargs.get("out")
            if out is not None:  # the kernels with an ``out`` argument write into it
                out[...] = from_numpy(xp, result)
                return out
            if isinstance(result, tuple):
                return tuple(from_numpy(xp, r) for r in result)
            return from_numpy(xp, result)

        return call

    return Backend(f"host-hop:{getattr(xp, '__name__', 'xp')}", xp, **{op: hop(op) for op in OPERATIONS[:-1]}, matmul=xp.matmul)


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, np.dtype)
