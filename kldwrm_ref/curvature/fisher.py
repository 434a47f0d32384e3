"""The dense Fisher of a network and its matrix-free operator (docs/theory.md §1.2-§1.3).

F(theta) = mean_x J(x)^T H(x) J(x) with J = d logits / d theta and

- ``"exact"``:     H = diag(pi) - pi pi^T (expectation over y ~ p_theta; equals the GGN),
- ``"mc"``:        H = (1/S) sum_s (pi - e_{y_s})(pi - e_{y_s})^T, y_s ~ p_theta(.|x),
- ``"empirical"``: H = (pi - e_y)(pi - e_y)^T with the true label y.

Each H is a sum of rank-one terms r r^T; backpropagating every r ("cotangent") gives the rows of
U with F = U^T U, so the dense build is one matrix product.  The K-FAC factors
(:mod:`kldwrm_ref.curvature.kfac`) use the same cotangents.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kldwrm_ref.arrays import is_numpy_namespace
from kldwrm_ref.backends import Backend
from kldwrm_ref.curvature.operators import Operator
from kldwrm_ref.model import losses
from kldwrm_ref.model.network import Network, NetworkCache
from kldwrm_ref.validation import check_choice, check_positive_int

FISHER_TYPES = ("exact", "mc", "empirical")


def fisher_cotangents(
    probs: Any,
    backend: Backend,
    fisher_type: str = "exact",
    y: Any = None,
    samples: int = 1,
    rng: np.random.Generator | None = None,
) -> Any:
    """Cotangents r (R, N, C) with H(x_i) = sum_r r[r, i] r[r, i]^T for the chosen Fisher, in the
    namespace of ``backend`` (``probs`` and ``y`` are arrays of it, or host arrays on NumPy).

    exact: R = C, r_c = sqrt(pi_c) (e_c - pi); mc: R = S, (pi - e_{y_s}) / sqrt(S) with the
    uniforms behind y_s drawn on the host from ``rng``; empirical: R = 1, pi - e_y.
    """
    fisher_type = check_choice(fisher_type, "fisher_type", FISHER_TYPES)
    xp = backend.xp
    n, c = probs.shape
    if fisher_type == "exact":  # (N, C, C) -> rep-major (C, N, C), laid out contiguously
        return xp.reshape(xp.reshape(xp.permute_dims(backend.fisher_cotangents(probs), (1, 0, 2)), (c * n, c)), (c, n, c))
    if fisher_type == "empirical":
        if y is None:
            raise ValueError("y (true labels) is required for fisher_type='empirical'")
        return xp.expand_dims(probs - _one_hot(xp, backend.asarray(y), c, probs.dtype), axis=0)
    samples = check_positive_int(samples, "samples")
    if rng is None:
        raise ValueError("rng (a numpy Generator) is required for fisher_type='mc'")
    labels = backend.sample_labels(probs, backend.asarray(rng.random((samples, n))))
    return (probs[None, ...] - _one_hot(xp, labels, c, probs.dtype)) / math.sqrt(samples)


def _one_hot(xp: Any, labels: Any, n_classes: int, dtype: Any) -> Any:
    """e_y for integer labels of any shape: (..., n_classes) of ``dtype``."""
    return xp.astype(labels[..., None] == xp.arange(n_classes, dtype=labels.dtype), dtype)


def cotangent_rows(net: Network, cache: NetworkCache, fisher_type: str, y=None, samples: int = 1, rng=None) -> Any:
    """The Fisher's cotangents of the cached batch stacked rep-major: (R * N, C), in the network's
    namespace (the rows K-FAC backpropagates at every refresh)."""
    if y is not None:
        y = net.check_labels(y, cache.logits.shape[0])
    cot = fisher_cotangents(losses.probabilities(cache.logits), net.backend, fisher_type, y, samples, rng)
    return net.backend.xp.reshape(cot, (-1, cot.shape[2]))


def _require_numpy(net: Network, what: str) -> None:
    """The dense Fisher is host-only NumPy (small nets): refuse another namespace in one line."""
    if not is_numpy_namespace(net.backend.xp):
        raise ValueError(f"{what} runs on the host with NumPy arrays only (the dense platform is for small nets); backend {net.backend.name!r} works on another array namespace: use the K-FAC platform or backend='numpy'")


def fisher_sqrt(net: Network, theta: np.ndarray, X: np.ndarray, fisher_type: str = "exact", y=None, samples: int = 1, rng=None, cache: NetworkCache | None = None) -> np.ndarray:
    """U (R*N, n) with F = U^T U: rows are per-sample gradients of each cotangent / sqrt(N);
    ``cache`` reuses a forward pass of the same (theta, X) (and its dropout masks).  Host-only NumPy."""
    _require_numpy(net, "the dense Fisher")
    if cache is None:
        cache = net.forward(theta, X)
    rows = cotangent_rows(net, cache, fisher_type, y, samples, rng)
    cotangents = net.backward(theta, cache, rows)
    return net.per_sample_gradients(cache, cotangents) / math.sqrt(cache.logits.shape[0])  # a Python float keeps the dtype


def fisher(net: Network, theta: np.ndarray, X: np.ndarray, fisher_type: str = "exact", y=None, samples: int = 1, rng=None, cache: NetworkCache | None = None) -> np.ndarray:
    """Dense n x n Fisher F = U^T U, mean over the rows of X (module docstring); host-only NumPy."""
    U = fisher_sqrt(net, theta, X, fisher_type, y, samples, rng, cache)
    return net.backend.matmul(U.T, U)


class FisherOperator(Operator):
    """Matrix-free F v = mean_i J_i^T H_i (J_i v): forward-mode J v, then backprop.

    The cotangents (and for MC the sampled labels) are drawn once at construction, so the
    operator is a fixed symmetric matrix (``to_scipy()`` for scipy's solvers).  Host-only NumPy,
    as the dense Fisher.
    """

    def __init__(self, net: Network, theta: np.ndarray, X: np.ndarray, fisher_type: str = "exact", y=None, samples: int = 1, rng=None):
        _require_numpy(net, "FisherOperator")
        self.net, self.theta = net, theta
        self.cache = net.forward(theta, X)
        if y is not None:
            y = net.check_labels(y, self.cache.logits.shape[0])
        self.cotangents = fisher_cotangents(losses.probabilities(self.cache.logits), net.backend, fisher_type, y, samples, rng)
        self.n_rows = self.cache.logits.shape[0]
        self.shape, self.dtype = (net.n_params, net.n_params), net.dtype

    def matvec(self, v):
        jv = self.net.jvp(self.theta, self.cache, v)  # (N, C)
        weights = np.einsum("rnc,nc->rn", self.cotangents, jv)  # r^T J v
        hjv = np.einsum("rn,rnc->nc", weights, self.cotangents)  # H J v
        return self.net.vjp(self.theta, self.cache, hjv) / self.n_rows


def kl_divergence(net: Network, theta_ref: np.ndarray, theta: np.ndarray, X: np.ndarray, kind: str = "forward") -> tuple[float, np.ndarray]:
    """D(theta_ref || theta) = mean_x KL(p_ref || p_theta) (or the symmetric KL) and its gradient in theta."""
    ref_logits = net.logits(theta_ref, X)
    cache = net.forward(theta, X)
    values, dlogits = losses.kl(ref_logits, cache.logits, kind, net.backend)
    return float(net.backend.xp.mean(values)), net.vjp(theta, cache, dlogits) / cache.logits.shape[0]
