"""Exact ("dense") curvature platform: the Fisher of a softmax MLP (THEORY.md section 1).

F(theta) = mean_x J(x)^T H(x) J(x) with J = d logits / d theta and

- ``"exact"``:     H = diag(pi) - pi pi^T (expectation over y ~ p_theta; equals the GGN),
- ``"mc"``:        H = (1/S) sum_s (pi - e_{y_s})(pi - e_{y_s})^T, y_s ~ p_theta(.|x),
- ``"empirical"``: H = (pi - e_y)(pi - e_y)^T with the true label y.

Each H is a sum of rank-one terms r r^T; backpropagating every r ("cotangent") gives the rows of
U with F = U^T U, so the dense build is one matrix product.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse.linalg import LinearOperator

from kldwrm_ref import ops
from kldwrm_ref.backend import get_backend
from kldwrm_ref.mlp import MLP, ForwardCache
from kldwrm_ref.validation import check_choice, check_finite, check_positive_int

FISHER_TYPES = ("exact", "mc", "empirical")


def fisher_cotangents(
    probs: np.ndarray,
    fisher_type: str = "exact",
    y: np.ndarray | None = None,
    samples: int = 1,
    rng: np.random.Generator | None = None,
    backend="numpy",
) -> np.ndarray:
    """Cotangents r (R, N, C) with H(x_i) = sum_r r[r, i] r[r, i]^T for the chosen Fisher.

    exact: R = C, r_c = sqrt(pi_c) (e_c - pi); mc: R = S, (pi - e_{y_s}) / sqrt(S);
    empirical: R = 1, pi - e_y.
    """
    fisher_type = check_choice(fisher_type, "fisher_type", FISHER_TYPES)
    be = get_backend(backend)
    if fisher_type == "exact":
        return np.ascontiguousarray(be.fisher_cotangents(probs).transpose(1, 0, 2))
    if fisher_type == "empirical":
        if y is None:
            raise ValueError("y (true labels) is required for fisher_type='empirical'")
        onehot = np.zeros_like(probs)
        onehot[np.arange(len(y)), y] = 1.0
        return (probs - onehot)[None]
    samples = check_positive_int(samples, "samples")
    if rng is None:
        raise ValueError("rng (a numpy Generator) is required for fisher_type='mc'")
    labels = be.sample_labels(probs, rng.random((samples, probs.shape[0])))
    cot = np.repeat(probs[None], samples, axis=0)
    rows = np.arange(probs.shape[0])
    for s in range(samples):
        cot[s, rows, labels[s]] -= 1.0
    return cot / np.sqrt(samples)


def probabilities(cache: ForwardCache) -> np.ndarray:
    return np.exp(ops.log_softmax(cache.logits))


def fisher_sqrt(mlp: MLP, theta: np.ndarray, X: np.ndarray, fisher_type: str = "exact", y=None, samples: int = 1, rng=None, backend="numpy") -> np.ndarray:
    """U (R*N, n) with F = U^T U: rows are per-sample gradients of each cotangent / sqrt(N)."""
    cache = mlp.forward(theta, X)
    if y is not None:
        y = mlp.check_labels(y, X.shape[0])
    cot = fisher_cotangents(probabilities(cache), fisher_type, y, samples, rng, backend)
    n_cot, n_rows, n_classes = cot.shape
    stacked = cot.reshape(n_cot * n_rows, n_classes)
    tiled = ForwardCache([np.tile(a, (n_cot, 1)) for a in cache.inputs], [np.tile(u, (n_cot, 1)) for u in cache.preacts])
    deltas = mlp.backward_deltas(theta, tiled, stacked)
    return mlp.per_sample_gradients(cache, deltas) / np.sqrt(n_rows)


def fisher(mlp: MLP, theta: np.ndarray, X: np.ndarray, fisher_type: str = "exact", y=None, samples: int = 1, rng=None, backend="numpy") -> np.ndarray:
    """Dense n x n Fisher F = U^T U, mean over the rows of X (module docstring)."""
    U = fisher_sqrt(mlp, theta, X, fisher_type, y, samples, rng, backend)
    F = get_backend(backend).matmul(U.T, U)
    check_finite("Fisher", F)
    return F


class FisherOperator(LinearOperator):
    """Matrix-free F v = mean_i J_i^T H_i (J_i v): forward-mode J v, then backprop.

    The cotangents (and for MC the sampled labels) are drawn once at construction, so the
    operator is a fixed symmetric matrix that scipy's solvers can use.
    """

    def __init__(self, mlp: MLP, theta: np.ndarray, X: np.ndarray, fisher_type: str = "exact", y=None, samples: int = 1, rng=None):
        self.mlp, self.theta = mlp, theta
        self.cache = mlp.forward(theta, X)
        if y is not None:
            y = mlp.check_labels(y, X.shape[0])
        self.cotangents = fisher_cotangents(probabilities(self.cache), fisher_type, y, samples, rng)
        self.n_rows = X.shape[0]
        super().__init__(dtype=mlp.dtype, shape=(mlp.n_params, mlp.n_params))

    def _matvec(self, v):
        jv = self.mlp.jvp(self.theta, self.cache, np.ravel(v))  # (N, C)
        weights = np.einsum("rnc,nc->rn", self.cotangents, jv)  # r^T J v
        hjv = np.einsum("rn,rnc->nc", weights, self.cotangents)  # H J v
        return self.mlp.vjp(self.theta, self.cache, hjv) / self.n_rows

    def _rmatvec(self, v):
        return self._matvec(v)


def kl_divergence(mlp: MLP, theta_ref: np.ndarray, theta: np.ndarray, X: np.ndarray, kind: str = "forward", backend="numpy") -> tuple[float, np.ndarray]:
    """D(theta_ref || theta) = mean_x KL(p_ref || p_theta) (or the symmetric KL) and its gradient in theta."""
    be = get_backend(backend)
    ref_logits = mlp.logits(theta_ref, X)
    cache = mlp.forward(theta, X)
    values, dlogits = be.kl_and_grad(ref_logits, cache.logits, kind)
    n = X.shape[0]
    return float(values.mean()), mlp.vjp(theta, cache, dlogits) / n
