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


# ------------------------------------------------------------------ convolution and pooling
def conv_out_hw(in_hw, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """Output size of a k x k window sliding with ``stride`` over the input zero-padded by ``padding``."""
    return (in_hw[0] + 2 * padding - kernel) // stride + 1, (in_hw[1] + 2 * padding - kernel) // stride + 1


def checked_out(out, shape: tuple[int, ...], dtype):
    """``out`` when it can take a kernel's result in place: C-contiguous, of ``shape`` and ``dtype``."""
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {dtype} array of shape {tuple(shape)}, got {out.dtype} {tuple(out.shape)}{'' if out.flags.c_contiguous else ' (not C-contiguous)'}")
    return out


def im2col(x: np.ndarray, kernel: int, stride: int, padding: int, out: np.ndarray | None = None) -> np.ndarray:
    """Patches P (N, C k k, T) of x (N, C, H, W), channel-major: column t = oh * W_out + ow of P[n]
    is the (C, k, k) window, row-major, under output position t of the zero-padded input
    (docs/theory.md §5.6).  In this layout the copy reads runs of W_out neighbouring pixels and a
    convolution's output W_mat P[n] is (out, T), already channel-major.  ``out``: written in place
    and returned (a buffer reused across chunks of samples)."""
    n, c = x.shape[:2]
    out_h, out_w = conv_out_hw(x.shape[2:], kernel, stride, padding)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding))) if padding else x
    windows = np.lib.stride_tricks.sliding_window_view(xp, (kernel, kernel), axis=(2, 3))
    windows = windows[:, :, : stride * (out_h - 1) + 1 : stride, : stride * (out_w - 1) + 1 : stride].transpose(0, 1, 4, 5, 2, 3)
    if out is None:
        return windows.reshape(n, c * kernel * kernel, out_h * out_w)
    checked_out(out, (n, c * kernel * kernel, out_h * out_w), x.dtype).reshape(windows.shape)[...] = windows
    return out


def col2im(cols: np.ndarray, in_shape, kernel: int, stride: int, padding: int, out: np.ndarray | None = None) -> np.ndarray:
    """The adjoint of :func:`im2col`: scatter-add patch cotangents (R, C k k, T) onto (R, C, H, W)
    (``out``: overwritten with the result and returned)."""
    c, h, w = in_shape
    out_h, out_w = conv_out_hw((h, w), kernel, stride, padding)
    cols = cols.reshape(cols.shape[0], c, kernel, kernel, out_h, out_w)
    dxp = np.zeros((cols.shape[0], c, h + 2 * padding, w + 2 * padding), dtype=cols.dtype)
    for i in range(kernel):
        for j in range(kernel):
            rows = slice(i, i + stride * (out_h - 1) + 1, stride)
            columns = slice(j, j + stride * (out_w - 1) + 1, stride)
            dxp[:, :, rows, columns] += cols[:, :, i, j]
    dx = dxp[:, :, padding : padding + h, padding : padding + w]
    if out is None:
        return dx
    checked_out(out, dx.shape, dx.dtype)[...] = dx
    return out


def lower_rows(x: np.ndarray, kernel: int, stride: int, padding: int, out: np.ndarray | None = None) -> np.ndarray:
    """Lowered rows R (N H_out, C k W_pad) of x (N, C, H, W): row (n, a) holds, channel by channel,
    the k zero-padded input rows a s .. a s + k - 1 end to end, R[(n, a), (c, i, u)] = x_pad[n, c, a s + i, u]
    (docs/theory.md §5.6, "A by row lowering").  ``out``: written in place and returned."""
    n, c, h, w = x.shape
    out_h, _ = conv_out_hw((h, w), kernel, stride, padding)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding))) if padding else x
    lowered = np.stack([xp[:, :, i : i + stride * (out_h - 1) + 1 : stride, :].transpose(0, 2, 1, 3) for i in range(kernel)], axis=3)  # (N, H_out, C, k, W_pad)
    shape = (n * out_h, c * kernel * (w + 2 * padding))
    if out is None:
        return lowered.reshape(shape)
    checked_out(out, shape, x.dtype).reshape(lowered.shape)[...] = lowered
    return out


def check_conv_shapes(x, weight_shape, bias, dy, stride: int, padding: int) -> tuple[int, int]:
    """(H_out, W_out) of a convolution of x (N, C, H, W) by a weight of ``weight_shape`` (O, C, k, k),
    after checking that x, the weight, the bias (O,) and the output cotangent dy (N, O, H_out, W_out)
    agree (``bias``, ``dy``: None to skip); one ValueError naming the argument otherwise."""
    if len(x.shape) != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    o, c, k, k2 = weight_shape
    if c != x.shape[1] or k != k2 or k < 1:
        raise ValueError(f"the weight must have shape (O, {x.shape[1]}, k, k) for x of shape {tuple(x.shape)}, got {tuple(weight_shape)}")
    out_h, out_w = conv_out_hw(x.shape[2:], k, stride, padding)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"a {k} x {k} kernel does not fit x of shape {tuple(x.shape)} with padding {padding}")
    if bias is not None and tuple(bias.shape) != (o,):
        raise ValueError(f"bias must have shape ({o},), got {tuple(bias.shape)}")
    if dy is not None and tuple(dy.shape) != (x.shape[0], o, out_h, out_w):
        raise ValueError(f"dy must have shape {(x.shape[0], o, out_h, out_w)}, got {tuple(dy.shape)}")
    return out_h, out_w


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: int, padding: int) -> np.ndarray:
    """The convolution y[n, o, a, b] = sum_{c,i,j} W[o, c, i, j] x_pad[n, c, a s + i, b s + j] + b[o]
    (N, O, H_out, W_out) of x (N, C, H, W) by W (O, C, k, k), as the product W_mat P[n] with the
    whole batch's patches (:func:`im2col`; ``bias`` None: no bias)."""
    out_h, out_w = check_conv_shapes(x, weight.shape, bias, None, stride, padding)
    y = np.matmul(weight.reshape(weight.shape[0], -1), im2col(x, weight.shape[2], stride, padding))
    if bias is not None:
        y += bias[:, None]
    return y.reshape(x.shape[0], weight.shape[0], out_h, out_w)


def conv2d_grads(x: np.ndarray, dy: np.ndarray, kernel: int, stride: int, padding: int) -> tuple[np.ndarray, np.ndarray]:
    """The convolution's weight and bias gradients summed over samples and positions,
    dW[o, c, i, j] = sum_{n,a,b} dy[n, o, a, b] x_pad[n, c, a s + i, b s + j] (O, C, k, k) and
    db[o] = sum_{n,a,b} dy[n, o, a, b], for x (N, C, H, W) and dy (N, O, H_out, W_out):
    dW = sum_n dy_n P[n]^T with the patches of :func:`im2col`."""
    out_h, out_w = check_conv_shapes(x, (dy.shape[1], x.shape[1], kernel, kernel), None, dy, stride, padding)
    deltas = dy.reshape(dy.shape[0], dy.shape[1], out_h * out_w)
    dw = np.matmul(deltas, im2col(x, kernel, stride, padding).transpose(0, 2, 1)).sum(axis=0)
    return dw.reshape(dy.shape[1], x.shape[1], kernel, kernel), deltas.sum(axis=(0, 2)).astype(dw.dtype, copy=False)


def pool_index_dtype(kernel: int):
    """The integer type of max-pooling's argmax (the window offset 0..k^2 - 1)."""
    return np.int8 if kernel * kernel < 128 else np.int64


def max_pool(x: np.ndarray, kernel: int) -> tuple[np.ndarray, np.ndarray]:
    """Max over non-overlapping k x k windows of x (N, C, H, W) (the last H mod k rows and W mod k
    columns dropped): (y (N, C, H // k, W // k), argmax) with argmax the row-major offset di k + dj
    of the first maximum in the window (a strict comparison, as PyTorch)."""
    h, w = x.shape[2] // kernel, x.shape[3] // kernel
    y = x[:, :, : kernel * h : kernel, : kernel * w : kernel].copy()
    argmax = np.zeros(y.shape, dtype=pool_index_dtype(kernel))
    for index in range(1, kernel * kernel):
        di, dj = divmod(index, kernel)
        view = x[:, :, di : di + kernel * h : kernel, dj : dj + kernel * w : kernel]
        larger = view > y
        np.copyto(y, view, where=larger)
        np.copyto(argmax, index, where=larger)
    return y, argmax


def max_unpool(dy: np.ndarray, argmax: np.ndarray, in_shape, kernel: int) -> np.ndarray:
    """max_pool's vjp: dx (R, C, H, W) holds dy at each window's argmax, zero elsewhere; dy has
    R = reps * N rows, row r routed by sample r mod N's argmax."""
    c, h, w = in_shape
    dx = np.zeros((dy.shape[0], c, h, w), dtype=dy.dtype)
    reps = dy.shape[0] // argmax.shape[0]
    argmax = argmax if reps == 1 else np.tile(argmax, (reps, 1, 1, 1))
    out_h, out_w = argmax.shape[2:]
    for index in range(kernel * kernel):
        di, dj = divmod(index, kernel)
        view = dx[:, :, di : di + kernel * out_h : kernel, dj : dj + kernel * out_w : kernel]
        np.copyto(view, dy, where=argmax == index)
    return dx
