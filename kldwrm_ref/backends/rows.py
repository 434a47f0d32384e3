"""Scalar/row helpers shared by the Numba-CPU and numba-cuda kernels (plain Python, compiled twice).

Each takes 2-D arrays and a row index and loops over the row; none calls another (a plain Python
callee would not compile), so the same source compiles with ``numba.njit`` (CPU) and
``numba.cuda.jit(device=True)`` (GPU).  The maths is that of
:mod:`kldwrm_ref.backends.reference` (docs/theory.md §1).
"""

from __future__ import annotations

import math


def xent_row(logits, labels, losses, dlogits, i):
    """losses[i] = -log softmax(z_i)[y_i]; dlogits[i] = softmax(z_i) - e_{y_i}."""
    top = logits[i, 0]
    for c in range(1, logits.shape[1]):
        if logits[i, c] > top:
            top = logits[i, c]
    total = 0.0
    for c in range(logits.shape[1]):
        total += math.exp(logits[i, c] - top)
    log_total = math.log(total)
    for c in range(logits.shape[1]):
        dlogits[i, c] = math.exp((logits[i, c] - top) - log_total)
    y = labels[i]
    losses[i] = -((logits[i, y] - top) - log_total)
    dlogits[i, y] -= 1.0


def sample_row(probs, uniforms, labels, s, i):
    """labels[s, i] = #{c < C-1 : cumsum(probs[i])[c] <= uniforms[s, i]} (inverse CDF)."""
    u = uniforms[s, i]
    cumulative = 0.0
    label = 0
    for c in range(probs.shape[1] - 1):
        cumulative += probs[i, c]
        if cumulative <= u:
            label += 1
        else:
            break
    labels[s, i] = label


def cotangent_row(probs, cot, i):
    """cot[i, c, :] = sqrt(pi_c) (e_c - pi) for the sample i."""
    n_classes = probs.shape[1]
    for c in range(n_classes):
        root = math.sqrt(probs[i, c])
        for d in range(n_classes):
            cot[i, c, d] = -root * probs[i, d]
        cot[i, c, c] += root


def kl_row(ref_logits, logits, values, grad, symmetric, i):
    """values[i], grad[i] of KL(p || q) (symmetric=0) or 1/2 [KL(p||q) + KL(q||p)] (symmetric=1),
    p = softmax(ref_logits[i]), q = softmax(logits[i]); gradient w.r.t. logits[i]."""
    top_p = ref_logits[i, 0]
    top_q = logits[i, 0]
    for c in range(1, logits.shape[1]):
        top_p = max(top_p, ref_logits[i, c])
        top_q = max(top_q, logits[i, c])
    sum_p = 0.0
    sum_q = 0.0
    for c in range(logits.shape[1]):
        sum_p += math.exp(ref_logits[i, c] - top_p)
        sum_q += math.exp(logits[i, c] - top_q)
    log_sum_p = math.log(sum_p)
    log_sum_q = math.log(sum_q)
    forward = 0.0
    backward = 0.0
    for c in range(logits.shape[1]):
        log_p = (ref_logits[i, c] - top_p) - log_sum_p
        log_q = (logits[i, c] - top_q) - log_sum_q
        forward += math.exp(log_p) * (log_p - log_q)
        backward += math.exp(log_q) * (log_q - log_p)
    for c in range(logits.shape[1]):
        log_p = (ref_logits[i, c] - top_p) - log_sum_p
        log_q = (logits[i, c] - top_q) - log_sum_q
        p = math.exp(log_p)
        q = math.exp(log_q)
        if symmetric:
            grad[i, c] = 0.5 * ((q - p) + q * ((log_q - log_p) - backward))
        else:
            grad[i, c] = q - p
    values[i] = 0.5 * (forward + backward) if symmetric else forward
