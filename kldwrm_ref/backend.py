"""The seam between the engine and the array kernels it calls.

A backend is a named bundle of the kernels of :mod:`kldwrm_ref.ops` (same signatures, same
results) plus the matrix product, selected by name wherever a ``backend=`` argument is taken:

- ``"numpy"``: the reference twins (:mod:`kldwrm_ref.ops`) and NumPy's BLAS;
- ``"numba"``: Numba-CPU kernels (:mod:`kldwrm_ref.numba_ops`), BLAS for products;
- ``"cuda"``: numba-cuda kernels and a tiled shared-memory product (:mod:`kldwrm_ref.cuda_ops`);
  needs an NVIDIA GPU, or ``NUMBA_ENABLE_CUDASIM=1`` for the (slow) simulator.

``"auto"`` picks, per operation, the faster of numpy and numba as measured by
``kldwrm bench kernels`` on the CPU (:data:`FASTEST_ON_CPU`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from kldwrm_ref import ops

BACKENDS = ("numpy", "numba", "cuda", "auto")
OPERATIONS = ("softmax_cross_entropy", "sample_labels", "fisher_cotangents", "per_sample_rows", "ea_update", "eigen_divide", "kron_sum_divide", "kl_and_grad", "matmul")


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
    matmul: Callable

    def __reduce__(self):
        """Pickle by name (checkpoints hold the name, not the kernels)."""
        return get_backend, (self.name,)


NUMPY = Backend("numpy", *(getattr(ops, op) for op in OPERATIONS[:-1]), np.matmul)

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
    matmul="numpy",
)

_BUILT: dict[str, Backend] = {"numpy": NUMPY}


def _from_module(name: str, module) -> Backend:
    return Backend(name, *(getattr(module, op) for op in OPERATIONS))


def get_backend(name: str | Backend = "numpy") -> Backend:
    """The backend called ``name`` ("numpy", "numba", "cuda" or "auto"); a Backend passes through."""
    if isinstance(name, Backend):
        return name
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    if name == "cuda":
        from kldwrm_ref import cuda_ops

        cuda_ops.require_gpu()
    if name not in _BUILT:
        if name == "numba":
            from kldwrm_ref import numba_ops

            _BUILT[name] = _from_module(name, numba_ops)
        elif name == "cuda":
            from kldwrm_ref import cuda_ops

            _BUILT[name] = _from_module(name, cuda_ops)
        else:
            chosen = {op: getattr(get_backend(FASTEST_ON_CPU[op]), op) for op in OPERATIONS}
            _BUILT[name] = Backend(name, **chosen)
    return _BUILT[name]
