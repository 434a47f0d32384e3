"""NumPy reference twins of the numerical kernels (docs/theory.md §1, §2, §5).

Each function does one job and is the ground truth the Numba-CPU and CUDA kernels are tested
against.  All take and return plain ``numpy.ndarray``; none modifies its inputs unless it has an
``out`` argument.
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log softmax, stable: z - max(z) - log sum exp(z - max(z))."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample -log p(y|x) and d(-log p(y|x))/dz = softmax(z) - e_y (docs/theory.md §1.1).

    Returns ``(losses (N,), dlogits (N, C))``.
    """
    logp = log_softmax(logits)
    rows = np.arange(logits.shape[0])
    losses = -logp[rows, labels]
    dlogits = np.exp(logp)
    dlogits[rows, labels] -= 1.0
    return losses, dlogits


def sample_labels(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling y ~ Categorical(probs[i]) from given uniforms in [0, 1).

    ``probs`` is (N, C), ``uniforms`` (S, N); returns int64 labels (S, N).  Using passed-in
    uniforms makes every backend draw exactly the same labels.
    """
    cdf = np.cumsum(probs, axis=1)
    cdf[:, -1] = np.inf  # guard against round-off leaving the last bin short of 1
    labels = np.empty(uniforms.shape, dtype=np.int64)
    for s in range(uniforms.shape[0]):
        labels[s] = (cdf <= uniforms[s][:, None]).sum(axis=1)
    return labels


def fisher_cotangents(probs: np.ndarray) -> np.ndarray:
    """Square-root factor of the softmax Hessian: cot[i, c] = sqrt(pi_c) (e_c - pi) (docs/theory.md §1.3).

    sum_c cot[i, c] cot[i, c]^T = diag(pi) - pi pi^T, so backpropagating these C cotangents per
    sample gives U with F = U^T U / N.  Returns (N, C, C).
    """
    _n, c = probs.shape
    sqrt_p = np.sqrt(probs)
    cot = -sqrt_p[:, :, None] * probs[:, None, :]
    idx = np.arange(c)
    cot[:, idx, idx] += sqrt_p
    return cot


def per_sample_rows(deltas: np.ndarray, inputs: np.ndarray, out: np.ndarray, start: int) -> np.ndarray:
    """One layer's columns of U (docs/theory.md §1.3, F = U^T U): out[r, start:] = [vec(delta_r a_r^T), delta_r].

    ``deltas`` is (R, O) with R = reps * N stacked cotangent rows, ``inputs`` (N, I); row r uses
    the input of sample r mod N.  Writes O * I + O columns of ``out`` from ``start``; returns out.
    """
    rows, n_out = deltas.shape
    n_in = inputs.shape[1]
    a = inputs[np.arange(rows) % inputs.shape[0]]
    out[:, start : start + n_out * n_in] = (deltas[:, :, None] * a[:, None, :]).reshape(rows, n_out * n_in)
    out[:, start + n_out * n_in : start + n_out * n_in + n_out] = deltas
    return out


def ea_update(average: np.ndarray, new: np.ndarray, rho: float, out: np.ndarray | None = None) -> np.ndarray:
    """One exponential-average step rho * average + (1 - rho) * new (docs/theory.md §2.1)."""
    if out is None:
        return rho * average + (1.0 - rho) * new
    np.multiply(average, rho, out=out)
    out += (1.0 - rho) * new
    return out


def eigen_divide(rotated: np.ndarray, eig_g: np.ndarray, eig_a: np.ndarray, damping: float) -> np.ndarray:
    """Eigenbasis K-FAC solve core: V' / (d_G d_A^T + eta) (docs/theory.md §5.2, "eigen" damping)."""
    return rotated / (np.outer(eig_g, eig_a) + damping)


def kron_sum_divide(rotated: np.ndarray, nu: np.ndarray, mu: np.ndarray, alpha: float) -> np.ndarray:
    """Exact Kronecker-sum solve core: V' / (1 + alpha nu mu^T) (docs/theory.md §5.5, "exact")."""
    return rotated / (1.0 + alpha * np.outer(nu, mu))


def kl_and_grad(ref_logits: np.ndarray, logits: np.ndarray, kind: str = "forward") -> tuple[np.ndarray, np.ndarray]:
    """Per-sample KL between softmax(ref_logits) = p and softmax(logits) = q, and d/d(logits).

    kind="forward": KL(p || q), gradient q - p.
    kind="symmetric": 1/2 [KL(p || q) + KL(q || p)], gradient
    1/2 [(q - p) + q * (r - <q, r>)] with r = log q - log p.
    Returns ``(values (N,), grad (N, C))``; docs/theory.md §1.4 and §4.4.
    """
    logp = log_softmax(ref_logits)
    logq = log_softmax(logits)
    p = np.exp(logp)
    q = np.exp(logq)
    forward = np.sum(p * (logp - logq), axis=1)
    if kind == "forward":
        return forward, q - p
    if kind != "symmetric":
        raise ValueError(f"kind must be 'forward' or 'symmetric', got {kind!r}")
    r = logq - logp
    backward = np.sum(q * r, axis=1)
    grad = 0.5 * ((q - p) + q * (r - backward[:, None]))
    return 0.5 * (forward + backward), grad
