"""Convolutional layers: Conv2d, MaxPool2d, Flatten, Dropout, and the authors' MNIST CNN.

Per-sample tensors are channel-major (C, H, W), a batch is (N, C, H, W), as in PyTorch.  The layers
follow the :class:`~kldwrm_ref.model.layers.Layer` protocol; cotangents may carry ``reps * N`` rows
(row r belongs to sample r mod N).

A convolution is a dense layer applied at every output position t = 1..T to the input patch p_t:
with the patches unfolded ("im2col") channel-major into P (N, k, T), k = in * kh * kw in (in, kh, kw)
order (the row-major flattening of the weight), y[n] = W_mat P[n] + b (out, T): column t of P[n] is
the patch p_{n,t}.  Its K-FAC factors are those of Grosse & Martens (2016, "KFC"), see :class:`Conv2d`.

Every product is a stack of per-sample ``xp.matmul`` in the backend's namespace (the output, the
weight gradient, the input cotangent, the G factor, per-sample gradient rows): in this layout none
needs a transposing copy, and the output (out, T) per sample is already (N, C, H, W).  Only A, a
Gram matrix over all (sample, position) pairs, copies the patches into (k, N T) operands.
Patches, pooling and their adjoints are the backend's kernels.  A stride-1 convolution with few
products per position (:meth:`Conv2d.convolves_directly`: the paper CNN's first) computes its
output without patches where they are not kept, by the backend's ``conv2d``, and a stride-1
convolution of moderate size (:meth:`Conv2d.differentiates_directly`: both of the paper CNN's)
its parameter gradients, by ``conv2d_grads`` (on the CPU, kernels generated for the shape:
:mod:`kldwrm_ref.backends.direct_conv`).

Patches of a whole batch are k T times the input (the paper CNN's first convolution: 29.5 MB at
batch 512 in float32).  On the CPU, a layer whose batch patches exceed :data:`PATCH_CACHE_BYTES`
holds them in no training pass: each pass recomputes them in chunks of samples whose patches fit
:data:`PATCH_CHUNK_BYTES` (they stay in cache between the copy and the product), and the forward
cache keeps only the input.  Every result is the same sum of the same per-sample products
(docs/performance.md has the measurement behind both sizes).  On a GPU the whole batch is one chunk.
The dense platform's per-sample rows and jvp still build the whole batch's patches: they are meant
for small networks.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import numpy as np

from kldwrm_ref.arrays import is_numpy_namespace
from kldwrm_ref.backends import Backend, direct_conv
from kldwrm_ref.backends.reference import conv_out_hw
from kldwrm_ref.model.layers import BlockSpec, Dense, Layer, ParameterFree, ReLU, affine_blocks, homogeneous_moment, host_float_dtype, per_sample
from kldwrm_ref.model.network import Network
from kldwrm_ref.validation import check_choice, check_nonnegative_int, check_positive_int

CONV_INITS = ("torch",)
KFAC_SCALINGS = ("textbook", "authors")
PATCH_CACHE_BYTES = 4 * 2**20  # CPU: a batch's patches up to this size are computed once per pass input and kept
PATCH_CHUNK_BYTES = 2 * 2**20  # CPU: above it, patches are recomputed per chunk of samples of about this size
ROW_MOMENT_FLOPS = 1.5  # A by row lowering where its product costs at most this many times the patches' Gram (docs/performance.md)


def torch_uniform(W: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> None:
    """PyTorch's default init of Linear and Conv2d (kaiming-uniform, a = sqrt(5)): W and b ~ U(-c, c)
    with c = gain sqrt(3 / fan_in) = 1 / sqrt(fan_in), gain = sqrt(2 / (1 + 5)), fan_in = W[0].size."""
    bound = 1.0 / np.sqrt(W[0].size)
    W[...] = rng.uniform(-bound, bound, W.shape)
    b[...] = rng.uniform(-bound, bound, b.shape)


class ConvCache(NamedTuple):
    """Conv2d's prepared input and forward cache: the input x (N, in, H, W) and, when they are
    kept (module docstring), its patches P (N, k, T); None where each use recomputes them in chunks."""

    x: Any
    patches: Any | None


class ConvFactors(NamedTuple):
    """Conv2d's K-FAC factors: the block G (x) A over [W | b], and the separate bias block
    G_bias (x) A_bias with A_bias = [1] and G_bias = (1/N) sum_n (sum_t delta_{n,t})(sum_t delta_{n,t})^T
    (the exact Fisher block of the bias, in both scalings)."""

    A: Any
    G: Any
    G_bias: Any
    A_bias: Any


class Conv2d:
    """2-D cross-correlation y[n, o] = sum_c W[o, c] * x[n, c] + b[o] (PyTorch ``nn.Conv2d``): square
    kernel k, ``stride`` s, zero ``padding`` p, H_out = floor((H + 2p - k) / s) + 1.  Parameters
    W (out, in, k, k) row-major, then b (out,); ``init="torch"`` is :func:`torch_uniform`.

    K-FAC (KFC, Grosse & Martens 2016; docs/theory.md §5.6).  With N samples, T output positions, pbar = [p; 1] the patch
    with the homogeneous coordinate ((k+1) x (k+1) A) and delta_{r,t} the output cotangent of row r at
    position t, ``kfac_scaling`` selects the split of the same product G (x) A:

    - "textbook": A = (1/(N T)) sum_{n,t} pbar pbar^T,   G = (1/N) sum_r sum_t delta_{r,t} delta_{r,t}^T;
    - "authors":  A = (1/(N T^2)) sum_{n,t} pbar pbar^T, G = (T/N) sum_r sum_t delta_{r,t} delta_{r,t}^T
      (the authors' code; it matters because they floor each factor's eigenvalues at 1e-6).

    ``bias="joint"``: one block G (x) A over [W | b] (W's row o flattened in (in, k, k) order, b the
    homogeneous column).  ``bias="separate"``: W gets G (x) A[:-1, :-1]; b gets G_bias (x) [1] with
    G_bias = (1/N) sum_r s_r s_r^T, s_r = sum_t delta_{r,t}, under both scalings (the authors' bias
    block, and the exact Fisher's bias block).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0, init: str = "torch", kfac_scaling: str = "textbook"):
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_channels = check_positive_int(out_channels, "out_channels")
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        self.stride = check_positive_int(stride, "stride")
        self.padding = check_nonnegative_int(padding, "padding")
        self.init_scheme = check_choice(init, "init", CONV_INITS)
        self.kfac_scaling = check_choice(kfac_scaling, "kfac_scaling", KFAC_SCALINGS)
        self.patch_size = self.in_channels * self.kernel_size**2
        self.name = f"conv {self.in_channels}->{self.out_channels} k{self.kernel_size} s{self.stride} p{self.padding}"

    def __repr__(self) -> str:
        return f"Conv2d({self.in_channels}, {self.out_channels}, {self.kernel_size}, stride={self.stride}, padding={self.padding}, init={self.init_scheme!r}, kfac_scaling={self.kfac_scaling!r})"

    def param_shapes(self):
        k = self.kernel_size
        return (("weight", (self.out_channels, self.in_channels, k, k)), ("bias", (self.out_channels,)))

    def output_shape(self, input_shape):
        if len(input_shape) != 3 or input_shape[0] != self.in_channels:
            raise ValueError(f"{self.name} expects inputs of shape ({self.in_channels}, H, W), got {input_shape}")
        h, w = self._out_hw(input_shape[1:])
        if h < 1 or w < 1:
            raise ValueError(f"{self.name}: the padded input {input_shape[1] + 2 * self.padding}x{input_shape[2] + 2 * self.padding} is smaller than the kernel")
        return (self.out_channels, h, w)

    def _out_hw(self, in_hw) -> tuple[int, int]:
        return conv_out_hw(in_hw, self.kernel_size, self.stride, self.padding)

    def im2col(self, x: Any, backend: Backend, out: Any = None) -> Any:
        """Patches P (N, k, T) of x (N, in, H, W): P[n, :, t] is the (in, kh, kw) window under output
        position t (written into ``out`` when given)."""
        return backend.im2col(x, self.kernel_size, self.stride, self.padding, out=out)

    def init(self, params, rng):
        torch_uniform(params[0], params[1], rng)

    def _chunk_samples(self, x: Any, xp: Any) -> int:
        """Samples per chunk of patches: the whole batch on a GPU or when its patches fit
        :data:`PATCH_CACHE_BYTES`, else as many as fit :data:`PATCH_CHUNK_BYTES` (at least one)."""
        h, w = self._out_hw(x.shape[2:])
        per_sample = self.patch_size * h * w * np.dtype(host_float_dtype(xp, x.dtype)).itemsize
        n = x.shape[0]
        if not is_numpy_namespace(xp) or n * per_sample <= PATCH_CACHE_BYTES:
            return n
        return max(1, PATCH_CHUNK_BYTES // per_sample)

    def _patch_chunks(self, cache: ConvCache, backend: Backend):
        """(samples, their patches) covering the batch: the kept patches once, or chunks recomputed
        into one buffer, so a chunk's patches are valid only until the next chunk is drawn."""
        if cache.patches is not None:
            yield slice(0, cache.x.shape[0]), cache.patches
            return
        n, step = cache.x.shape[0], self._chunk_samples(cache.x, backend.xp)
        h, w = self._out_hw(cache.x.shape[2:])
        buffer = np.empty((min(step, n), self.patch_size, h * w), dtype=cache.x.dtype)  # chunks exist on NumPy only
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            yield rows, self.im2col(cache.x[rows, ...], backend, out=buffer[: rows.stop - start])

    def _all_patches(self, cache: ConvCache, backend: Backend) -> Any:
        """The whole batch's patches (per-sample rows and jvp, which the dense platform uses)."""
        return cache.patches if cache.patches is not None else self.im2col(cache.x, backend)

    def convolves_directly(self) -> bool:
        """Whether a pass whose patches are not kept (the CPU's large batches) computes its output
        without patches (``Backend.conv2d``): stride 1 and few products per output position
        (:func:`kldwrm_ref.backends.direct_conv.forward_fits`; the paper CNN's first convolution,
        not its second)."""
        return self.stride == 1 and direct_conv.forward_fits(self.in_channels, self.out_channels, self.kernel_size)

    def differentiates_directly(self) -> bool:
        """Whether such a pass computes the weight and bias gradients without patches
        (``Backend.conv2d_grads``): stride 1 and a moderate size
        (:func:`kldwrm_ref.backends.direct_conv.gradient_fits`; both of the paper CNN's)."""
        return self.stride == 1 and direct_conv.gradient_fits(self.in_channels, self.out_channels, self.kernel_size)

    def _apply(self, backend: Backend, cache: ConvCache, W: Any, b: Any | None) -> Any:
        """W_mat P[n] + b per sample, as (N, out, H_out, W_out); where the patches are not kept,
        the backend's direct convolution (:meth:`convolves_directly`) or chunks (NumPy only), each
        chunk's product written in place while its patches are in cache."""
        xp = backend.xp
        if cache.patches is None and self.convolves_directly():
            return backend.conv2d(cache.x, W, b, self.stride, self.padding)
        W_mat = xp.reshape(W, (self.out_channels, self.patch_size))
        h, w = self._out_hw(cache.x.shape[2:])
        if cache.patches is not None:
            y = xp.matmul(W_mat, cache.patches)
            if b is not None:
                y += b[:, None]
        else:
            y = np.empty((cache.x.shape[0], self.out_channels, h * w), dtype=np.result_type(W_mat, cache.x))  # matmul's promotion, as the kept path
            for rows, patches in self._patch_chunks(cache, backend):
                np.matmul(W_mat, patches, out=y[rows])
                if b is not None:
                    y[rows] += b[:, None]
        return xp.reshape(y, (y.shape[0], self.out_channels, h, w))

    def prepare(self, x, backend) -> ConvCache:
        """The input-only part of :meth:`forward`: x with its patches when they are kept (reused by
        passes on one batch)."""
        keep = self._chunk_samples(x, backend.xp) >= x.shape[0]
        return ConvCache(x, self.im2col(x, backend) if keep else None)

    def forward_prepared(self, params, prepared: ConvCache, backend):
        return self._apply(backend, prepared, params[0], params[1]), prepared

    def forward(self, params, x, backend, rng):
        return self.forward_prepared(params, self.prepare(x, backend), backend)

    def backward(self, params, cache, dy, backend):
        """dx = col2im of the patch cotangents W_mat^T delta_r (k, T) per row r (in chunks of rows
        where the patches are chunked)."""
        xp = backend.xp
        deltas = xp.reshape(dy, (dy.shape[0], self.out_channels, -1))
        W_t = xp.reshape(params[0], (self.out_channels, self.patch_size)).T
        in_shape = (self.in_channels, *cache.x.shape[2:])
        if cache.patches is not None:
            return backend.col2im(xp.matmul(W_t, deltas), in_shape, self.kernel_size, self.stride, self.padding)
        step, dtype = self._chunk_samples(cache.x, xp), np.result_type(W_t, deltas)
        dx = np.empty((dy.shape[0], *in_shape), dtype=dtype)
        products = np.empty((min(step, dy.shape[0]), self.patch_size, deltas.shape[2]), dtype=dtype)  # one chunk's patch cotangents, reused
        for start in range(0, dy.shape[0], step):
            chunk = deltas[start : start + step, ...]
            np.matmul(W_t, chunk, out=products[: chunk.shape[0]])
            backend.col2im(products[: chunk.shape[0]], in_shape, self.kernel_size, self.stride, self.padding, out=dx[start : start + step])
        return dx

    def param_gradients(self, params, cache, dy, backend):
        """dW_mat = sum_n delta_n P_n^T over samples, delta_n (out, T) the cotangent summed over the
        sample's reps (they share its patches), as a stack of per-sample products: no transposing
        copy of the cotangents (twice as fast as one (out, N T) x (N T, k) product at the paper
        CNN's sizes), or the backend's direct gradients where :meth:`differentiates_directly` and
        the patches are not kept; db = the cotangent summed over rows and positions."""
        xp = backend.xp
        n, t = cache.x.shape[0], dy.shape[2] * dy.shape[3]
        deltas = xp.reshape(dy, (-1, n, self.out_channels, t))
        summed = deltas[0, ...] if deltas.shape[0] == 1 else xp.sum(deltas, axis=0)
        if cache.patches is None and self.differentiates_directly():
            dW, db = backend.conv2d_grads(cache.x, xp.reshape(summed, (n, *dy.shape[1:])), self.kernel_size, self.stride, self.padding)
            return [dW, db]
        dW = sum(xp.sum(xp.matmul(summed[rows, ...], xp.permute_dims(patches, (0, 2, 1))), axis=0) for rows, patches in self._patch_chunks(cache, backend))
        return [xp.reshape(dW, params[0].shape), xp.sum(dy, axis=(0, 2, 3))]

    def jvp(self, params, cache, dparams, dx, backend):
        dy = self._apply(backend, cache, dparams[0], dparams[1])
        if dx is not None:
            dy += self._apply(backend, self.prepare(dx, backend), params[0], None)
        return dy

    def per_sample_rows(self, cache, dy, out, start, backend):
        """out[r, W's columns] = vec_r(sum_t delta_{r,t} p_{r mod N, t}^T), out[r, b's] = sum_t delta_{r,t}."""
        xp = backend.xp
        patches = self._all_patches(cache, backend)
        n, _, t = patches.shape
        deltas = xp.reshape(dy, (-1, n, self.out_channels, t))
        n_w = self.out_channels * self.patch_size
        out[:, start : start + n_w] = xp.reshape(xp.matmul(deltas, xp.permute_dims(patches, (0, 2, 1))), (dy.shape[0], n_w))
        out[:, start + n_w : start + n_w + self.out_channels] = xp.reshape(xp.sum(deltas, axis=3), (dy.shape[0], self.out_channels))

    def kfac_factors(self, cache, dy, n_samples, backend):
        xp = backend.xp
        t = dy.shape[2] * dy.shape[3]
        A = self._patch_moment(cache, backend)
        deltas = xp.reshape(dy, (dy.shape[0], self.out_channels, t))
        second_moment = xp.sum(xp.matmul(deltas, xp.permute_dims(deltas, (0, 2, 1))), axis=0)  # sum_r sum_t delta delta^T, per row
        sums = xp.sum(dy, axis=(2, 3))
        a_scale, g_scale = (n_samples * t, n_samples) if self.kfac_scaling == "textbook" else (n_samples * t * t, n_samples / t)
        G_bias = backend.matmul(sums.T, sums) / n_samples
        return ConvFactors(A / a_scale, second_moment / g_scale, G_bias, xp.ones((1, 1), dtype=A.dtype))

    def lowers_rows(self, in_shape) -> bool:
        """Whether :meth:`_patch_moment` takes the row-lowered product for inputs of per-sample
        shape ``in_shape`` (C, H, W): R^T R has (C k W_pad)^2 entries per lowered row, the patches' Gram
        (C k k)^2 per patch, W_out patches a row; the row product wins while it costs at most
        :data:`ROW_MOMENT_FLOPS` times as much (a wider product runs nearer BLAS's peak)."""
        c, _, w = in_shape
        _, _, w_out = self.output_shape(tuple(in_shape))  # refuses inputs the kernel does not fit
        return (c * self.kernel_size * (w + 2 * self.padding)) ** 2 <= ROW_MOMENT_FLOPS * w_out * self.patch_size**2

    def _patch_moment(self, cache: ConvCache, backend: Backend) -> Any:
        """sum_{n,t} pbar pbar^T, unscaled ((k+1) x (k+1), the homogeneous coordinate last): by row
        lowering (:meth:`_row_moment`) where :meth:`lowers_rows`, else the patches' Gram, chunk by chunk."""
        if self.lowers_rows(cache.x.shape[1:]):
            return self._row_moment(cache.x, backend)
        xp, k = backend.xp, self.patch_size
        return sum(homogeneous_moment(xp.reshape(xp.permute_dims(patches, (1, 0, 2)), (k, -1)).T, backend) for _, patches in self._patch_chunks(cache, backend))  # a (k, n T) copy per chunk

    def _lowered_rows(self, x: Any, backend: Backend):
        """The lowered rows (samples H_out, C k W_pad) of x (:func:`~kldwrm_ref.backends.reference.lower_rows`),
        chunk by chunk: on the CPU chunks of samples of at most :data:`PATCH_CHUNK_BYTES`, built into
        one buffer (a chunk is valid until the next is drawn); on a GPU the whole batch."""
        xp, kernel = backend.xp, self.kernel_size
        n, c, h, w = x.shape
        h_out, _ = self._out_hw((h, w))
        width = c * kernel * (w + 2 * self.padding)
        if not is_numpy_namespace(xp):
            yield backend.lower_rows(x, kernel, self.stride, self.padding)
            return
        step = max(1, PATCH_CHUNK_BYTES // (h_out * width * x.dtype.itemsize))
        buffer = np.empty((min(step, n) * h_out, width), dtype=x.dtype)
        for start in range(0, n, step):
            samples = min(step, n - start)
            yield backend.lower_rows(x[start : start + samples, ...], kernel, self.stride, self.padding, out=buffer[: samples * h_out])

    def _row_moment(self, x: Any, backend: Backend) -> Any:
        """sum_{n,t} pbar pbar^T without the patches (docs/theory.md §5.6, "A by row lowering"): with the
        zero-padded input's rows lowered (:meth:`_lowered_rows`, R[(n, a), (c, i, u)] = x_pad[n, c, a s + i, u],
        one row per sample and output row, k-fold the input) and M = R^T R, the patch at (a, b) holds
        x[n, c, a s + i, b s + j], so A[(c, i, j), (c', i', j')] = sum_b M[(c, i, b s + j), (c', i', b s + j')]
        and its homogeneous column sum_b (R^T 1)[(c, i, b s + j)]: one product with W_pad-wide blocks
        and W_out sums of (C k k)^2 entries."""
        xp, kernel, s, p, k = backend.xp, self.kernel_size, self.stride, self.padding, self.patch_size
        n, c, h, w = x.shape
        h_out, w_out = self._out_hw((h, w))
        M = column = None
        for R in self._lowered_rows(x, backend):
            product, sums = backend.matmul(R.T, R), backend.matmul(xp.ones((1, R.shape[0]), dtype=R.dtype), R)
            M, column = (product, sums) if M is None else (M + product, column + sums)
        M = xp.reshape(M, (c * kernel, w + 2 * p, c * kernel, w + 2 * p))
        column = xp.reshape(column, (c * kernel, w + 2 * p))
        blocks, sums = M[:, 0:kernel, :, 0:kernel], column[:, 0:kernel]
        for b in range(1, w_out):  # a running sum: no W_out-fold temporary
            blocks, sums = blocks + M[:, b * s : b * s + kernel, :, b * s : b * s + kernel], sums + column[:, b * s : b * s + kernel]
        A = xp.empty((k + 1, k + 1), dtype=M.dtype)
        A[:k, :k] = xp.reshape(blocks, (k, k))
        sums = xp.reshape(sums, (k,))
        A[:k, k] = sums
        A[k, :k] = sums
        A[k, k] = float(n * h_out * w_out)
        return A

    def kfac_blocks(self, start, bias, name):
        bias_block = BlockSpec("bias", np.empty(0, dtype=int), slice(None), a_factor=3, g_factor=2)  # G_bias (x) A_bias
        return affine_blocks(start, self.out_channels, self.patch_size, bias, name, bias_block)


class MaxPool2d(ParameterFree):
    """Max over non-overlapping k x k windows (stride k, no padding; the last H mod k rows and
    W mod k columns are dropped, as PyTorch).  The cache is the argmax within each window (the first
    maximum in row-major window order, as PyTorch); backward routes the cotangent there and jvp reads
    the tangent there."""

    def __init__(self, kernel_size: int = 2):
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        self.name = f"max-pool {self.kernel_size}"

    def __repr__(self) -> str:
        return f"MaxPool2d({self.kernel_size})"

    def output_shape(self, input_shape):
        k = self.kernel_size
        if len(input_shape) != 3 or input_shape[1] < k or input_shape[2] < k:
            raise ValueError(f"{self.name} expects inputs of shape (C, H, W) with H, W >= {k}, got {input_shape}")
        return (input_shape[0], input_shape[1] // k, input_shape[2] // k)

    def taps(self, x: Any):
        """(index, view) for each of the k*k window offsets in row-major order: view[n, c, i, j] is
        x[n, c, k i + di, k j + dj] (strided views, no copies)."""
        k = self.kernel_size
        h, w = x.shape[2] // k, x.shape[3] // k
        for index in range(k * k):
            di, dj = divmod(index, k)
            yield index, x[:, :, di : di + k * h : k, dj : dj + k * w : k]

    def forward(self, params, x, backend, rng):
        y, argmax = backend.max_pool(x, self.kernel_size)
        return y, (argmax, x.shape[1:])

    def backward(self, params, cache, dy, backend):
        argmax, in_shape = cache
        return backend.max_unpool(dy, argmax, in_shape, self.kernel_size)

    def jvp(self, params, cache, dparams, dx, backend):
        if dx is None:
            return None
        xp, argmax = backend.xp, cache[0]
        out = None
        for index, view in self.taps(dx):
            out = view if out is None else xp.where(argmax == index, view, out)
        return out


class Flatten(ParameterFree):
    """(N, C, H, W) -> (N, C * H * W), channel-major (PyTorch ``view``); the cache is (C, H, W)."""

    name = "flatten"

    def __repr__(self) -> str:
        return "Flatten()"

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, params, x, backend, rng):
        return backend.xp.reshape(x, (x.shape[0], -1)), x.shape[1:]

    def backward(self, params, shape, dy, backend):
        return backend.xp.reshape(dy, (dy.shape[0], *shape))

    def jvp(self, params, shape, dparams, dx, backend):
        return None if dx is None else backend.xp.reshape(dx, (dx.shape[0], -1))


class Dropout(ParameterFree):
    """Inverted dropout: in training (``rng`` a Generator) y = x m with m_i = 1[u_i >= p] / (1 - p),
    u_i ~ U[0, 1) (each unit kept with probability 1 - p); with rng=None (evaluation) y = x.
    The mask is drawn on the host in x's precision and moved to the backend's namespace; the
    cache is the scaled mask m (None in evaluation); backward and jvp multiply by it."""

    stochastic = True

    def __init__(self, p: float = 0.5):
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 <= float(p) < 1.0):
            raise ValueError(f"p must be a real number in [0, 1), got {p!r}")
        self.p: float = float(p)
        self.name = f"dropout {self.p:g}"

    def __repr__(self) -> str:
        return f"Dropout({self.p:g})"

    def forward(self, params, x, backend, rng):
        if rng is None:
            return x, None
        dtype = host_float_dtype(backend.xp, x.dtype)
        mask = backend.asarray((rng.random(x.shape) >= self.p).astype(dtype) / dtype.type(1.0 - self.p))
        return x * mask, mask

    def backward(self, params, mask, dy, backend):
        if mask is None:
            return dy
        xp = backend.xp
        dy_b, mask_b = per_sample(xp, dy, mask)
        return xp.reshape(dy_b * mask_b, dy.shape)

    def jvp(self, params, mask, dparams, dx, backend):
        return dx if dx is None or mask is None else dx * mask


def paper_cnn(dropout: float = 0.5, dtype=np.float64, backend: str | Backend = "numpy") -> Network:
    """The authors' MNIST CNN (4,712 parameters) on (1, 28, 28) inputs:
    Conv2d(1, 5, 5) -> MaxPool2d(2) -> ReLU -> Conv2d(5, 7, 5) -> MaxPool2d(2) -> ReLU -> Flatten (112)
    -> Dense(112, 30) -> ReLU -> Dropout(dropout) -> Dense(30, 10), all with PyTorch's default init.
    The convolutions use the authors' K-FAC scaling (``kfac_scaling="authors"``)."""
    layers: list[Layer] = [
        Conv2d(1, 5, 5, kfac_scaling="authors"),
        MaxPool2d(2),
        ReLU(),
        Conv2d(5, 7, 5, kfac_scaling="authors"),
        MaxPool2d(2),
        ReLU(),
        Flatten(),
        Dense(112, 30, init="torch"),
        ReLU(),
        Dropout(dropout),
        Dense(30, 10, init="torch"),
    ]
    return Network(layers, (1, 28, 28), dtype, backend)
