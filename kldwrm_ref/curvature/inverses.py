"""K-FAC matrices and their damped inverses as :class:`~kldwrm_ref.curvature.operators.Operator`s
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
symmetric, and runs on the array namespace of its backend (``backend.xp``): the factors, their
eigenpairs and the vectors it applies to are arrays of that namespace; only the block positions
and the Python scalars (pi, the dampings) live on the host.  ``eig_floor`` zeroes eigenvalues at
or below it (on a copy) before damping is added.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kldwrm_ref.arrays import array_namespace, to_numpy
from kldwrm_ref.backends import Backend
from kldwrm_ref.curvature.kfac import KronBlock
from kldwrm_ref.curvature.linalg import Eigen, one_blas_thread, safe_eigh
from kldwrm_ref.curvature.operators import Operator
from kldwrm_ref.validation import check_choice, check_nonnegative, check_positive

DAMPING_STYLES = ("eigen", "factored", "factored-explicit")
KRON_SUM_MODES = ("exact", "factored")


class SingularCurvatureError(ValueError):
    """The damped K-FAC matrix has a zero eigenvalue (damping 0 with a rank-deficient factor)."""


def block_index(positions: np.ndarray) -> slice | np.ndarray:
    """The block's theta indices as a slice when they are one ascending run (a weight matrix stored
    row-major, as with separate bias blocks): theta[slice] is a view, where an index array
    gathers (0.8 ms per 200k-entry block per product)."""
    if positions.size and positions[-1] - positions[0] + 1 == positions.size and np.all(np.diff(positions) == 1):
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


class BlockDiagonalOperator(Operator):
    """A block-diagonal operator over theta; subclasses map each block's (out x k) matrix V.

    A product reads each block's part of v by slicing (one ascending run) or by ``xp.take`` of its
    positions (uploaded once), maps it, and concatenates the results; when the blocks are not
    contiguous runs in theta order, one ``xp.take`` with the inverse permutation puts the
    concatenation back in theta order (no scatter, so no writes through index arrays)."""

    def __init__(self, blocks: Sequence[KronBlock], n_params: int, backend: Backend):
        self.blocks = list(blocks)
        self.backend = backend
        self.xp = backend.xp
        covered = sum(b.positions.size for b in self.blocks)
        if covered != n_params:
            raise ValueError(f"blocks cover {covered} parameters, expected n_params={n_params}")
        order, identity = np.concatenate([b.positions for b in self.blocks]), np.arange(n_params)
        inverse = identity  # the permutation that puts the blocks' concatenation back in theta order
        if not np.array_equal(order, identity):  # found in one pass (a sort took 8 ms at 200k parameters; QE builds an operator every step)
            if order.min() < 0 or order.max() >= n_params:
                raise ValueError(f"the blocks' positions must lie in [0, {n_params}), got [{order.min()}, {order.max()}]")
            inverse = np.full(n_params, -1, dtype=np.int64)
            inverse[order] = identity
            if np.any(inverse[order] != identity):  # a position listed twice keeps only its last entry
                raise ValueError(f"the blocks' positions must cover each of the n_params={n_params} parameters once")
        self.indices = [block_index(b.positions) for b in self.blocks]
        self.gathers = [index if isinstance(index, slice) else backend.asarray(index) for index in self.indices]
        in_order = inverse is identity and all(isinstance(index, slice) for index in self.indices)
        self.unpermute = None if in_order else backend.asarray(inverse)
        self.shape, self.dtype = (n_params, n_params), self.blocks[0].A.dtype

    def apply_block(self, i: int, V: Any) -> Any:
        raise NotImplementedError

    def matvec(self, v):
        xp = self.xp
        parts = []
        for i, (block, gather) in enumerate(zip(self.blocks, self.gathers)):
            part = v[gather] if isinstance(gather, slice) else xp.take(v, gather)
            parts.append(xp.reshape(self.apply_block(i, xp.reshape(part, (block.G.shape[0], block.A.shape[0]))), (-1,)))
        out = xp.concat(parts)
        return out if self.unpermute is None else xp.take(out, self.unpermute)


class KFACOperator(BlockDiagonalOperator):
    """v -> (G (x) A) v per block, i.e. V -> G V A."""

    def apply_block(self, i, V):
        block, mm = self.blocks[i], self.backend.matmul
        return mm(mm(block.G, V), block.A)


def mean_traces(pairs: Sequence[tuple[Any, Any]]) -> np.ndarray:
    """(tr A / dim A, tr G / dim G) of every pair of factors (A, G): (len(pairs), 2) on the host,
    in the factors' dtype, read in one transfer."""
    xp = array_namespace(pairs[0][0])
    traces = [xp.linalg.trace(m) / m.shape[0] for pair in pairs for m in pair]
    return np.reshape(to_numpy(xp.stack(traces)), (len(pairs), 2))


def pi_from_traces(tr_a: Any, tr_g: Any) -> float:
    """pi = sqrt(tr_a / tr_g) from mean traces; 1 when one is not positive (§5.2)."""
    return float(np.sqrt(tr_a / tr_g)) if tr_a > 0 and tr_g > 0 else 1.0


def pi_factor(A: Any, G: Any) -> float:
    """pi = sqrt((tr A / dim A) / (tr G / dim G)); 1 when a trace is not positive (§5.2)."""
    return pi_from_traces(*mean_traces([(A, G)])[0])


def factored_gammas(pi: float, damping: float) -> tuple[float, float]:
    """(gamma_A, gamma_G) = (pi sqrt(eta), sqrt(eta) / pi)."""
    root = float(np.sqrt(damping))
    return pi * root, root / pi


def pi_damping(A: Any, G: Any, damping: float) -> tuple[float, float]:
    """Martens & Grosse (2015) factored damping: gamma_A = pi sqrt(eta), gamma_G = sqrt(eta) / pi
    with pi = :func:`pi_factor`."""
    return factored_gammas(pi_factor(A, G), damping)


def floored(values: Any, floor: float) -> Any:
    """A copy of ``values`` with entries <= ``floor`` set to 0 (the authors' clean-up keeps only
    eigenvalues strictly above the floor)."""
    if floor <= 0:
        return values
    xp = array_namespace(values)
    return xp.where(values <= floor, xp.asarray(0.0, dtype=values.dtype), values)


def decompose_factors(blocks: Sequence[KronBlock]) -> list[tuple[Eigen, Eigen]]:
    """(eigh of G, eigh of A) per block, each distinct factor decomposed once: blocks that share a
    factor array (a layer's weight and separate bias blocks share G) share its decomposition.
    LAPACK runs with one thread here (:func:`~kldwrm_ref.curvature.linalg.one_blas_thread`)."""
    done: dict[int, Eigen] = {}

    def eigh(matrix: Any, name: str) -> Eigen:
        if id(matrix) not in done:
            done[id(matrix)] = safe_eigh(matrix, name)
        return done[id(matrix)]

    with one_blas_thread():
        return [(eigh(b.G, f"{b.name} factor G"), eigh(b.A, f"{b.name} factor A")) for b in blocks]


class _EigenbasisInverse(BlockDiagonalOperator):
    """Shared set-up: eigendecompose every factor once; ``self.scales[i]`` = (d_G, d_A, additive
    damping) with the eigenvalues floored and, for factored damping, shifted; ``self.pis`` the pi
    of every block under factored damping (None under eigen damping).  The traces behind pi and
    the singularity flags each cross to the host once per construction."""

    factored = False

    def __init__(self, blocks: Sequence[KronBlock], n_params: int, damping: float, eig_floor: float, backend: Backend):
        super().__init__(blocks, n_params, backend)
        self.damping = check_nonnegative(damping, "damping")
        self.eig_floor = check_nonnegative(eig_floor, "eig_floor")
        self.eigens = decompose_factors(self.blocks)
        xp = self.xp
        self.pis = [pi_from_traces(tr_a, tr_g) for tr_a, tr_g in mean_traces([(b.A, b.G) for b in self.blocks])] if self.factored else None
        self.scales = []
        singular = []
        for i, (eg, ea) in enumerate(self.eigens):
            d_g, d_a = floored(eg.values, self.eig_floor), floored(ea.values, self.eig_floor)
            if self.pis is not None:
                gamma_a, gamma_g = factored_gammas(self.pis[i], self.damping)
                d_g, d_a, add = d_g + gamma_g, d_a + gamma_a, 0.0
            else:
                add = self.damping
            singular.append(xp.any(d_g[:, None] * d_a[None, :] + add <= 0))
            self.scales.append((d_g, d_a, add))
        for block, flag in zip(self.blocks, to_numpy(xp.stack(singular))):
            if flag:
                raise SingularCurvatureError(f"{block.name}: damped K-FAC matrix is singular; use damping > 0")

    @property
    def eigenpairs(self) -> list[tuple[Eigen, Eigen]]:
        """(eigh of G, eigh of A) per block: the bases the inverse is applied in."""
        return self.eigens

    def apply_block(self, i, V):
        mm = self.backend.matmul
        eg, ea = self.eigens[i]
        d_g, d_a, add = self.scales[i]
        if ea.vectors.shape[0] == 1:  # A is 1 x 1 (a separate bias block's [1]): Q_A = [+-1] cancels, two products fewer
            return mm(eg.vectors, self.backend.eigen_divide(mm(eg.vectors.T, V), d_g, d_a, add))
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


def _inverse_from_eigen(eigen: Eigen, shifted_values: Any) -> Any:
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
        sums: dict[tuple[int, int], Any] = {}

        def summed(average: Any, current: Any) -> Any:  # one array per distinct pair of factors
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
    V -> V_G [(V_G^T V V_A) / (1 + alpha nu mu^T)] V_A^T.  The generalised problems are solved on
    the host (:func:`~kldwrm_ref.curvature.linalg.safe_eigh`); their pairs come back to ``backend.xp``."""

    def __init__(self, average_blocks, current_blocks, n_params: int, alpha: float, damping: float, backend: Backend):
        super().__init__(average_blocks, n_params, backend)
        if len(current_blocks) != len(self.blocks):
            raise ValueError("average_blocks and current_blocks must have the same length")
        self.alpha = check_nonnegative(alpha, "alpha")
        check_positive(damping, "damping (kron_sum='exact' needs damping > 0)")
        self.general = []
        self.pis = [pi_from_traces(tr_a, tr_g) for tr_a, tr_g in mean_traces([(b.A, b.G) for b in self.blocks])]
        for bar, cur, pi in zip(self.blocks, current_blocks, self.pis):
            gamma_a, gamma_g = factored_gammas(pi, damping)
            bar_a, bar_g = to_numpy(bar.A), to_numpy(bar.G)  # the damped averages B of A v = mu B v, built on the host
            with one_blas_thread():
                ea = safe_eigh(cur.A, f"{bar.name} Kronecker-sum factor A", bar_a + gamma_a * np.eye(bar_a.shape[0], dtype=bar_a.dtype))
                eg = safe_eigh(cur.G, f"{bar.name} Kronecker-sum factor G", bar_g + gamma_g * np.eye(bar_g.shape[0], dtype=bar_g.dtype))
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
