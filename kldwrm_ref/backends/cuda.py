"""numba-cuda kernels: the twins of :mod:`kldwrm_ref.backends.reference` plus a shared-memory tiled matrix product.

Row kernels (one thread per sample, grid-stride loops with bounds guards) reuse the row maths of
:mod:`kldwrm_ref.backends.rows` compiled as device functions; elementwise kernels stride over the
flattened output.  :func:`matmul` computes op(a) @ op(b) with TILE x TILE tiles in shared memory,
reading a transposed operand in place (no copy) when it is passed as a transposed view.

The wrappers take NumPy or device arrays and return NumPy arrays (the Backend contract).  Under
``NUMBA_ENABLE_CUDASIM=1`` the same kernels run on numba's simulator (slowly, in Python): that is
how CI tests them; on a GPU they run unchanged.
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, float32, float64

from kldwrm_ref.arrays import NUMPY_NAMESPACE, array_namespace
from kldwrm_ref.backends import reference, rows

TILE = 4 if config.ENABLE_CUDASIM else 16  # keep simulated blocks small
ROW_THREADS = 4 if config.ENABLE_CUDASIM else 128  # the simulator runs every thread in Python
MAX_BLOCKS = 1 if config.ENABLE_CUDASIM else 1024
KL_KINDS = {"forward": 0, "symmetric": 1}

_xent_row = cuda.jit(device=True)(rows.xent_row)
_sample_row = cuda.jit(device=True)(rows.sample_row)
_cotangent_row = cuda.jit(device=True)(rows.cotangent_row)
_kl_row = cuda.jit(device=True)(rows.kl_row)
_im2col_element = cuda.jit(device=True)(rows.im2col_element)
_col2im_element = cuda.jit(device=True)(rows.col2im_element)
_max_pool_element = cuda.jit(device=True)(rows.max_pool_element)
_max_unpool_element = cuda.jit(device=True)(rows.max_unpool_element)


def require_gpu() -> None:
    """Raise a clear error when neither a CUDA GPU nor the simulator is available."""
    if not cuda.is_available():
        raise RuntimeError(
            "backend 'cuda' needs an NVIDIA GPU with a working CUDA driver, and none was found. "
            "To run the CUDA kernels on numba's simulator instead (slow; for tests), set "
            "NUMBA_ENABLE_CUDASIM=1 in the environment before numba is imported."
        )


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
def _max_pool_kernel(x, y, argmax, kernel):
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        _max_pool_element(x, y, argmax, e, kernel)


@cuda.jit
def _max_unpool_kernel(dy, argmax, dx, kernel):
    for e in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        _max_unpool_element(dy, argmax, dx, e, kernel)


def _make_matmul_kernel(element_type):
    @cuda.jit
    def kernel(a, b, c, trans_a, trans_b):
        """c = op(a) @ op(b), op(x) = x.T when trans_x; one TILE x TILE output tile per block."""
        tile_a = cuda.shared.array((TILE, TILE), element_type)
        tile_b = cuda.shared.array((TILE, TILE), element_type)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        row = cuda.blockIdx.y * TILE + ty
        col = cuda.blockIdx.x * TILE + tx
        depth = a.shape[0] if trans_a else a.shape[1]
        acc = element_type(0.0)
        for start in range(0, depth, TILE):
            k_a = start + tx
            if row < c.shape[0] and k_a < depth:
                tile_a[ty, tx] = a[k_a, row] if trans_a else a[row, k_a]
            else:
                tile_a[ty, tx] = 0.0
            k_b = start + ty
            if k_b < depth and col < c.shape[1]:
                tile_b[ty, tx] = b[col, k_b] if trans_b else b[k_b, col]
            else:
                tile_b[ty, tx] = 0.0
            cuda.syncthreads()
            for k in range(TILE):
                acc += tile_a[ty, k] * tile_b[k, tx]
            cuda.syncthreads()
        if row < c.shape[0] and col < c.shape[1]:
            c[row, col] = acc

    return kernel


_MATMUL = {np.dtype(np.float64): _make_matmul_kernel(float64), np.dtype(np.float32): _make_matmul_kernel(float32)}
TILED_MIN_DEPTH = 32  # shorter products (inner dimension) run one thread per output element


@cuda.jit
def _matmul_rows_kernel(a, b, c, trans_a, trans_b):
    """c = op(a) @ op(b) one output element per thread (grid-stride), without shared memory."""
    cols = c.shape[1]
    depth = a.shape[0] if trans_a else a.shape[1]
    for flat in range(cuda.grid(1), c.size, cuda.gridsize(1)):
        i, j = flat // cols, flat % cols
        total = 0.0
        for k in range(depth):
            total += (a[k, i] if trans_a else a[i, k]) * (b[j, k] if trans_b else b[k, j])
        c[i, j] = total


# ------------------------------------------------------------------------- device launchers
# Each takes device arrays (and Python scalars) only and returns device arrays: the device-resident
# training step (:mod:`kldwrm_ref.gpu`) chains them without host round trips.  The host wrappers
# further down upload, call one of these and copy the result back (the Backend contract).


def _blocks(n: int) -> int:
    return max(1, min(MAX_BLOCKS, math.ceil(n / ROW_THREADS)))


def launch(kernel, n: int, *args) -> None:
    """Run ``kernel`` over ``n`` work items (grid-stride) on ``args``; host arrays are refused, so
    no launch copies data behind the caller's back."""
    for arg in args:
        if isinstance(arg, np.ndarray):
            raise TypeError(f"{kernel}: a host array was passed to a device kernel; upload it first")
    kernel[_blocks(n), ROW_THREADS](*args)


def xent_device(logits, labels):
    """(losses (N,), dlogits (N, C)) of softmax cross-entropy on device arrays."""
    losses = cuda.device_array(logits.shape[0], dtype=logits.dtype)
    dlogits = cuda.device_array(logits.shape, dtype=logits.dtype)
    launch(_xent_kernel, logits.shape[0], logits, labels, losses, dlogits)
    return losses, dlogits


def sample_labels_device(probs, uniforms):
    """int64 labels (S, N) by inverse CDF from device probabilities and uniforms."""
    labels = cuda.device_array(uniforms.shape, dtype=np.int64)
    launch(_sample_kernel, probs.shape[0], probs, uniforms, labels)
    return labels


def kl_device(ref_logits, logits, kind: str):
    """(values (N,), grad (N, C)) of the per-sample (symmetric) KL on device arrays."""
    values = cuda.device_array(logits.shape[0], dtype=logits.dtype)
    grad = cuda.device_array(logits.shape, dtype=logits.dtype)
    launch(_kl_kernel, logits.shape[0], ref_logits, logits, values, grad, KL_KINDS[kind])
    return values, grad


def ea_device(average, new, rho: float, out) -> None:
    """out = rho * average + (1 - rho) * new, flat over equal-sized device arrays (out may be average)."""
    launch(_ea_kernel, out.size, average.reshape(average.size), new.reshape(new.size), float(rho), out.reshape(out.size))


def eigen_divide_device(rotated, eig_g, eig_a, damping: float):
    out = cuda.device_array(rotated.shape, dtype=rotated.dtype)
    launch(_eigen_divide_kernel, rotated.size, rotated, eig_g, eig_a, float(damping), out)
    return out


def kron_sum_divide_device(rotated, nu, mu, alpha: float):
    out = cuda.device_array(rotated.shape, dtype=rotated.dtype)
    launch(_kron_sum_divide_kernel, rotated.size, rotated, nu, mu, float(alpha), out)
    return out


def matmul_device(a, b, trans_a: bool = False, trans_b: bool = False, out=None, tiled: bool | None = None):
    """op(a) @ op(b) of device arrays, op(x) = x.T when trans_x (read in place, no copy): the
    shared-memory tiled kernel when the inner dimension is at least TILED_MIN_DEPTH (or ``tiled``),
    else one thread per output element (tiling pays only over a long inner dimension)."""
    m = a.shape[1] if trans_a else a.shape[0]
    depth = a.shape[0] if trans_a else a.shape[1]
    n = b.shape[0] if trans_b else b.shape[1]
    if (b.shape[1] if trans_b else b.shape[0]) != depth:
        raise ValueError(f"matmul: op(a) is ({m}, {depth}) but op(b) has {b.shape[1] if trans_b else b.shape[0]} rows")
    if out is None:
        out = cuda.device_array((m, n), dtype=a.dtype)
    if not (depth >= TILED_MIN_DEPTH if tiled is None else tiled):
        launch(_matmul_rows_kernel, m * n, a, b, out, trans_a, trans_b)
        return out
    for arg in (a, b, out):
        if isinstance(arg, np.ndarray):
            raise TypeError("a host array was passed to the device product; upload it first")
    grid = (max(1, math.ceil(n / TILE)), max(1, math.ceil(m / TILE)))
    _MATMUL[np.dtype(a.dtype)][grid, (TILE, TILE)](a, b, out, trans_a, trans_b)
    return out


def im2col_device(x, kernel: int, stride: int, padding: int):
    out_h, out_w = reference.conv_out_hw(x.shape[2:], kernel, stride, padding)
    cols = cuda.device_array((x.shape[0], out_h * out_w, x.shape[1] * kernel * kernel), dtype=x.dtype)
    launch(_im2col_kernel, cols.size, x, cols, int(kernel), int(stride), int(padding), out_w)
    return cols


def col2im_device(cols, in_shape, kernel: int, stride: int, padding: int):
    c, h, w = in_shape
    out_h, out_w = reference.conv_out_hw((h, w), kernel, stride, padding)
    dx = cuda.device_array((cols.shape[0], c, h, w), dtype=cols.dtype)
    launch(_col2im_kernel, dx.size, cols, dx, int(kernel), int(stride), int(padding), out_h, out_w)
    return dx


def max_pool_device(x, kernel: int):
    shape = (x.shape[0], x.shape[1], x.shape[2] // kernel, x.shape[3] // kernel)
    y = cuda.device_array(shape, dtype=x.dtype)
    argmax = cuda.device_array(shape, dtype=reference.pool_index_dtype(kernel))
    launch(_max_pool_kernel, y.size, x, y, argmax, int(kernel))
    return y, argmax


def max_unpool_device(dy, argmax, in_shape, kernel: int):
    dx = cuda.device_array((dy.shape[0], *in_shape), dtype=dy.dtype)
    launch(_max_unpool_kernel, dx.size, dy, argmax, dx, int(kernel))
    return dx


# ------------------------------------------------------------------------------- wrappers
def _device(array, dtype=None):
    """A device copy of a host array; device arrays pass through."""
    if isinstance(array, (np.ndarray, list, tuple, float, int)):
        return cuda.to_device(np.ascontiguousarray(array, dtype=dtype))
    return array


def softmax_cross_entropy(logits, labels):
    """Fused log-softmax, cross-entropy and gradient; see :func:`kldwrm_ref.backends.reference.softmax_cross_entropy`."""
    require_gpu()
    losses, dlogits = xent_device(_device(logits), _device(labels, np.int64))
    return losses.copy_to_host(), dlogits.copy_to_host()


def sample_labels(probs, uniforms):
    """Inverse-CDF labels from passed-in uniforms; see :func:`kldwrm_ref.backends.reference.sample_labels`."""
    require_gpu()
    return sample_labels_device(_device(probs), _device(uniforms)).copy_to_host()


def fisher_cotangents(probs):
    """sqrt(pi_c)(e_c - pi) per sample, (N, C, C); see :func:`kldwrm_ref.backends.reference.fisher_cotangents`."""
    require_gpu()
    d_probs = _device(probs)
    n, c = d_probs.shape
    cot = cuda.device_array((n, c, c), dtype=d_probs.dtype)
    launch(_cotangent_kernel, n, d_probs, cot)
    return cot.copy_to_host()


def kl_and_grad(ref_logits, logits, kind="forward"):
    """Per-sample (symmetric) KL and its logits gradient; see :func:`kldwrm_ref.backends.reference.kl_and_grad`."""
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be 'forward' or 'symmetric', got {kind!r}")
    if np.shape(ref_logits) != np.shape(logits):
        raise ValueError(f"ref_logits has shape {np.shape(ref_logits)}, logits {np.shape(logits)}")
    require_gpu()
    values, grad = kl_device(_device(ref_logits), _device(logits), kind)
    return values.copy_to_host(), grad.copy_to_host()


def per_sample_rows(deltas, inputs, out, start):
    """One layer's columns of U written into ``out``; see :func:`kldwrm_ref.backends.reference.per_sample_rows`."""
    require_gpu()
    d_deltas = _device(deltas)
    d_out = _device(out)
    width = d_deltas.shape[1] * (np.shape(inputs)[1] + 1)
    launch(_per_sample_rows_kernel, d_deltas.shape[0] * width, d_deltas, _device(inputs), d_out, int(start))
    if isinstance(out, np.ndarray):
        d_out.copy_to_host(out)
    return out


def ea_update(average, new, rho, out=None):
    """rho * average + (1 - rho) * new (written into ``out`` when given)."""
    if np.shape(average) != np.shape(new):
        raise ValueError(f"new has shape {np.shape(new)}, the average {np.shape(average)}")
    require_gpu()
    d_avg, d_new = _device(average), _device(new)
    result = cuda.device_array(d_avg.shape, dtype=d_avg.dtype)
    ea_device(d_avg, d_new, rho, result)
    host = result.copy_to_host()
    if out is None:
        return host
    out[...] = host
    return out


def eigen_divide(rotated, eig_g, eig_a, damping):
    """V' / (d_G d_A^T + eta); see :func:`kldwrm_ref.backends.reference.eigen_divide`."""
    require_gpu()
    return eigen_divide_device(_device(rotated), _device(eig_g), _device(eig_a), damping).copy_to_host()


def kron_sum_divide(rotated, nu, mu, alpha):
    """V' / (1 + alpha nu mu^T); see :func:`kldwrm_ref.backends.reference.kron_sum_divide`."""
    require_gpu()
    return kron_sum_divide_device(_device(rotated), _device(nu), _device(mu), alpha).copy_to_host()


def _operand(x, dtype):
    """(C-contiguous array, transposed?): a transposed view of a C-contiguous array is read in place."""
    x = np.asarray(x)
    if x.ndim == 2 and not x.flags.c_contiguous and x.T.flags.c_contiguous and x.dtype == dtype:
        return x.T, True
    return np.ascontiguousarray(x, dtype=dtype), False


def matmul(a, b, tiled: bool | None = None):
    """a @ b for 2-D a (M, K), b (K, N) on the device (:func:`matmul_device`); float32 or float64."""
    if np.ndim(a) != 2 or np.ndim(b) != 2 or np.shape(a)[1] != np.shape(b)[0]:
        raise ValueError(f"matmul needs (M, K) @ (K, N), got {np.shape(a)} @ {np.shape(b)}")
    require_gpu()
    dtype = np.result_type(a, b)
    if dtype not in _MATMUL:
        raise ValueError(f"matmul supports float32 and float64, got {dtype}")
    (a_host, trans_a), (b_host, trans_b) = _operand(a, dtype), _operand(b, dtype)
    return matmul_device(_device(a_host), _device(b_host), trans_a, trans_b, tiled=tiled).copy_to_host()


def im2col(x, kernel, stride, padding):
    """Patches (N, C k k, T) of x (N, C, H, W); see :func:`kldwrm_ref.backends.reference.im2col`.
    The device kernel writes the position-major (N, T, C k k) layout of the device-resident step
    (whose 2-D product takes one row per (sample, position)); the host copy is transposed."""
    require_gpu()
    return np.ascontiguousarray(im2col_device(_device(x), kernel, stride, padding).copy_to_host().transpose(0, 2, 1))


def col2im(cols, in_shape, kernel, stride, padding):
    """im2col's adjoint onto (R, C, H, W), one thread per input element (a gather, no atomics);
    see :func:`kldwrm_ref.backends.reference.col2im`.  ``cols`` (R, C k k, T) is uploaded
    position-major, the layout of the device kernel (see :func:`im2col`)."""
    require_gpu()
    position_major = np.ascontiguousarray(np.asarray(cols).transpose(0, 2, 1))
    return col2im_device(_device(position_major), in_shape, kernel, stride, padding).copy_to_host()


def max_pool(x, kernel):
    """(max over k x k windows, argmax); see :func:`kldwrm_ref.backends.reference.max_pool`."""
    require_gpu()
    y, argmax = max_pool_device(_device(x), kernel)
    return y.copy_to_host(), argmax.copy_to_host()


def max_unpool(dy, argmax, in_shape, kernel):
    """max_pool's vjp; see :func:`kldwrm_ref.backends.reference.max_unpool`."""
    require_gpu()
    return max_unpool_device(_device(dy), _device(argmax), in_shape, kernel).copy_to_host()


def namespace():
    """The array namespace the kernels take and return: CuPy on a GPU, NumPy on the simulator."""
    if config.ENABLE_CUDASIM:
        return NUMPY_NAMESPACE
    import cupy

    return array_namespace(cupy.empty(0))
