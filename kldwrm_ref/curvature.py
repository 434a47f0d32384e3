"""Curvature *estimates* on the two platforms, separate from the update rules (kfac-jax style).

An estimate computes the local curvature M_k at (theta_k, batch) as a tuple of arrays (what the
exponential average runs over) and turns averaged / current tuples into the operators the update
rules need:

- ``inverse(avg, damping=None)``: (Mbar + eta I)^{-1} (eigen damping on K-FAC, or factored);
  ``damping`` overrides eta;
- ``sum_inverse(avg, cur, alpha)``: (Mbar + eta I + alpha B)^{-1} (the Q-KLD-WRM matrix / lambda);
- ``operator(cur)``: v -> B v.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kldwrm_ref.fisher import fisher
from kldwrm_ref.kfac import KFACInverse, KFACOperator, Factors, KronSumInverse, kfac_factors, kron_blocks
from kldwrm_ref.linalg import DenseInverse
from kldwrm_ref.mlp import MLP


class DenseCurvature(NamedTuple):
    """The exact platform: M_k = dense Fisher (exact / mc / empirical) on the batch."""

    mlp: MLP
    damping: float
    fisher_type: str = "exact"
    samples: int = 1
    backend: str = "numpy"

    def compute(self, theta, X, y, cache, rng) -> tuple[np.ndarray, ...]:
        return (fisher(self.mlp, theta, X, self.fisher_type, y, self.samples, rng, self.backend),)

    def inverse(self, avg, damping=None):
        return DenseInverse(avg[0], self.damping if damping is None else damping, "averaged Fisher")

    def sum_inverse(self, avg, cur, alpha):
        return DenseInverse(avg[0] + alpha * cur[0], self.damping, "averaged Fisher + alpha current Fisher")

    def operator(self, cur):
        return _MatVec(cur[0])


class _MatVec(NamedTuple):
    matrix: np.ndarray

    def matvec(self, v):
        return self.matrix @ v


class KFACCurvature(NamedTuple):
    """The K-FAC platform: M_k = per-layer factors (A_0, G_0, A_1, G_1, ...)."""

    mlp: MLP
    damping: float
    fisher_type: str = "exact"
    samples: int = 1
    bias: str = "joint"
    damping_style: str = "eigen"
    kron_sum: str = "exact"
    eig_floor: float = 0.0
    backend: str = "numpy"

    def compute(self, theta, X, y, cache, rng) -> tuple[np.ndarray, ...]:
        factors = kfac_factors(self.mlp, theta, X, y, self.fisher_type, self.samples, rng, cache, self.backend)
        return tuple(m for f in factors for m in f)

    def blocks(self, flat):
        factors = [Factors(flat[2 * l], flat[2 * l + 1]) for l in range(len(flat) // 2)]
        return kron_blocks(self.mlp, factors, self.bias)

    def inverse(self, avg, damping=None):
        damping = self.damping if damping is None else damping
        return KFACInverse(self.blocks(avg), self.mlp.n_params, damping, self.damping_style, self.eig_floor, self.backend)

    def sum_inverse(self, avg, cur, alpha):
        return KronSumInverse(self.blocks(avg), self.blocks(cur), self.mlp.n_params, alpha, self.damping, self.kron_sum, self.damping_style, self.eig_floor, self.backend)

    def operator(self, cur):
        return KFACOperator(self.blocks(cur), self.mlp.n_params, self.backend)
