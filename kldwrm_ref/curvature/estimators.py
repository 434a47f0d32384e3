"""Curvature estimators: the two platforms behind one protocol (kfac-jax style).

An estimator computes the local curvature M_k at (theta_k, batch) - the thing the exponential
average runs over - and turns averaged and current estimates into the operators the update rules
need (docs/theory.md §2, §4.3, §5):

- ``compute(theta, X, y, cache, rng)``: M_k;
- ``inverse(avg, damping)``: (Mbar + eta I)^{-1} (on K-FAC: eigen, factored or explicit damping);
- ``sum_inverse(avg, cur, alpha)``: (Mbar + eta I + alpha B)^{-1}, the Q-KLD-WRM matrix / lambda;
- ``operator(cur)``: v -> B v (undamped).

Every result is an :class:`~kldwrm_ref.curvature.operators.Operator`.  The K-FAC platform runs on
the network's array namespace (``net.backend.xp``); the dense platform is host-only NumPy (small
nets) and refuses another namespace.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np

from kldwrm_ref.curvature.fisher import fisher
from kldwrm_ref.curvature.inverses import ExactKronSumInverse, FactoredKronSumInverse, KFACOperator, damped_inverse
from kldwrm_ref.curvature.kfac import KFACFactors, kfac_factors, kron_blocks
from kldwrm_ref.curvature.linalg import DenseInverse
from kldwrm_ref.curvature.operators import Operator
from kldwrm_ref.model.network import Network, NetworkCache


class Estimator(Protocol):
    @property
    def damping(self) -> float: ...

    @property
    def exact_curvature(self) -> bool:
        """Whether an estimate is the exact Fisher of the network (so it describes the KL's
        Hessian wherever it is evaluated)."""
        ...

    def compute(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray | None, cache: NetworkCache | None, rng: np.random.Generator | None) -> tuple: ...

    def inverse(self, avg: tuple, damping: float | None = None) -> Operator: ...

    def sum_inverse(self, avg: tuple, cur: tuple, alpha: float) -> Operator: ...

    def operator(self, cur: tuple) -> Operator: ...


class DenseEstimator(NamedTuple):
    """The exact platform: M_k = (the dense Fisher on the batch,), exact / mc / empirical; host-only
    NumPy (:func:`~kldwrm_ref.curvature.fisher.fisher` refuses another namespace)."""

    net: Network
    damping: float
    fisher_type: str = "exact"
    samples: int = 1

    @property
    def exact_curvature(self) -> bool:
        return self.fisher_type == "exact"

    def compute(self, theta, X, y, cache, rng) -> tuple[np.ndarray]:
        return (fisher(self.net, theta, X, self.fisher_type, y, self.samples, rng, cache),)

    def inverse(self, avg, damping=None):
        return DenseInverse(avg[0], self.damping if damping is None else damping, "averaged Fisher")

    def sum_inverse(self, avg, cur, alpha):
        return DenseInverse(avg[0] + alpha * cur[0], self.damping, "averaged Fisher + alpha current Fisher")

    def operator(self, cur):
        return _MatVec(cur[0])


class _MatVec(Operator):
    """v -> M v for a dense host matrix M."""

    def __init__(self, matrix: np.ndarray):
        self.matrix = matrix
        self.shape, self.dtype = matrix.shape, matrix.dtype

    def matvec(self, v):
        return self.matrix @ v


class KFACEstimator(NamedTuple):
    """The K-FAC platform: M_k = one :class:`KFACFactors` per layer with parameters."""

    net: Network
    damping: float
    fisher_type: str = "exact"
    samples: int = 1
    bias: str = "joint"
    damping_style: str = "eigen"
    kron_sum: str = "exact"
    eig_floor: float = 0.0

    @property
    def exact_curvature(self) -> bool:
        return False

    def compute(self, theta, X, y, cache, rng) -> tuple[KFACFactors, ...]:
        return kfac_factors(self.net, theta, X, y, self.fisher_type, self.samples, rng, cache)

    def inverse(self, avg, damping=None):
        damping = self.damping if damping is None else damping
        return damped_inverse(kron_blocks(self.net, avg, self.bias), self.net.n_params, damping, self.damping_style, self.eig_floor, self.net.backend)

    def sum_inverse(self, avg, cur, alpha):
        average, current = kron_blocks(self.net, avg, self.bias), kron_blocks(self.net, cur, self.bias)
        if self.kron_sum == "factored":
            return FactoredKronSumInverse(average, current, self.net.n_params, alpha, self.damping, self.damping_style, self.eig_floor, self.net.backend)
        return ExactKronSumInverse(average, current, self.net.n_params, alpha, self.damping, self.net.backend)

    def operator(self, cur):
        return KFACOperator(kron_blocks(self.net, cur, self.bias), self.net.n_params, self.net.backend)
