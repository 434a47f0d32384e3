"""The seam between the curvature engine and the array kernels it calls.

A backend is a named bundle of the kernels in :mod:`kldwrm_ref.ops` (same signatures, same
results), selected by name wherever a ``backend=`` argument is taken.  ``"numpy"`` is the
reference and, for now, the only one; ``"numba"`` (CPU) and ``"cuda"`` (numba-cuda) will plug
in here with the same fields.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from kldwrm_ref import ops

BACKENDS = ("numpy", "numba", "cuda")


class Backend(NamedTuple):
    name: str
    softmax_cross_entropy: Callable
    sample_labels: Callable
    fisher_cotangents: Callable
    ea_update: Callable
    eigen_divide: Callable
    kron_sum_divide: Callable
    kl_and_grad: Callable

    def __reduce__(self):
        """Pickle by name (checkpoints hold the name, not the kernels)."""
        return get_backend, (self.name,)


NUMPY = Backend(
    "numpy",
    ops.softmax_cross_entropy,
    ops.sample_labels,
    ops.fisher_cotangents,
    ops.ea_update,
    ops.eigen_divide,
    ops.kron_sum_divide,
    ops.kl_and_grad,
)


def get_backend(name: str | Backend = "numpy") -> Backend:
    """The backend called ``name`` ("numpy", "numba" or "cuda"); a Backend passes through."""
    if isinstance(name, Backend):
        return name
    if name == "numpy":
        return NUMPY
    if name in ("numba", "cuda"):
        raise NotImplementedError(f"backend {name!r} is planned (Numba-CPU / numba-cuda kernels) but not available yet; use backend='numpy'")
    raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
