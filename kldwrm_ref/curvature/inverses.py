"""K-FAC matrices and their damped inverses as ``scipy.sparse.linalg.LinearOperator``s
(docs/theory.md §5.2, §5.5).  One class per inverse:

- :class:`EigenDampedInverse`: (G (x) A + eta I)^{-1} in the factors' eigenbases (the authors');
- :class:`FactoredDampedInverse`: ((G + gamma_G I) (x) (A + gamma_A I))^{-1} with pi-damping,
  applied in the eigenbases (four products per block);
- :class:`ExplicitFactoredInverse`: the same matrix applied as (G + gamma_G I)^{-1} V (A + gamma_A I)^{-1}
  with both small inverses formed once per refresh (two products per block);
- :class:`ExactKronSumInverse`: (factored-damped Mbar + alpha B)^{-1} through generalised eigenproblems;
- :class:`FactoredKronSumInverse`: the authors' (Gbar + alpha G) (x) (Abar + alpha A), damped and
  inverted by one of the first three.

Every operator is block diagonal over the :class:`~kldwrm_ref.curvature.kfac.KronBlock`s and
symmetric.  ``eig_floor`` zeroes eigenvalues at or below it (on a copy) before damping is added.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.sparse.linalg import LinearOperator

from kldwrm_ref.backends import Backend
from kldwrm_ref.curvature.kfac import KronBlock
from kldwrm_ref.curvature.linalg import Eigen, one_blas_thread, safe_eigh
from kldwrm_ref.validation import check_choice, check_nonnegative, check_positive

DAMPING_STYLES = ("eigen", "factored", "factored-explicit")
KRON_SUM_MODES = ("exact", "factored")


class SingularCurvatureError(ValueError):
    """The damped K-FAC matrix has a zero eigenvalue (damping 0 with a rank-deficient factor)."""


def block_index(positions: np.ndarray) -> slice | np.ndarray:
    """The block's theta indices as a slice when they are one ascending run (a weight matrix stored
    row-major, as with separate bias blocks): theta[slice] is a view and assigning to it a plain
    copy, where an index array gathers and scatters (0.8 ms per 200k-entry block per product)."""
    if positions.size and positions[-1] - positions[0] + 1 == positions.size and np.all(np.diff(positions) == 1):
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


class BlockDiagonalOperator(LinearOperator):
    """A block-diagonal operator over theta; subclasses map each block's (out x k) matrix V."""

    def __init__(self, blocks: Sequence[KronBlock], n_params: int, backend: Backend):
        self.blocks = list(blocks)
        self.backend = backend
        covered = sum(b.positions.size for b in self.blocks)
        if covered != n_params:
            raise ValueError(f"blocks cover {covered} parameters, expected n_params={n_params}")
        self.indices = [block_index(b.positions) for b in self.blocks]
        super().__init__(dtype=self.blocks[0].A.dtype, shape=(n_params, n_params))

    def apply_block(self, i: int, V: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _matvec(self, v):
        v = np.ravel(v)
        out = np.empty_like(v, dtype=np.result_type(v, self.dtype))
        for i, (block, index) in enumerate(zip(self.blocks, self.indices)):
            out[index] = self.apply_block(i, v[index].reshape(block.G.shape[0], block.A.shape[0])).ravel()
        return out

    def _rmatvec(self, v):
        return self._matvec(v)  # every operator here is symmetric


class KFACOperator(BlockDiagonalOperator):
    """v -> (G (x) A) v per block, i.e. V -> G V A."""

    def apply_block(self, i, V):
        block, mm = self.blocks[i], self.backend.matmul
        return mm(mm(block.G, V), block.A)


def pi_factor(A: np.ndarray, G: np.ndarray) -> float:
    """pi = sqrt((tr A / dim A) / (tr G / dim G)); 1 when a trace is not positive (§5.2)."""
    tr_a, tr_g = np.trace(A) / A.shape[0], np.trace(G) / G.shape[0]
    return float(np.sqrt(tr_a / tr_g)) if tr_a > 0 and tr_g > 0 else 1.0


def pi_damping(A: np.ndarray, G: np.ndarray, damping: float) -> tuple[float, float]:
    """Martens & Grosse (2015) factored damping: gamma_A = pi sqrt(eta), gamma_G = sqrt(eta) / pi
    with pi = :func:`pi_factor`."""
    pi = pi_factor(A, G)
    root = float(np.sqrt(damping))
    return pi * root, root / pi


def floored(values: np.ndarray, floor: float) -> np.ndarray:
    """A copy of ``values`` with entries <= ``floor`` set to 0 (the authors' clean-up keeps only
    eigenvalues strictly above the floor)."""
    return np.where(values <= floor, 0.0, values).astype(values.dtype) if floor > 0 else values


def decompose_factors(blocks: Sequence[KronBlock]) -> list[tuple[Eigen, Eigen]]:
    """(eigh of G, eigh of A) per block, each distinct factor decomposed once: blocks that share a
    factor array (a layer's weight and separate bias blocks share G) share its decomposition.
    LAPACK runs with one thread here (:func:`~kldwrm_ref.curvature.linalg.one_blas_thread`)."""
    done: dict[int, Eigen] = {}

    def eigh(matrix: np.ndarray, name: str) -> Eigen:
        if id(matrix) not in done:
            done[id(matrix)] = safe_eigh(matrix, name)
        return done[id(matrix)]

    with one_blas_thread():
        return [(eigh(b.G, f"{b.name} factor G"), eigh(b.A, f"{b.name} factor A")) for b in blocks]


class _EigenbasisInverse(BlockDiagonalOperator):
    """Shared set-up: eigendecompose every factor once; ``self.scales[i]`` = (d_G, d_A, additive
    damping) with the eigenvalues floored and, for factored damping, shifted; ``self.pis`` the pi
    of every block under factored damping (None under eigen damping)."""

    factored = False

    def __init__(self, blocks: Sequence[KronBlock], n_params: int, damping: float, eig_floor: float, backend: Backend):
        super().__init__(blocks, n_params, backend)
        self.damping = check_nonnegative(damping, "damping")
        self.eig_floor = check_nonnegative(eig_floor, "eig_floor")
        self.eigens = decompose_factors(self.blocks)
        self.scales = []
        pis: list[float] = []
        for block, (eg, ea) in zip(self.blocks, self.eigens):
            d_g, d_a = floored(eg.values, self.eig_floor), floored(ea.values, self.eig_floor)
            if self.factored:
                pis.append(pi_factor(block.A, block.G))
                gamma_a, gamma_g = pi_damping(block.A, block.G, self.damping)
                d_g, d_a, add = d_g + gamma_g, d_a + gamma_a, 0.0
            else:
                add = self.damping
            if np.any(np.outer(d_g, d_a) + add <= 0):
                raise SingularCurvatureError(f"{block.name}: damped K-FAC matrix is singular; use damping > 0")
            self.scales.append((d_g, d_a, add))
        self.pis = pis if self.factored else None

    @property
    def eigenpairs(self) -> list[tuple[Eigen, Eigen]]:
        """(eigh of G, eigh of A) per block: the bases the inverse is applied in."""
        return self.eigens

    def apply_block(self, i, V):
        mm = self.backend.matmul
        eg, ea = self.eigens[i]
        d_g, d_a, add = self.scales[i]
        rotated = mm(mm(eg.vectors.T, V), ea.vectors)
        return mm(mm(eg.vectors, self.backend.eigen_divide(rotated, d_g, d_a, add)), ea.vectors.T)


class EigenDampedInverse(_EigenbasisInverse):
    """(G (x) A + eta I)^{-1}: V -> Q_G [(Q_G^T V Q_A) / (d_G d_A^T + eta)] Q_A^T."""


class FactoredDampedInverse(_EigenbasisInverse):
    """((G + gamma_G I) (x) (A + gamma_A I))^{-1} (:func:`pi_damping`) in the eigenbases.  A
    different matrix from eigen damping: it adds gamma_A G (x) I + gamma_G I (x) A + eta I."""

    factored = True


class ExplicitFactoredInverse(FactoredDampedInverse):
    """The matrix of :class:`FactoredDampedInverse` applied as (G + gamma_G I)^{-1} V (A + gamma_A I)^{-1}."""

    def __init__(self, blocks: Sequence[KronBlock], n_params: int, damping: float, eig_floor: float, backend: Backend):
        super().__init__(blocks, n_params, damping, eig_floor, backend)
        self.explicit = [(_inverse_from_eigen(eg, d_g), _inverse_from_eigen(ea, d_a)) for (eg, ea), (d_g, d_a, _) in zip(self.eigens, self.scales)]

    def apply_block(self, i, V):
        mm = self.backend.matmul
        inverse_g, inverse_a = self.explicit[i]
        return mm(mm(inverse_g, V), inverse_a)


def _inverse_from_eigen(eigen: Eigen, shifted_values: np.ndarray) -> np.ndarray:
    """Q diag(1 / shifted) Q^T: the explicit inverse of a damped factor from its eigenpairs."""
    return (eigen.vectors / shifted_values) @ eigen.vectors.T


_DAMPED = {"eigen": EigenDampedInverse, "factored": FactoredDampedInverse, "factored-explicit": ExplicitFactoredInverse}


def damped_inverse(blocks: Sequence[KronBlock], n_params: int, damping: float, style: str, eig_floor: float, backend: Backend) -> _EigenbasisInverse:
    """The damped K-FAC inverse of ``style`` ("eigen", "factored" or "factored-explicit")."""
    return _DAMPED[check_choice(style, "damping_style", DAMPING_STYLES)](blocks, n_params, damping, eig_floor, backend)


class FactoredKronSumInverse(BlockDiagonalOperator):
    """The authors' Q matrix: (Gbar + alpha G_k) (x) (Abar + alpha A_k), damped with ``style`` and
    inverted by :func:`damped_inverse` (adds the cross terms of docs/theory.md §5.5)."""

    def __init__(self, average_blocks, current_blocks, n_params: int, alpha: float, damping: float, style: str, eig_floor: float, backend: Backend):
        super().__init__(average_blocks, n_params, backend)
        if len(current_blocks) != len(self.blocks):
            raise ValueError("average_blocks and current_blocks must have the same length")
        self.alpha = check_nonnegative(alpha, "alpha")
        sums: dict[tuple[int, int], np.ndarray] = {}

        def summed(average: np.ndarray, current: np.ndarray) -> np.ndarray:  # one array per distinct pair of factors
            key = (id(average), id(current))
            if key not in sums:
                sums[key] = average + alpha * current
            return sums[key]

        summed_blocks = [KronBlock(summed(bar.A, cur.A), summed(bar.G, cur.G), bar.positions, bar.name) for bar, cur in zip(self.blocks, current_blocks)]
        self.inner = damped_inverse(summed_blocks, n_params, damping, style, eig_floor, backend)
        self.pis = self.inner.pis

    @property
    def eigenpairs(self) -> list[tuple[Eigen, Eigen]]:
        """(eigh of Gbar + alpha G_k, eigh of Abar + alpha A_k) per block."""
        return self.inner.eigens

    def apply_block(self, i, V):
        return self.inner.apply_block(i, V)


class ExactKronSumInverse(BlockDiagonalOperator):
    """Inverse of (Gbar + gamma_G I) (x) (Abar + gamma_A I) + alpha G_k (x) A_k (docs/theory.md §5.5):
    with the generalised eigenproblems A_k v = mu (Abar + gamma_A I) v, G_k v = nu (Gbar + gamma_G I) v,
    V -> V_G [(V_G^T V V_A) / (1 + alpha nu mu^T)] V_A^T."""

    def __init__(self, average_blocks, current_blocks, n_params: int, alpha: float, damping: float, backend: Backend):
        super().__init__(average_blocks, n_params, backend)
        if len(current_blocks) != len(self.blocks):
            raise ValueError("average_blocks and current_blocks must have the same length")
        self.alpha = check_nonnegative(alpha, "alpha")
        check_positive(damping, "damping (kron_sum='exact' needs damping > 0)")
        self.general = []
        self.pis = []
        for bar, cur in zip(self.blocks, current_blocks):
            self.pis.append(pi_factor(bar.A, bar.G))
            gamma_a, gamma_g = pi_damping(bar.A, bar.G, damping)
            with one_blas_thread():
                ea = safe_eigh(cur.A, f"{bar.name} Kronecker-sum factor A", bar.A + gamma_a * np.eye(bar.A.shape[0]))
                eg = safe_eigh(cur.G, f"{bar.name} Kronecker-sum factor G", bar.G + gamma_g * np.eye(bar.G.shape[0]))
            self.general.append((eg, ea))

    @property
    def eigenpairs(self) -> list[tuple[Eigen, Eigen]]:
        """(generalised eigenpairs of G_k, of A_k) per block (V_G, V_A normalised as in §5.5)."""
        return self.general

    def apply_block(self, i, V):
        eg, ea = self.general[i]
        mm = self.backend.matmul
        rotated = mm(mm(eg.vectors.T, V), ea.vectors)
        return mm(mm(eg.vectors, self.backend.kron_sum_divide(rotated, eg.values, ea.values, self.alpha)), ea.vectors.T)
