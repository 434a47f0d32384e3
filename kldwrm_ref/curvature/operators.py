"""Curvature matrices as small linear operators (curvlinops style).

The engine only ever applies an operator to a vector (``matvec``), on whatever array namespace
the vector lives in (docs/gpu.md).  :class:`Operator` is that protocol with ``@`` for vectors and
stacked columns, and :meth:`Operator.to_scipy` exports a host ``scipy.sparse.linalg.LinearOperator``
for users and for the ``op @ eye == dense`` tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator

from kldwrm_ref.arrays import array_namespace, from_numpy, to_numpy


class Operator:
    """A square linear operator on theta of size ``shape[0]``; subclasses define :meth:`matvec`.

    ``xp`` is the namespace of the vectors it applies to (None: NumPy); ``dtype`` a dtype of it."""

    shape: tuple[int, int]
    dtype: Any
    xp: Any = None

    def matvec(self, v: Any) -> Any:
        raise NotImplementedError

    def matmat(self, V: Any) -> Any:
        """The operator applied to every column of V (n, m)."""
        xp = array_namespace(V)
        return xp.stack([self.matvec(V[:, j]) for j in range(V.shape[1])], axis=1)

    def __matmul__(self, x: Any) -> Any:
        if x.ndim == 1:
            return self.matvec(x)
        if x.ndim == 2:
            return self.matmat(x)
        raise ValueError(f"an operator applies to 1-D or 2-D arrays, got shape {x.shape}")

    def to_scipy(self, xp: Any = None) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` taking and returning NumPy arrays; vectors are
        moved to namespace ``xp`` (default: the operator's own, :attr:`xp`) for each product.
        Every operator here is symmetric."""
        xp = self.xp if xp is None else xp
        host_dtype = np.dtype(self.dtype) if xp is None else to_numpy(xp.zeros(0, dtype=self.dtype)).dtype

        def apply(v: np.ndarray) -> np.ndarray:
            x = np.ravel(v).astype(host_dtype, copy=False)
            return to_numpy(self.matvec(x if xp is None else from_numpy(xp, x)))

        return LinearOperator(self.shape, matvec=apply, rmatvec=apply, dtype=host_dtype)
