"""K-FAC curvature platform (THEORY.md section 5).

Per dense layer with inputs a and pre-activations u, the Fisher block of [W | b] (row-major) is
approximated by G (x) A with A = mean abar abar^T (abar = [a; 1]) and G = E delta delta^T,
delta = d(-log p(y|x))/du per sample (y expected, sampled or the true label).

A *block* pairs (G, A) with the positions in theta of its row-major (out x k) parameter matrix,
which absorbs the permutation between [W | b] and theta's W-then-b layout.  Bias handling:
"joint" (homogeneous coordinate, one block per layer) or "separate" (the authors': W gets
G (x) A over the plain inputs, b gets G (x) [1]).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from scipy.sparse.linalg import LinearOperator

from kldwrm_ref.backend import get_backend
from kldwrm_ref.fisher import fisher_cotangents, probabilities
from kldwrm_ref.linalg import safe_eigh
from kldwrm_ref.mlp import MLP, ForwardCache
from kldwrm_ref.validation import check_choice, check_finite, check_nonnegative, check_positive

BIAS_MODES = ("joint", "separate")
DAMPING_STYLES = ("eigen", "factored", "factored-explicit")
KRON_SUM_MODES = ("exact", "factored")


class Factors(NamedTuple):
    """One layer's K-FAC factors: A ((in+1) x (in+1), homogeneous input) and G (out x out)."""

    A: np.ndarray
    G: np.ndarray


class KronBlock(NamedTuple):
    """G (x) A acting on the row-major (out x k) matrix theta[index].reshape(out, k)."""

    G: np.ndarray
    A: np.ndarray
    index: np.ndarray
    name: str


def kfac_factors(
    mlp: MLP,
    theta: np.ndarray,
    X: np.ndarray,
    y: np.ndarray | None = None,
    fisher_type: str = "exact",
    samples: int = 1,
    rng: np.random.Generator | None = None,
    cache: ForwardCache | None = None,
    backend="numpy",
) -> list[Factors]:
    """Per-layer (A, G): A = mean_x abar abar^T, G = mean_x sum_r delta_r delta_r^T.

    The cotangents r are those of :func:`kldwrm_ref.fisher.fisher_cotangents`, so for a batch of
    one input and fisher_type="exact", G (x) A is exactly that layer's block of the Fisher.
    ``cache`` reuses a forward pass of the same (theta, X).
    """
    if cache is None:
        cache = mlp.forward(theta, X)
    if y is not None:
        y = mlp.check_labels(y, cache.logits.shape[0])
    cot = fisher_cotangents(probabilities(cache), fisher_type, y, samples, rng, backend)
    n_cot, n_rows, n_classes = cot.shape
    tiled = cache if n_cot == 1 else ForwardCache(
        [np.tile(a, (n_cot, 1)) for a in cache.inputs], [np.tile(u, (n_cot, 1)) for u in cache.preacts]
    )
    deltas = mlp.backward_deltas(theta, tiled, cot.reshape(n_cot * n_rows, n_classes))
    matmul = get_backend(backend).matmul
    factors = []
    for l, a in enumerate(cache.inputs):
        A = np.empty((a.shape[1] + 1, a.shape[1] + 1), dtype=a.dtype)
        A[:-1, :-1] = matmul(a.T, a)
        colsum = a.sum(axis=0)
        A[:-1, -1] = colsum
        A[-1, :-1] = colsum
        A[-1, -1] = n_rows
        A /= n_rows
        G = matmul(deltas[l].T, deltas[l]) / n_rows
        check_finite(f"layer {l} factor A", A)
        check_finite(f"layer {l} factor G", G)
        factors.append(Factors(A, G))
    return factors


def kron_blocks(mlp: MLP, factors: Sequence[Factors], bias: str = "joint") -> list[KronBlock]:
    """Blocks over theta for the given factors (module docstring explains ``bias``)."""
    bias = check_choice(bias, "bias", BIAS_MODES)
    if len(factors) != mlp.n_layers:
        raise ValueError(f"factors must hold one (A, G) per layer ({mlp.n_layers}), got {len(factors)}")
    blocks = []
    for l, ((A, G), (out, inp)) in enumerate(zip(factors, mlp.layer_shapes)):
        if A.shape != (inp + 1, inp + 1) or G.shape != (out, out):
            raise ValueError(f"layer {l}: expected A {(inp + 1, inp + 1)} and G {(out, out)}, got {A.shape} and {G.shape}")
        start = mlp.offsets[l]
        w_index = start + np.arange(out * inp).reshape(out, inp)
        b_index = start + out * inp + np.arange(out)
        if bias == "joint":
            index = np.concatenate([w_index, b_index[:, None]], axis=1).ravel()
            blocks.append(KronBlock(G, A, index, f"layer {l}"))
        else:
            blocks.append(KronBlock(G, A[:-1, :-1], w_index.ravel(), f"layer {l} weight"))
            blocks.append(KronBlock(G, A[-1:, -1:], b_index, f"layer {l} bias"))
    return blocks


def kron_dense(blocks: Sequence[KronBlock], n_params: int) -> np.ndarray:
    """The block-diagonal K-FAC matrix assembled densely in theta layout (tests, small nets)."""
    dense = np.zeros((n_params, n_params), dtype=blocks[0].A.dtype)
    for block in blocks:
        dense[np.ix_(block.index, block.index)] = np.kron(block.G, block.A)
    return dense


def _block_matrix(block: KronBlock, v: np.ndarray) -> np.ndarray:
    return v[block.index].reshape(block.G.shape[0], block.A.shape[0])


class _BlockOperator(LinearOperator):
    """A block-diagonal operator over theta; subclasses map each block's (out x k) matrix."""

    def __init__(self, blocks: Sequence[KronBlock], n_params: int, backend="numpy"):
        self.blocks = list(blocks)
        self.backend = get_backend(backend)
        covered = sum(b.index.size for b in self.blocks)
        if covered != n_params:
            raise ValueError(f"blocks cover {covered} parameters, expected n_params={n_params}")
        super().__init__(dtype=self.blocks[0].A.dtype, shape=(n_params, n_params))

    def _apply_block(self, i: int, V: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _matvec(self, v):
        v = np.ravel(v)
        out = np.empty_like(v, dtype=np.result_type(v, self.dtype))
        for i, block in enumerate(self.blocks):
            out[block.index] = self._apply_block(i, _block_matrix(block, v)).ravel()
        return out

    def _rmatvec(self, v):
        return self._matvec(v)  # every operator here is symmetric


class KFACOperator(_BlockOperator):
    """v -> (G (x) A) v per block, i.e. V -> G V A."""

    def _apply_block(self, i, V):
        block = self.blocks[i]
        return self.backend.matmul(self.backend.matmul(block.G, V), block.A)


def pi_damping(A: np.ndarray, G: np.ndarray, damping: float) -> tuple[float, float]:
    """Martens & Grosse (2015) factored damping: gamma_A = pi sqrt(eta), gamma_G = sqrt(eta) / pi,
    pi = sqrt((tr A / dim A) / (tr G / dim G)); pi = 1 when a trace is not positive."""
    tr_a, tr_g = np.trace(A) / A.shape[0], np.trace(G) / G.shape[0]
    pi = float(np.sqrt(tr_a / tr_g)) if tr_a > 0 and tr_g > 0 else 1.0
    root = float(np.sqrt(damping))
    return pi * root, root / pi


def floored(values: np.ndarray, floor: float) -> np.ndarray:
    """A copy of ``values`` with entries <= ``floor`` set to 0 (the authors' clean-up keeps only
    eigenvalues strictly above the floor)."""
    return np.where(values <= floor, 0.0, values).astype(values.dtype) if floor > 0 else values


class KFACInverse(_BlockOperator):
    """Damped inverse of a K-FAC matrix from cached eigendecompositions A = Q_A d_A Q_A^T, G = ...

    style="eigen":    (G (x) A + eta I)^{-1}: V -> Q_G [(Q_G^T V Q_A) / (d_G d_A^T + eta)] Q_A^T.
    style="factored": ((G + gamma_G I) (x) (A + gamma_A I))^{-1} with pi-damping (:func:`pi_damping`),
    applied in the eigenbasis (four products per block).
    style="factored-explicit": the same matrix, applied as (G + gamma_G I)^{-1} V (A + gamma_A I)^{-1}
    with both inverses formed once per refresh (two products per block).  Note that factored
    damping is a different matrix from eigen damping: it adds the cross terms
    gamma_A G (x) I + gamma_G I (x) A + eta I.
    ``eig_floor`` zeroes eigenvalues at or below it (on a copy) before damping is added.
    """

    def __init__(self, blocks: Sequence[KronBlock], n_params: int, damping: float, style: str = "eigen", eig_floor: float = 0.0, backend="numpy"):
        super().__init__(blocks, n_params, backend)
        self.damping = check_nonnegative(damping, "damping")
        self.style = check_choice(style, "style", DAMPING_STYLES)
        self.eig_floor = check_nonnegative(eig_floor, "eig_floor")
        self.eigens = [(safe_eigh(b.G, f"{b.name} factor G"), safe_eigh(b.A, f"{b.name} factor A")) for b in self.blocks]
        self.scales = []  # per block: (d_G, d_A, additive damping) with d's floored and shifted
        for block, (eg, ea) in zip(self.blocks, self.eigens):
            d_g, d_a = floored(eg.values, self.eig_floor), floored(ea.values, self.eig_floor)
            if self.style != "eigen":
                gamma_a, gamma_g = pi_damping(block.A, block.G, self.damping)
                d_g, d_a, add = d_g + gamma_g, d_a + gamma_a, 0.0
            else:
                add = self.damping
            if np.any(np.outer(d_g, d_a) + add <= 0):
                raise ValueError(f"{block.name}: damped K-FAC matrix is singular; use damping > 0")
            self.scales.append((d_g, d_a, add))

        # factored-explicit: (G + gamma_G I)^{-1} and (A + gamma_A I)^{-1} formed once per refresh
        self.explicit = [
            (_inverse_from_eigen(eg, d_g), _inverse_from_eigen(ea, d_a))
            for (eg, ea), (d_g, d_a, _) in zip(self.eigens, self.scales)
        ] if self.style == "factored-explicit" else None

    def _apply_block(self, i, V):
        mm = self.backend.matmul
        if self.explicit is not None:
            inverse_g, inverse_a = self.explicit[i]
            return mm(mm(inverse_g, V), inverse_a)
        eg, ea = self.eigens[i]
        d_g, d_a, add = self.scales[i]
        rotated = mm(mm(eg.vectors.T, V), ea.vectors)
        return mm(mm(eg.vectors, self.backend.eigen_divide(rotated, d_g, d_a, add)), ea.vectors.T)


def _inverse_from_eigen(eigen, shifted_values: np.ndarray) -> np.ndarray:
    """Q diag(1 / shifted) Q^T: the explicit inverse of a damped factor from its eigenpairs."""
    return (eigen.vectors / shifted_values) @ eigen.vectors.T


class KronSumInverse(_BlockOperator):
    """Inverse of (damped EA K-FAC) + alpha (current K-FAC): the Q-KLD-WRM matrix (THEORY 5).

    mode="exact": Mbar damped in factored form, (Gbar + gamma_G I) (x) (Abar + gamma_A I), plus
    alpha G_k (x) A_k, inverted exactly through the generalised eigenproblems
    A_k v = mu (Abar + gamma_A I) v, G_k v = nu (Gbar + gamma_G I) v:
    X = V_G [(V_G^T V V_A) / (1 + alpha nu mu^T)] V_A^T.
    mode="factored" (the authors'): (Gbar + alpha G_k) (x) (Abar + alpha A_k), damped with
    ``style`` and inverted by :class:`KFACInverse` (adds the cross terms, see THEORY 5).
    """

    def __init__(self, average_blocks, current_blocks, n_params: int, alpha: float, damping: float, mode: str = "exact", style: str = "eigen", eig_floor: float = 0.0, backend="numpy"):
        super().__init__(average_blocks, n_params, backend)
        self.alpha = check_nonnegative(alpha, "alpha")
        self.mode = check_choice(mode, "kron_sum", KRON_SUM_MODES)
        if len(current_blocks) != len(self.blocks):
            raise ValueError("average_blocks and current_blocks must have the same length")
        if self.mode == "factored":
            summed = [
                KronBlock(bar.G + alpha * cur.G, bar.A + alpha * cur.A, bar.index, bar.name)
                for bar, cur in zip(self.blocks, current_blocks)
            ]
            self.inner = KFACInverse(summed, n_params, damping, style, eig_floor, backend)
            return
        check_positive(damping, "damping (kron_sum='exact' needs damping > 0)")
        self.general = []
        for bar, cur in zip(self.blocks, current_blocks):
            gamma_a, gamma_g = pi_damping(bar.A, bar.G, damping)
            ea = safe_eigh(cur.A, f"{bar.name} Kronecker-sum factor A", bar.A + gamma_a * np.eye(bar.A.shape[0]))
            eg = safe_eigh(cur.G, f"{bar.name} Kronecker-sum factor G", bar.G + gamma_g * np.eye(bar.G.shape[0]))
            self.general.append((eg, ea))

    def _apply_block(self, i, V):
        if self.mode == "factored":
            return self.inner._apply_block(i, V)
        eg, ea = self.general[i]
        mm = self.backend.matmul
        rotated = mm(mm(eg.vectors.T, V), ea.vectors)
        return mm(mm(eg.vectors, self.backend.kron_sum_divide(rotated, eg.values, ea.values, self.alpha)), ea.vectors.T)

