"""numba-cuda kernels: the twins of :mod:`kldwrm_ref.backends.reference` on CuPy arrays (docs/gpu.md).

Row kernels (one thread per sample, grid-stride loops with bounds guards) reuse the row maths of
:mod:`kldwrm_ref.backends.rows` compiled as device functions; elementwise kernels stride over the
flattened output.  Each wrapper allocates its outputs in the namespace of its inputs and launches
the kernel on them directly: CuPy arrays reach numba-cuda through ``__cuda_array_interface__``
without a copy, and nothing crosses the bus.  Matrix products are CuPy's (cuBLAS).

Under ``NUMBA_ENABLE_CUDASIM=1`` the same kernels run on numba's simulator over NumPy arrays
(slowly, in Python, with 4 threads per block so that the grid-stride loops run with several
threads): that is how CI tests them; on a GPU they run unchanged.
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, cuda

from kldwrm_ref.arrays import NUMPY_NAMESPACE, array_namespace
from kldwrm_ref.backends import reference, rows

ROW_THREADS = 4 if config.ENABLE_CUDASIM else 128  # the simulator runs every thread in Python
MAX_BLOCKS = 1 if config.ENABLE_CUDASIM else 1024
KL_KINDS = {"forward": 0, "symmetric": 1}

_xent_row = cuda.jit(device=True)(rows.xent_row)
_sample_row = cuda.jit(device=True)(rows.sample_row)
_cotangent_row = cuda.jit(device=True)(rows.cotangent_row)
_kl_row = cuda.jit(device=True)(rows.kl_row)
_im2col_element = cuda.jit(device=True)(rows.im2col_element)
_col2im_element = cuda.jit(device=True)(rows.col2im_element)
_lower_rows_element = cuda.jit(device=True)(rows.lower_rows_element)
_max_pool_element = cuda.jit(device=True)(rows.max_pool_element)
_max_unpool_element = cuda.jit(device=True)(rows.max_unpool_element)


# -------------------------------------------------------------------------------- kernels
@cuda.jit
def _xent_kernel(logits, labels, losses, dlogits):
    for i in range(cuda.grid(1), logits.shape[0], cuda.gridsize(1)):
        _xent_row(logits, labels, losses, dlogits, i)


@cuda.jit
def _sample_kernel(probs, uniforms, labels):
    for i in range(cuda.grid(1), probs.shape[0], cuda.gridsize(1)):
        for s in range(uniforms.shape[0]):
            _sample_row(probs, uniforms, labels, s, i)


@cuda.jit
def _cotangent_kernel(probs, cot):
    for i in range(cuda.grid(1), probs.shape[0], cuda.gridsize(1)):
        _cotangent_row(probs, cot, i)


@cuda.jit
def _kl_kernel(ref_logits, logits, values, grad, symmetric):
    for i in range(cuda.grid(1), logits.shape[0], cuda.gridsize(1)):
        _kl_row(ref_logits, logits, values, grad, symmetric, i)


@cuda.jit
def _per_sample_rows_kernel(deltas, inputs, out, start):
    n_out, n_in = deltas.shape[1], inputs.shape[1]
    width = n_out * n_in + n_out
    for flat in range(cuda.grid(1), deltas.shape[0] * width, cuda.gridsize(1)):
        r, col = flat // width, flat % width
        if col < n_out * n_in:
            out[r, start + col] = deltas[r, col // n_in] * inputs[r % inputs.shape[0], col % n_in]
        else:
            out[r, start + col] = deltas[r, col - n_out * n_in]


@cuda.jit
def _ea_kernel(average, new, rho, out):
    keep = 1.0 - rho
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = rho * average[i] + keep * new[i]


@cuda.jit
def _eigen_divide_kernel(rotated, eig_g, eig_a, damping, out):
    cols = rotated.shape[1]
    for flat in range(cuda.grid(1), rotated.size, cuda.gridsize(1)):
        i, j = flat // cols, flat % cols
        out[i, j] = rotated[i, j] / (eig_g[i] * eig_a[j] + damping)


@cuda.jit
def _kron_sum_divide_kernel(rotated, nu, mu, alpha, out):
    cols = rotated.shape[1]
    for flat in range(cuda.grid(1), rotated.size, cuda.gridsize(1)):
        i, j = flat // cols, flat % cols
        out[i, j] = rotated[i, j] / (1.0 + alpha * (nu[i] * mu[j]))


@cuda.jit
def _im2col_kernel(x, cols, kernel, stride, padding, out_w):
    for e in range(cuda.grid(1), cols.size, cuda.gridsize(1)):
        _im2col_element(x, cols, e, kernel, stride, padding, out_w)


@cuda.jit
def _col2im_kernel(cols, dx, kernel, stride, padding, out_h, out_w):
    for e in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        _col2im_element(cols, dx, e, kernel, stride, padding, out_h, out_w)


@cuda.jit
def _lower_rows_kernel(x, rows, kernel, stride, padding, out_h):
    for e in range(cuda.grid(1), rows.size, cuda.gridsize(1)):
        _lower_rows_element(x, rows, e, kernel, stride, padding, out_h)


@cuda.jit
def _max_pool_kernel(x, y, argmax, kernel):
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        _max_pool_element(x, y, argmax, e, kernel)


@cuda.jit
def _max_unpool_kernel(dy, argmax, dx, kernel):
    for e in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        _max_unpool_element(dy, argmax, dx, e, kernel)


def namespace():
    """The array namespace the kernels take and return: CuPy on a GPU, NumPy on the simulator."""
    if config.ENABLE_CUDASIM:
        return NUMPY_NAMESPACE
    import cupy  # the optional ``gpu`` extra; kldwrm_ref.backends.probe checked it is there

    return array_namespace(cupy.empty(0))


def _launch(kernel, n: int, *args) -> None:
    """Run ``kernel`` over ``n`` work items (grid-stride)."""
    kernel[max(1, min(MAX_BLOCKS, math.ceil(n / ROW_THREADS))), ROW_THREADS](*args)


def _xp(x):
    return array_namespace(x)


def softmax_cross_entropy(logits, labels):
    """Fused log-softmax, cross-entropy and gradient; see :func:`kldwrm_ref.backends.reference.softmax_cross_entropy`."""
    xp = _xp(logits)
    losses = xp.empty(logits.shape[0], dtype=logits.dtype)
    dlogits = xp.empty(logits.shape, dtype=logits.dtype)
    _launch(_xent_kernel, logits.shape[0], logits, xp.astype(labels, xp.int64), losses, dlogits)
    return losses, dlogits


def sample_labels(probs, uniforms):
    """Inverse-CDF labels from passed-in uniforms; see :func:`kldwrm_ref.backends.reference.sample_labels`."""
    labels = _xp(probs).empty(uniforms.shape, dtype=_xp(probs).int64)
    _launch(_sample_kernel, probs.shape[0], probs, uniforms, labels)
    return labels


def fisher_cotangents(probs):
    """sqrt(pi_c)(e_c - pi) per sample, (N, C, C); see :func:`kldwrm_ref.backends.reference.fisher_cotangents`."""
    n, c = probs.shape
    cot = _xp(probs).empty((n, c, c), dtype=probs.dtype)
    _launch(_cotangent_kernel, n, probs, cot)
    return cot


def kl_and_grad(ref_logits, logits, kind="forward"):
    """Per-sample (symmetric) KL and its logits gradient; see :func:`kldwrm_ref.backends.reference.kl_and_grad`."""
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be 'forward' or 'symmetric', got {kind!r}")
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits has shape {ref_logits.shape}, logits {logits.shape}")
    xp = _xp(logits)
    values = xp.empty(logits.shape[0], dtype=logits.dtype)
    grad = xp.empty(logits.shape, dtype=logits.dtype)
    _launch(_kl_kernel, logits.shape[0], ref_logits, logits, values, grad, KL_KINDS[kind])
    return values, grad


def per_sample_rows(deltas, inputs, out, start):
    """One layer's columns of U written into ``out``; see :func:`kldwrm_ref.backends.reference.per_sample_rows`."""
    width = deltas.shape[1] * (inputs.shape[1] + 1)
    _launch(_per_sample_rows_kernel, deltas.shape[0] * width, deltas, inputs, out, int(start))
    return out


def ea_update(average, new, rho, out=None):
    """rho * average + (1 - rho) * new in one pass (written into ``out`` when given)."""
    if average.shape != new.shape:
        raise ValueError(f"new has shape {new.shape}, the average {average.shape}")
    xp = _xp(average)
    result = xp.empty(average.shape, dtype=average.dtype) if out is None else out
    flat = (-1,)
    _launch(_ea_kernel, result.size, xp.reshape(average, flat), xp.reshape(new, flat), float(rho), xp.reshape(result, flat))
    return result


def eigen_divide(rotated, eig_g, eig_a, damping):
    """V' / (d_G d_A^T + eta); see :func:`kldwrm_ref.backends.reference.eigen_divide`."""
    out = _xp(rotated).empty(rotated.shape, dtype=rotated.dtype)
    _launch(_eigen_divide_kernel, rotated.size, rotated, eig_g, eig_a, float(damping), out)
    return out


def kron_sum_divide(rotated, nu, mu, alpha):
    """V' / (1 + alpha nu mu^T); see :func:`kldwrm_ref.backends.reference.kron_sum_divide`."""
    out = _xp(rotated).empty(rotated.shape, dtype=rotated.dtype)
    _launch(_kron_sum_divide_kernel, rotated.size, rotated, nu, mu, float(alpha), out)
    return out


def matmul(a, b):
    """a @ b: cuBLAS through CuPy (NumPy's BLAS on the simulator)."""
    return a @ b


def im2col(x, kernel, stride, padding, out=None):
    """Patches (N, C k k, T) of x (N, C, H, W), one thread per patch entry; see :func:`kldwrm_ref.backends.reference.im2col`."""
    out_h, out_w = reference.conv_out_hw(x.shape[2:], kernel, stride, padding)
    shape = (x.shape[0], x.shape[1] * kernel * kernel, out_h * out_w)
    cols = _xp(x).empty(shape, dtype=x.dtype) if out is None else reference.checked_out(out, shape, x.dtype)
    _launch(_im2col_kernel, cols.size, x, cols, int(kernel), int(stride), int(padding), out_w)
    return cols


def col2im(cols, in_shape, kernel, stride, padding, out=None):
    """im2col's adjoint onto (R, C, H, W), one thread per input element (a gather, no atomics);
    see :func:`kldwrm_ref.backends.reference.col2im`."""
    c, h, w = in_shape
    out_h, out_w = reference.conv_out_hw((h, w), kernel, stride, padding)
    shape = (cols.shape[0], c, h, w)
    dx = _xp(cols).empty(shape, dtype=cols.dtype) if out is None else reference.checked_out(out, shape, cols.dtype)
    _launch(_col2im_kernel, dx.size, cols, dx, int(kernel), int(stride), int(padding), out_h, out_w)
    return dx


def lower_rows(x, kernel, stride, padding, out=None):
    """Lowered rows (N H_out, C k W_pad) of x (N, C, H, W), one thread per entry; see :func:`kldwrm_ref.backends.reference.lower_rows`."""
    n, c, h, w = x.shape
    out_h, _ = reference.conv_out_hw((h, w), kernel, stride, padding)
    shape = (n * out_h, c * kernel * (w + 2 * padding))
    rows_out = _xp(x).empty(shape, dtype=x.dtype) if out is None else reference.checked_out(out, shape, x.dtype)
    _launch(_lower_rows_kernel, rows_out.size, x, rows_out, int(kernel), int(stride), int(padding), out_h)
    return rows_out


def conv2d(x, weight, bias, stride, padding):
    """The convolution (N, O, H_out, W_out) as the product of the weight with the patches (cuBLAS);
    see :func:`kldwrm_ref.backends.reference.conv2d`."""
    xp, kernel = _xp(x), weight.shape[2]
    out_h, out_w = reference.check_conv_shapes(x, weight.shape, bias, None, stride, padding)
    y = xp.matmul(xp.reshape(weight, (weight.shape[0], -1)), im2col(x, kernel, stride, padding))
    if bias is not None:
        y += bias[:, None]
    return xp.reshape(y, (x.shape[0], weight.shape[0], out_h, out_w))


def conv2d_grads(x, dy, kernel, stride, padding):
    """(dW (O, C, k, k), db (O,)): per-sample products of the cotangent with the patches, summed;
    see :func:`kldwrm_ref.backends.reference.conv2d_grads`."""
    xp = _xp(x)
    out_h, out_w = reference.check_conv_shapes(x, (dy.shape[1], x.shape[1], kernel, kernel), None, dy, stride, padding)
    deltas = xp.reshape(dy, (dy.shape[0], dy.shape[1], out_h * out_w))
    dw = xp.sum(xp.matmul(deltas, xp.permute_dims(im2col(x, kernel, stride, padding), (0, 2, 1))), axis=0)
    return xp.reshape(dw, (dy.shape[1], x.shape[1], kernel, kernel)), xp.astype(xp.sum(deltas, axis=(0, 2)), dw.dtype)


def max_pool(x, kernel):
    """(max over k x k windows, argmax); see :func:`kldwrm_ref.backends.reference.max_pool`."""
    xp = _xp(x)
    shape = (x.shape[0], x.shape[1], x.shape[2] // kernel, x.shape[3] // kernel)
    y = xp.empty(shape, dtype=x.dtype)
    argmax = xp.empty(shape, dtype=getattr(xp, np.dtype(reference.pool_index_dtype(kernel)).name))
    _launch(_max_pool_kernel, y.size, x, y, argmax, int(kernel))
    return y, argmax


def max_unpool(dy, argmax, in_shape, kernel):
    """max_pool's vjp; see :func:`kldwrm_ref.backends.reference.max_unpool`."""
    dx = _xp(dy).empty((dy.shape[0], *in_shape), dtype=dy.dtype)
    _launch(_max_unpool_kernel, dx.size, dy, argmax, dx, int(kernel))
    return dx
