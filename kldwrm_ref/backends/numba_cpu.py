"""Numba-CPU kernels: the twins of :mod:`kldwrm_ref.backends.reference` with the same signatures and results.

Each ``@njit`` kernel does one job in one pass over its data; the row maths is shared with the
CUDA kernels (:mod:`kldwrm_ref.backends.rows`).  The kernels are serial on purpose: with
``parallel=True`` each kernel was faster in isolation, but Numba's thread pool then contends with
BLAS's threads and a full K-FAC step became 3x slower (``kldwrm bench step``).  The wrappers allocate
the outputs and keep NumPy's signatures.  Matrix products stay with NumPy's BLAS (:func:`matmul`).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from kldwrm_ref.arrays import NUMPY_NAMESPACE
from kldwrm_ref.backends import direct_conv, reference, rows

_xent_row = njit(cache=True)(rows.xent_row)
_sample_row = njit(cache=True)(rows.sample_row)
_cotangent_row = njit(cache=True)(rows.cotangent_row)
_kl_row = njit(cache=True)(rows.kl_row)
KL_KINDS = {"forward": 0, "symmetric": 1}


@njit(cache=True)
def _xent_kernel(logits, labels, losses, dlogits):
    for i in range(logits.shape[0]):
        _xent_row(logits, labels, losses, dlogits, i)


@njit(cache=True)
def _sample_kernel(probs, uniforms, labels):
    for i in range(probs.shape[0]):
        for s in range(uniforms.shape[0]):
            _sample_row(probs, uniforms, labels, s, i)


@njit(cache=True)
def _cotangent_kernel(probs, cot):
    for i in range(probs.shape[0]):
        _cotangent_row(probs, cot, i)


@njit(cache=True)
def _per_sample_rows_kernel(deltas, inputs, out, start):
    n_out, n_in, n_samples = deltas.shape[1], inputs.shape[1], inputs.shape[0]
    for r in range(deltas.shape[0]):
        sample = r % n_samples
        for o in range(n_out):
            d = deltas[r, o]
            base = start + o * n_in
            for j in range(n_in):
                out[r, base + j] = d * inputs[sample, j]
            out[r, start + n_out * n_in + o] = d


@njit(cache=True)
def _ea_kernel(average, new, rho, out):
    keep = 1.0 - rho
    for i in range(out.size):
        out[i] = rho * average[i] + keep * new[i]


@njit(cache=True)
def _eigen_divide_kernel(rotated, eig_g, eig_a, damping, out):
    for i in range(rotated.shape[0]):
        for j in range(rotated.shape[1]):
            out[i, j] = rotated[i, j] / (eig_g[i] * eig_a[j] + damping)


@njit(cache=True)
def _kron_sum_divide_kernel(rotated, nu, mu, alpha, out):
    for i in range(rotated.shape[0]):
        for j in range(rotated.shape[1]):
            out[i, j] = rotated[i, j] / (1.0 + alpha * (nu[i] * mu[j]))


@njit(cache=True)
def _kl_kernel(ref_logits, logits, values, grad, symmetric):
    for i in range(logits.shape[0]):
        _kl_row(ref_logits, logits, values, grad, symmetric, i)


@njit(cache=True)
def _im2col_kernel(x_padded, cols, kernel, stride, out_h, out_w):
    # every window lies inside the zero-padded input: no bounds checks; writes run along t
    for n in range(cols.shape[0]):
        for c in range(x_padded.shape[1]):
            for i in range(kernel):
                for j in range(kernel):
                    q = (c * kernel + i) * kernel + j
                    for a in range(out_h):
                        source, base = x_padded[n, c, a * stride + i], a * out_w
                        if stride == 1:  # a separate unit-stride loop is what LLVM vectorises (5x)
                            for b in range(out_w):
                                cols[n, q, base + b] = source[j + b]
                        else:
                            for b in range(out_w):
                                cols[n, q, base + b] = source[b * stride + j]


@njit(cache=True)
def _col2im_kernel(cols, dx_padded, kernel, stride, out_h, out_w):
    # serial scatter-add in im2col's order onto the zero-padded input (no two writes race)
    for r in range(cols.shape[0]):
        for c in range(dx_padded.shape[1]):
            for i in range(kernel):
                for j in range(kernel):
                    q = (c * kernel + i) * kernel + j
                    for a in range(out_h):
                        target, base = dx_padded[r, c, a * stride + i], a * out_w
                        if stride == 1:  # as in _im2col_kernel
                            for b in range(out_w):
                                target[j + b] += cols[r, q, base + b]
                        else:
                            for b in range(out_w):
                                target[b * stride + j] += cols[r, q, base + b]


@functools.cache
def _pool_kernels(kernel: int):
    """(max pool, max unpool) kernels compiled for one window size: with ``kernel`` a constant,
    LLVM unrolls the window loops (pooling 2 x 2 ran 7x faster than with a runtime size)."""

    @njit(cache=True)
    def max_pool_kernel(x, y, argmax):
        for n in range(y.shape[0]):
            for c in range(y.shape[1]):
                for i in range(y.shape[2]):
                    for j in range(y.shape[3]):
                        best, best_index = x[n, c, i * kernel, j * kernel], 0
                        for di in range(kernel):  # row-major window order; strict > keeps the first maximum
                            for dj in range(kernel):
                                value = x[n, c, i * kernel + di, j * kernel + dj]
                                if value > best:
                                    best, best_index = value, di * kernel + dj
                        y[n, c, i, j] = best
                        argmax[n, c, i, j] = best_index

    @njit(cache=True)
    def max_unpool_kernel(dy, argmax, dx):
        # writes every position of each window (the cotangent at its argmax, zero elsewhere), one
        # output row at a time: writes along a row ran 2.3x faster than window by window
        for r in range(dy.shape[0]):
            sample = r % argmax.shape[0]
            for c in range(dy.shape[1]):
                for i in range(dy.shape[2]):
                    for di in range(kernel):
                        row = dx[r, c, i * kernel + di]
                        for j in range(dy.shape[3]):
                            index, value = argmax[sample, c, i, j], dy[r, c, i, j]
                            for dj in range(kernel):
                                row[j * kernel + dj] = value if di * kernel + dj == index else 0

    return max_pool_kernel, max_unpool_kernel


def namespace():
    """The array namespace these kernels take and return: NumPy."""
    return NUMPY_NAMESPACE


def _contiguous(*arrays):
    return [np.ascontiguousarray(a) for a in arrays]


def softmax_cross_entropy(logits, labels):
    """Fused log-softmax, cross-entropy and its gradient; see :func:`kldwrm_ref.backends.reference.softmax_cross_entropy`."""
    logits, labels = _contiguous(logits, np.asarray(labels, dtype=np.int64))
    losses = np.empty(logits.shape[0], dtype=logits.dtype)
    dlogits = np.empty_like(logits)
    _xent_kernel(logits, labels, losses, dlogits)
    return losses, dlogits


def sample_labels(probs, uniforms):
    """Inverse-CDF labels from passed-in uniforms; see :func:`kldwrm_ref.backends.reference.sample_labels`."""
    probs, uniforms = _contiguous(probs, uniforms)
    labels = np.empty(uniforms.shape, dtype=np.int64)
    _sample_kernel(probs, uniforms, labels)
    return labels


def fisher_cotangents(probs):
    """sqrt(pi_c)(e_c - pi) per sample, (N, C, C); see :func:`kldwrm_ref.backends.reference.fisher_cotangents`."""
    (probs,) = _contiguous(probs)
    cot = np.empty((probs.shape[0], probs.shape[1], probs.shape[1]), dtype=probs.dtype)
    _cotangent_kernel(probs, cot)
    return cot


def per_sample_rows(deltas, inputs, out, start):
    """One layer's columns of U written in place; see :func:`kldwrm_ref.backends.reference.per_sample_rows`."""
    deltas, inputs = _contiguous(deltas, inputs)
    _per_sample_rows_kernel(deltas, inputs, out, int(start))
    return out


def ea_update(average, new, rho, out=None):
    """rho * average + (1 - rho) * new in one pass (in place when ``out`` is given)."""
    if average.shape != new.shape:
        raise ValueError(f"new has shape {new.shape}, the average {average.shape}")
    average, new = _contiguous(average, new)
    result = np.empty_like(average) if out is None else out
    if not result.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    _ea_kernel(average.reshape(-1), new.reshape(-1), float(rho), result.reshape(-1))
    return result


def eigen_divide(rotated, eig_g, eig_a, damping):
    """V' / (d_G d_A^T + eta); see :func:`kldwrm_ref.backends.reference.eigen_divide`."""
    rotated, eig_g, eig_a = _contiguous(rotated, eig_g, eig_a)
    out = np.empty_like(rotated)
    _eigen_divide_kernel(rotated, eig_g, eig_a, float(damping), out)
    return out


def kron_sum_divide(rotated, nu, mu, alpha):
    """V' / (1 + alpha nu mu^T); see :func:`kldwrm_ref.backends.reference.kron_sum_divide`."""
    rotated, nu, mu = _contiguous(rotated, nu, mu)
    out = np.empty_like(rotated)
    _kron_sum_divide_kernel(rotated, nu, mu, float(alpha), out)
    return out


def kl_and_grad(ref_logits, logits, kind="forward"):
    """Per-sample (symmetric) KL and its logits gradient; see :func:`kldwrm_ref.backends.reference.kl_and_grad`."""
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be 'forward' or 'symmetric', got {kind!r}")
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits has shape {ref_logits.shape}, logits {logits.shape}")
    ref_logits, logits = _contiguous(ref_logits, logits)
    values = np.empty(logits.shape[0], dtype=logits.dtype)
    grad = np.empty_like(logits)
    _kl_kernel(ref_logits, logits, values, grad, KL_KINDS[kind])
    return values, grad


def matmul(a, b):
    """a @ b with NumPy's BLAS (no Numba kernel beats it on the CPU)."""
    return a @ b


def im2col(x, kernel, stride, padding, out=None):
    """Patches (N, C k k, T) of x (N, C, H, W); see :func:`kldwrm_ref.backends.reference.im2col`."""
    (x,) = _contiguous(x)
    out_h, out_w = reference.conv_out_hw(x.shape[2:], kernel, stride, padding)
    x_padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding))) if padding else x
    shape = (x.shape[0], x.shape[1] * kernel * kernel, out_h * out_w)
    cols = np.empty(shape, dtype=x.dtype) if out is None else reference.checked_out(out, shape, x.dtype)
    _im2col_kernel(x_padded, cols, int(kernel), int(stride), out_h, out_w)
    return cols


def col2im(cols, in_shape, kernel, stride, padding, out=None):
    """im2col's adjoint onto (R, C, H, W); see :func:`kldwrm_ref.backends.reference.col2im`.  With
    ``out`` and no padding the scatter-add runs in ``out`` itself."""
    (cols,) = _contiguous(cols)
    c, h, w = in_shape
    out_h, out_w = reference.conv_out_hw((h, w), kernel, stride, padding)
    if out is not None:
        reference.checked_out(out, (cols.shape[0], c, h, w), cols.dtype)
    if out is not None and not padding:
        out.fill(0)
        _col2im_kernel(cols, out, int(kernel), int(stride), out_h, out_w)
        return out
    dx_padded = np.zeros((cols.shape[0], c, h + 2 * padding, w + 2 * padding), dtype=cols.dtype)
    _col2im_kernel(cols, dx_padded, int(kernel), int(stride), out_h, out_w)
    dx = dx_padded[:, :, padding : padding + h, padding : padding + w] if padding else dx_padded
    if out is None:
        return dx
    out[...] = dx
    return out


def lower_rows(x, kernel, stride, padding, out=None):
    """Lowered rows (N H_out, C k W_pad) of x (N, C, H, W); see :func:`kldwrm_ref.backends.reference.lower_rows`.
    A channel's k input rows from a s on are consecutive in memory, so R is one copy of a strided
    view of x, which NumPy makes in one pass near memory speed (a Numba loop was 2-3x slower); a
    padded or non-contiguous input is copied once more first."""
    (x,) = _contiguous(x)
    n, c, h, w = x.shape
    out_h, _ = reference.conv_out_hw((h, w), kernel, stride, padding)
    x_padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding))) if padding else x
    width, size = w + 2 * padding, x_padded.itemsize
    windows = np.lib.stride_tricks.as_strided(x_padded, shape=(n, out_h, c, kernel * width), strides=(x_padded.strides[0], stride * width * size, x_padded.strides[1], size), writeable=False)
    shape = (n * out_h, c * kernel * width)
    rows = np.empty(shape, dtype=x.dtype) if out is None else reference.checked_out(out, shape, x.dtype)
    rows.reshape(windows.shape)[...] = windows
    return rows


_DIRECT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # the generated kernels' (others: the NumPy twin)


def _padded(x, padding):
    return np.ascontiguousarray(np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding))) if padding else x)


def conv2d(x, weight, bias, stride, padding):
    """The convolution (N, O, H_out, W_out); see :func:`kldwrm_ref.backends.reference.conv2d`.
    Stride 1, float32 or float64, with few products per position
    (:func:`kldwrm_ref.backends.direct_conv.forward_fits`): the generated kernel for this shape,
    without patches; otherwise the NumPy twin (the whole batch's patches)."""
    reference.check_conv_shapes(x, weight.shape, bias, None, stride, padding)
    out_channels, in_channels, kernel = weight.shape[:3]
    dtype = np.result_type(x, weight)
    if stride != 1 or dtype not in _DIRECT_DTYPES or not direct_conv.forward_fits(in_channels, out_channels, kernel):
        return reference.conv2d(x, weight, bias, stride, padding)
    x_padded = _padded(x.astype(dtype, copy=False), padding)
    n, _, h, w = x_padded.shape
    y = np.empty((n, out_channels, h - kernel + 1, w - kernel + 1), dtype=dtype)
    bias = np.zeros(out_channels, dtype=dtype) if bias is None else np.ascontiguousarray(bias, dtype=dtype)
    direct_conv.forward_kernel(in_channels, out_channels, kernel, h, w)(x_padded.reshape(-1), np.ascontiguousarray(weight, dtype=dtype), bias, y.reshape(-1))
    return y


def conv2d_grads(x, dy, kernel, stride, padding):
    """(dW (O, C, k, k), db (O,)) summed over samples; see :func:`kldwrm_ref.backends.reference.conv2d_grads`.
    Stride 1, float32 or float64 and :func:`kldwrm_ref.backends.direct_conv.gradient_fits`: the
    generated kernel for this shape; otherwise the NumPy twin."""
    out_channels, in_channels = dy.shape[1], x.shape[1]
    reference.check_conv_shapes(x, (out_channels, in_channels, kernel, kernel), None, dy, stride, padding)
    dtype = np.result_type(x, dy)
    if stride != 1 or dtype not in _DIRECT_DTYPES or not direct_conv.gradient_fits(in_channels, out_channels, kernel):
        return reference.conv2d_grads(x, dy, kernel, stride, padding)
    x_padded = _padded(x.astype(dtype, copy=False), padding)
    _, _, h, w = x_padded.shape
    dw, db = np.empty((out_channels, in_channels, kernel, kernel), dtype=dtype), np.empty(out_channels, dtype=dtype)
    grads = direct_conv.gradient_kernel(in_channels, out_channels, kernel, h, w, dtype.name)
    grads(x_padded.reshape(-1), np.ascontiguousarray(dy, dtype=dtype).reshape(-1), dw, db)
    return dw, db


def max_pool(x, kernel):
    """(max over k x k windows, argmax); see :func:`kldwrm_ref.backends.reference.max_pool`."""
    (x,) = _contiguous(x)
    shape = (x.shape[0], x.shape[1], x.shape[2] // kernel, x.shape[3] // kernel)
    y = np.empty(shape, dtype=x.dtype)
    argmax = np.empty(shape, dtype=reference.pool_index_dtype(kernel))
    _pool_kernels(int(kernel))[0](x, y, argmax)
    return y, argmax


def max_unpool(dy, argmax, in_shape, kernel):
    """max_pool's vjp; see :func:`kldwrm_ref.backends.reference.max_unpool`."""
    dy, argmax = _contiguous(dy, argmax)
    covered = in_shape[1] % kernel == 0 and in_shape[2] % kernel == 0  # else rows/columns no window writes
    dx = (np.empty if covered else np.zeros)((dy.shape[0], *in_shape), dtype=dy.dtype)
    _pool_kernels(int(kernel))[1](dy, argmax, dx)
    return dx
