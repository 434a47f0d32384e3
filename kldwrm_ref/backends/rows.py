"""Scalar/row helpers shared by the Numba-CPU and numba-cuda kernels (plain Python, compiled twice).

Each takes arrays and a row index (or, for the convolution and pooling helpers, the flat index of
one output element) and loops over that row or window; none calls another (a plain Python
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


def im2col_element(x, cols, e, kernel, stride, padding, out_w):
    """cols.flat[e] = x[n, c, oh s + i - p, ow s + j - p] (zero in the padding) for the flat index
    e of cols (N, C k k, T), the patch row q = (c, i, j) row-major, t = oh W_out + ow: the
    channel-major layout of :func:`kldwrm_ref.backends.reference.im2col`."""
    n_pos = cols.shape[2]
    per_sample = cols.shape[1] * n_pos
    n = e // per_sample
    q = (e % per_sample) // n_pos
    t = e % n_pos
    c = q // (kernel * kernel)
    i = (q % (kernel * kernel)) // kernel
    j = q % kernel
    h = (t // out_w) * stride + i - padding
    w = (t % out_w) * stride + j - padding
    if 0 <= h < x.shape[2] and 0 <= w < x.shape[3]:
        cols[n, q, t] = x[n, c, h, w]
    else:
        cols[n, q, t] = 0.0


def col2im_element(cols, dx, e, kernel, stride, padding, out_h, out_w):
    """dx.flat[e] for dx (R, C, H, W): the sum of the patch cotangents cols[r, (c, i, j), t] of
    every output position t whose window covers (h, w); a gather, so threads never collide."""
    height, width = dx.shape[2], dx.shape[3]
    r = e // (dx.shape[1] * height * width)
    c = (e // (height * width)) % dx.shape[1]
    h = (e // width) % height + padding
    w = e % width + padding
    total = 0.0
    for i in range(kernel):
        hi = h - i
        if hi >= 0 and hi % stride == 0 and hi // stride < out_h:
            for j in range(kernel):
                wj = w - j
                if wj >= 0 and wj % stride == 0 and wj // stride < out_w:
                    total += cols[r, (c * kernel + i) * kernel + j, (hi // stride) * out_w + wj // stride]
    dx[r, c, h - padding, w - padding] = total


def lower_rows_element(x, rows, e, kernel, stride, padding, out_h):
    """rows.flat[e] = x[n, c, a s + i - p, u - p] (zero in the padding) for the flat index e of the
    lowered rows (N H_out, C k W_pad), row (n, a), column (c, i, u) row-major: the layout of
    :func:`kldwrm_ref.backends.reference.lower_rows`."""
    padded_width = x.shape[3] + 2 * padding
    row = e // rows.shape[1]
    column = e % rows.shape[1]
    n = row // out_h
    c = column // (kernel * padded_width)
    h = (row % out_h) * stride + (column // padded_width) % kernel - padding
    w = column % padded_width - padding
    if 0 <= h < x.shape[2] and 0 <= w < x.shape[3]:
        rows[row, column] = x[n, c, h, w]
    else:
        rows[row, column] = 0.0


def max_pool_element(x, y, argmax, e, kernel):
    """y.flat[e] = the maximum of its k x k window of x, argmax.flat[e] = its first row-major offset."""
    out_h, out_w = y.shape[2], y.shape[3]
    n = e // (y.shape[1] * out_h * out_w)
    c = (e // (out_h * out_w)) % y.shape[1]
    i = (e // out_w) % out_h
    j = e % out_w
    best = x[n, c, i * kernel, j * kernel]
    best_index = 0
    for index in range(1, kernel * kernel):
        value = x[n, c, i * kernel + index // kernel, j * kernel + index % kernel]
        if value > best:
            best = value
            best_index = index
    y[n, c, i, j] = best
    argmax[n, c, i, j] = best_index


def max_unpool_element(dy, argmax, dx, e, kernel):
    """dx.flat[e] for dx (R, C, H, W): dy at the window's argmax (sample r mod N's), else zero."""
    height, width = dx.shape[2], dx.shape[3]
    r = e // (dx.shape[1] * height * width)
    c = (e // (height * width)) % dx.shape[1]
    h = (e // width) % height
    w = e % width
    i = h // kernel
    j = w // kernel
    dx[r, c, h, w] = 0.0
    if i < dy.shape[2] and j < dy.shape[3] and argmax[r % argmax.shape[0], c, i, j] == (h % kernel) * kernel + w % kernel:
        dx[r, c, h, w] = dy[r, c, i, j]
