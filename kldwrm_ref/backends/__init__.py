"""The seam between the engine and the array kernels it calls.

A :class:`Backend` is a named bundle of kernels with the signatures and results of the NumPy
twins in :mod:`kldwrm_ref.backends.reference`, plus the matrix product.  It is resolved once from a
name (:func:`get_backend`) and then passed around as an object:

- ``"numpy"``: the reference twins and NumPy's BLAS;
- ``"numba"``: Numba-CPU kernels (:mod:`kldwrm_ref.backends.numba_cpu`), BLAS for products;
- ``"cuda"``: numba-cuda kernels and a tiled shared-memory product (:mod:`kldwrm_ref.backends.cuda`);
  needs an NVIDIA GPU, or ``NUMBA_ENABLE_CUDASIM=1`` for the (slow) simulator;
- ``"auto"`` (the default of every public entry point): per operation the faster of numpy and
  numba as measured by ``kldwrm bench kernels`` on the CPU (:data:`FASTEST_ON_CPU`).

The Numba and CUDA modules are imported on first use only: importing numba's compilers costs
seconds, and the CUDA module needs a GPU or the simulator.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from kldwrm_ref.backends import reference

BACKENDS = ("numpy", "numba", "cuda", "auto")
DEFAULT_BACKEND = "auto"
OPERATIONS = ("softmax_cross_entropy", "sample_labels", "fisher_cotangents", "per_sample_rows", "ea_update", "eigen_divide", "kron_sum_divide", "kl_and_grad", "im2col", "col2im", "max_pool", "max_unpool", "matmul")
_MODULES = {"numba": "kldwrm_ref.backends.numba_cpu", "cuda": "kldwrm_ref.backends.cuda"}


class Backend(NamedTuple):
    name: str
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
    max_pool: Callable
    max_unpool: Callable
    matmul: Callable

    def __reduce__(self):
        """Pickle by name (checkpoints hold the name, not the kernels)."""
        return get_backend, (self.name,)


NUMPY = Backend._make(["numpy", *(getattr(reference, op) for op in OPERATIONS[:-1]), np.matmul])

# The faster backend per operation at MNIST sizes on the 2-core reference machine (README,
# ``kldwrm bench kernels``); "auto" uses these.
FASTEST_ON_CPU = dict(
    softmax_cross_entropy="numba",
    sample_labels="numba",
    fisher_cotangents="numba",
    per_sample_rows="numba",
    ea_update="numba",
    eigen_divide="numpy",
    kron_sum_divide="numpy",
    kl_and_grad="numba",
    im2col="numba",
    col2im="numba",
    max_pool="numba",
    max_unpool="numba",
    matmul="numpy",
)

_BUILT: dict[str, Backend] = {"numpy": NUMPY}


def get_backend(name: str | Backend = DEFAULT_BACKEND) -> Backend:
    """The backend called ``name`` ("numpy", "numba", "cuda" or "auto"); a Backend passes through."""
    if isinstance(name, Backend):
        return name
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    if name not in _BUILT:
        if name == "auto":
            _BUILT[name] = Backend(name, **{op: getattr(get_backend(FASTEST_ON_CPU[op]), op) for op in OPERATIONS})
        else:
            module = importlib.import_module(_MODULES[name])
            _BUILT[name] = Backend._make([name, *(getattr(module, op) for op in OPERATIONS)])
    if name == "cuda":
        importlib.import_module(_MODULES["cuda"]).require_gpu()
    return _BUILT[name]
