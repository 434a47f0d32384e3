"""Robust symmetric eigendecompositions and dense damped solves.

:func:`safe_eigh` serves every array namespace: NumPy arrays go to SciPy's LAPACK drivers on the
host; any other namespace (CuPy on a GPU) decomposes the plain problem on its own device and falls
back to the host when that fails or returns non-finite values (the ``safe_psd_eigh`` pattern of
kfac-jax); the generalised problem is always solved on the host.  :class:`DenseInverse` belongs to
the dense platform and is host-only NumPy.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any, NamedTuple

import numpy as np
import scipy.linalg
from threadpoolctl import ThreadpoolController

from kldwrm_ref.arrays import array_namespace, from_numpy, is_numpy_namespace, namespace_name, to_numpy
from kldwrm_ref.curvature.operators import Operator

_THREADPOOLS = ThreadpoolController()


def one_blas_thread():
    """A context in which every BLAS/LAPACK pool runs one thread (threadpoolctl).

    The eigendecompositions of a refresh run in it: NumPy and SciPy each load their own OpenBLAS,
    and right after the step's products NumPy's threads still spin-wait, so on a 2-core machine
    a 2-thread LAPACK call inside the step ran 1.7x slower than alone, and the refresh's
    decompositions took 2.4x as long as with one thread (docs/performance.md, "What bounds each step")."""
    return _THREADPOOLS.limit(limits=1, user_api="blas")


class CurvatureError(RuntimeError):
    """A curvature matrix could not be decomposed; the message names it and where it was saved."""


class Eigen(NamedTuple):
    """A = vectors @ diag(values) @ vectors.T (values ascending), arrays of the matrix's namespace."""

    values: Any
    vectors: Any


def symmetrize(matrix: Any) -> Any:
    return 0.5 * (matrix + matrix.T)


def save_offending(name: str, **matrices: np.ndarray) -> str:
    """Save matrices that broke a decomposition to a fresh .npz in the temp dir; return its path."""
    fd, path = tempfile.mkstemp(prefix=f"kldwrm-{name.replace(' ', '_')}-", suffix=".npz")
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, allow_pickle=False, **matrices)
    return path


# What a failed decomposition raises: LAPACK's LinAlgError (a ValueError), a solver library's
# runtime error (cuSOLVER), or an arithmetic error.
_EIGH_ERRORS = (ValueError, RuntimeError, ArithmeticError)


def safe_eigh(matrix: Any, name: str, other: Any = None, force_on_host: bool = False) -> Eigen:
    """eigh of the symmetrised ``matrix`` (generalised: A v = mu B v with ``other`` = B SPD),
    returned in the namespace of ``matrix``.

    NumPy: :func:`host_eigh` (SciPy's divide-and-conquer drivers).  Any other
    namespace: the plain problem by ``xp.linalg.eigh`` on the device, unless ``force_on_host``;
    when that raises or returns non-finite eigenvalues (warning), and for the generalised problem,
    :func:`host_eigh` on host copies, its results moved back to the namespace.
    """
    xp = array_namespace(matrix)
    if is_numpy_namespace(xp):
        return host_eigh(matrix, name, other)
    if other is None and not force_on_host:
        try:
            values, vectors = xp.linalg.eigh(symmetrize(matrix))
            if bool(xp.all(xp.isfinite(values))):
                return Eigen(values, vectors)
        except _EIGH_ERRORS:
            pass
        warnings.warn(f"eigh of {name} failed on {namespace_name(xp)}; retrying on the host", RuntimeWarning, stacklevel=2)
    host = host_eigh(to_numpy(matrix), name, None if other is None else to_numpy(other))
    return Eigen(from_numpy(xp, host.values), from_numpy(xp, host.vectors))


def host_eigh(matrix: np.ndarray, name: str, other: np.ndarray | None = None) -> Eigen:
    """:func:`safe_eigh` on NumPy arrays: scipy.linalg.eigh with the divide-and-conquer driver.

    Checks finiteness; on failure retries in float64 with jitter 1e-10 * mean|diag| (warning);
    if that fails too, raises CurvatureError naming ``name`` and the .npz holding the matrices.
    """
    sym = symmetrize(matrix)
    oth = None if other is None else symmetrize(other)
    if not np.all(np.isfinite(sym)) or (oth is not None and not np.all(np.isfinite(oth))):
        path = save_offending(name, matrix=matrix, **({} if other is None else {"other": other}))
        raise CurvatureError(f"{name} has non-finite entries; saved to {path}")
    try:  # divide and conquer (evd / gvd): 2-3x faster than the default MRRR driver with vectors
        values, vectors = scipy.linalg.eigh(sym, oth, driver="evd" if oth is None else "gvd")
        if np.all(np.isfinite(values)):
            return Eigen(values, vectors)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError, ValueError):
        pass
    warnings.warn(f"eigh of {name} failed; retrying in float64 with jitter", RuntimeWarning, stacklevel=3)
    sym64 = sym.astype(np.float64)
    jitter = 1e-10 * max(float(np.mean(np.abs(np.diag(sym64)))), 1e-30)
    eye = np.eye(sym64.shape[0])
    try:
        oth64 = None if oth is None else oth.astype(np.float64) + jitter * eye
        values, vectors = scipy.linalg.eigh(sym64 + jitter * eye, oth64)
        if np.all(np.isfinite(values)):
            return Eigen(values.astype(matrix.dtype), vectors.astype(matrix.dtype))
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError, ValueError):
        pass
    path = save_offending(name, matrix=matrix, **({} if other is None else {"other": other}))
    raise CurvatureError(f"eigendecomposition of {name} failed even with jitter in float64; saved to {path}")


class DenseInverse(Operator):
    """(M + damping I)^{-1} of a dense SPD matrix M by Cholesky; ``damped`` is M + damping I.

    Host-only NumPy, as the whole dense platform (small nets).  The factorisation runs with one
    BLAS thread (:func:`one_blas_thread`): right after the Fisher's product a 970 x 970 Cholesky
    took 20.8 ms with two threads and 12.2 ms with one (8.1 ms alone), and with one its result
    no longer depends on the machine's core count."""

    def __init__(self, matrix: np.ndarray, damping: float = 0.0, name: str = "curvature"):
        self.damped = symmetrize(matrix) + damping * np.eye(matrix.shape[0], dtype=matrix.dtype)
        if not np.all(np.isfinite(self.damped)):
            raise CurvatureError(f"{name} has non-finite entries")
        try:
            with one_blas_thread():
                self.factor = scipy.linalg.cho_factor(self.damped)
        except np.linalg.LinAlgError as exc:
            path = save_offending(name, matrix=self.damped)
            raise CurvatureError(f"{name} + damping is not positive definite (Cholesky failed); saved to {path}") from exc
        self.shape, self.dtype = matrix.shape, matrix.dtype

    def matvec(self, v):
        return scipy.linalg.cho_solve(self.factor, v)

    def matmat(self, V):
        return scipy.linalg.cho_solve(self.factor, V)
