"""The device kernels of the device-resident step that the Backend does not already have.

Elementwise and row kernels stride over their output (one job each); the reductions run in one
block (per-thread partial sums in shared memory, added by thread 0) and write one float64 entry of a small "scalars" array, so a step
reads all its scalars (loss, norms, clip inputs) in one short copy.  Every launcher takes device
arrays only (:func:`kldwrm_ref.backends.cuda.launch` refuses host arrays) and returns device arrays.
Their NumPy twins are the lines of :mod:`kldwrm_ref.model` and :mod:`kldwrm_ref.optim` they replace;
tests/test_gpu.py checks each against them and the whole step against the NumPy step.
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, float64

from kldwrm_ref.backends.cuda import launch

REDUCE = 4 if config.ENABLE_CUDASIM else 256  # threads of the one-block reductions (a power of 2)


# ------------------------------------------------------------------------ elementwise
@cuda.jit
def _fill_kernel(x, value):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        x[i] = value


@cuda.jit
def _axpby_kernel(a, x, b, y, out):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = a * x[i] + b * y[i]


@cuda.jit
def _scale_kernel(x, a):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        x[i] *= a


@cuda.jit
def _relu_kernel(x, y, derivative):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        y[i] = 0.0 if x[i] <= 0 else x[i]  # a NaN passes through, as np.maximum(NaN, 0)
        derivative[i] = 1.0 if x[i] > 0 else 0.0


@cuda.jit
def _tanh_kernel(x, y, derivative):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        value = math.tanh(x[i])
        y[i] = value
        derivative[i] = 1.0 - value * value


@cuda.jit
def _dropout_kernel(x, keep, keep_probability, y, mask):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        mask[i] = keep[i] / keep_probability
        y[i] = x[i] * mask[i]


@cuda.jit
def _multiply_rows_kernel(dy, factor, out):
    """out[r, f] = dy[r, f] * factor[r mod N, f] (cotangent rows against per-sample factors)."""
    width, n = dy.shape[1], factor.shape[0]
    for flat in range(cuda.grid(1), dy.size, cuda.gridsize(1)):
        r, f = flat // width, flat % width
        out[r, f] = dy[r, f] * factor[r % n, f]


@cuda.jit
def _add_rows_kernel(y, b):
    width = y.shape[1]
    for flat in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        y[flat // width, flat % width] += b[flat % width]


# ------------------------------------------------------------------ layout changes
@cuda.jit
def _conv_output_kernel(rows, b, out):
    """out[n, o, t] = rows[n T + t, o] + b[o] (position rows to channel-major outputs)."""
    channels, positions = out.shape[1], out.shape[2]
    for flat in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        n, rest = flat // (channels * positions), flat % (channels * positions)
        o, t = rest // positions, rest % positions
        out[n, o, t] = rows[n * positions + t, o] + b[o]


@cuda.jit
def _channels_to_rows_kernel(dy, rows):
    """rows[r T + t, o] = dy[r, o, t]."""
    channels, positions = dy.shape[1], dy.shape[2]
    for flat in range(cuda.grid(1), dy.size, cuda.gridsize(1)):
        r, rest = flat // (channels * positions), flat % (channels * positions)
        o, t = rest // positions, rest % positions
        rows[r * positions + t, o] = dy[r, o, t]


@cuda.jit
def _gather_kernel(source, index, out):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = source[index[i]]


@cuda.jit
def _scatter_kernel(values, index, out):
    for i in range(cuda.grid(1), values.size, cuda.gridsize(1)):
        out[index[i]] = values[i]


@cuda.jit
def _take_rows_kernel(source, order, start, out):
    """out[i] = source[order[start + i]] row by row (a batch of a device-resident data set)."""
    width = out.shape[1]
    for flat in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        i, f = flat // width, flat % width
        out[i, f] = source[order[start + i], f]


@cuda.jit
def _take_kernel(source, order, start, out):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = source[order[start + i]]


# ------------------------------------------------------------------------ row sums
@cuda.jit
def _column_sums_kernel(rows, out):
    """out[c] = sum_m rows[m, c], one thread per column (a fixed order: deterministic)."""
    for c in range(cuda.grid(1), rows.shape[1], cuda.gridsize(1)):
        total = 0.0
        for m in range(rows.shape[0]):
            total += rows[m, c]
        out[c] = total


@cuda.jit
def _last_sums_kernel(x, out):
    """out[r, o] = sum_t x[r, o, t]."""
    channels = x.shape[1]
    for flat in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        r, o = flat // channels, flat % channels
        total = 0.0
        for t in range(x.shape[2]):
            total += x[r, o, t]
        out[r, o] = total


@cuda.jit
def _gram_kernel(rows, scale, homogeneous, out):
    """out = scale * sum_m abar_m abar_m^T, abar_m = rows[m] (with a trailing 1 when homogeneous)."""
    size, width = out.shape[0], rows.shape[1]
    for flat in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        i, j = flat // size, flat % size
        total = 0.0
        if i < width and j < width:
            for m in range(rows.shape[0]):
                total += rows[m, i] * rows[m, j]
        elif i < width:
            for m in range(rows.shape[0]):
                total += rows[m, i]
        elif j < width:
            for m in range(rows.shape[0]):
                total += rows[m, j]
        else:
            total = rows.shape[0]
        out[i, j] = scale * total


# ------------------------------------------------------------------ softmax rows
@cuda.jit
def _softmax_kernel(logits, probs):
    for i in range(cuda.grid(1), logits.shape[0], cuda.gridsize(1)):
        top = logits[i, 0]
        for c in range(1, logits.shape[1]):
            top = max(top, logits[i, c])
        total = 0.0
        for c in range(logits.shape[1]):
            total += math.exp(logits[i, c] - top)
        for c in range(logits.shape[1]):
            probs[i, c] = math.exp(logits[i, c] - top) / total


@cuda.jit
def _exact_rows_kernel(probs, out):
    """out[c N + i, d] = sqrt(pi_c) (e_c - pi)_d of sample i (the exact Fisher's cotangents, rep-major)."""
    n, classes = probs.shape
    for flat in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        row, d = flat // classes, flat % classes
        c, i = row // n, row % n
        value = -math.sqrt(probs[i, c]) * probs[i, d]
        if c == d:
            value += math.sqrt(probs[i, c])
        out[row, d] = value


@cuda.jit
def _sampled_rows_kernel(probs, labels, scale, out):
    """out[s N + i, d] = scale (pi_i - e_{labels[s, i]})_d (Monte-Carlo cotangents, rep-major)."""
    n, classes = probs.shape
    for flat in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        row, d = flat // classes, flat % classes
        s, i = row // n, row % n
        value = probs[i, d] - (1.0 if labels[s, i] == d else 0.0)
        out[row, d] = scale * value


# ------------------------------------------------------------------------ reductions
@cuda.jit(device=True)
def _block_total(partial, t):
    """After every thread stored its partial sum: thread 0 adds them in order (one barrier)."""
    cuda.syncthreads()
    result = 0.0
    if t == 0:
        for i in range(REDUCE):
            result += partial[i]
    return result


DOT, SUM, NONFINITE = 0, 1, 2  # what _reduce_kernel adds up


@cuda.jit
def _reduce_kernel(x, y, kind, out, index):
    """out[index] = sum_i x_i y_i (DOT), sum_i x_i (SUM) or #{i : x_i not finite} (NONFINITE)."""
    partial = cuda.shared.array(REDUCE, float64)
    t = cuda.threadIdx.x
    total = 0.0
    for i in range(t, x.size, REDUCE):
        if kind == DOT:
            total += x[i] * y[i]
        elif kind == SUM:
            total += x[i]
        elif not math.isfinite(x[i]):
            total += 1.0
    partial[t] = total
    result = _block_total(partial, t)
    if t == 0:
        out[index] = result


# ------------------------------------------------------------------------ launchers
def flat(x):
    """A 1-D view of a contiguous device array."""
    return x.reshape(x.size)


def empty(shape, dtype):
    return cuda.device_array(shape, dtype=np.dtype(dtype))


def launch_fill(x, value: float) -> None:
    """x[...] = value in place."""
    launch(_fill_kernel, x.size, flat(x), float(value))


def zeros(shape, dtype):
    out = empty(shape, dtype)
    launch_fill(out, 0.0)
    return out


def axpby(a: float, x, b: float, y, out=None):
    """a x + b y (flat, same sizes); into ``out`` when given."""
    out = empty(x.shape, x.dtype) if out is None else out
    launch(_axpby_kernel, out.size, float(a), flat(x), float(b), flat(y), flat(out))
    return out


def copy(x):
    return axpby(1.0, x, 0.0, x)


def scale(x, a: float) -> None:
    """x *= a in place."""
    launch(_scale_kernel, x.size, flat(x), float(a))


def relu(x):
    """(max(x, 0), 1[x > 0])."""
    y, derivative = empty(x.shape, x.dtype), empty(x.shape, x.dtype)
    launch(_relu_kernel, x.size, flat(x), flat(y), flat(derivative))
    return y, derivative


def tanh(x):
    """(tanh x, 1 - tanh^2 x)."""
    y, derivative = empty(x.shape, x.dtype), empty(x.shape, x.dtype)
    launch(_tanh_kernel, x.size, flat(x), flat(y), flat(derivative))
    return y, derivative


def dropout(x, keep, keep_probability: float):
    """(x m, m) with m = keep / (1 - p) from the uint8 keep flags."""
    y, mask = empty(x.shape, x.dtype), empty(x.shape, x.dtype)
    launch(_dropout_kernel, x.size, flat(x), flat(keep), float(keep_probability), flat(y), flat(mask))
    return y, mask


def multiply_rows(dy, factor):
    """dy * factor with dy's reps * N rows against factor's N (row r uses r mod N)."""
    rows = dy.reshape(dy.shape[0], dy.size // dy.shape[0])
    out = empty(rows.shape, dy.dtype)
    launch(_multiply_rows_kernel, out.size, rows, factor.reshape(factor.shape[0], factor.size // factor.shape[0]), out)
    return out.reshape(dy.shape)


def add_rows(y, b) -> None:
    """y[i] += b for every row, in place."""
    launch(_add_rows_kernel, y.size, y, b)


def conv_output(rows, b, out_shape):
    """(N, O, H, W) outputs from position rows (N T, O) plus the bias."""
    n, channels = out_shape[0], out_shape[1]
    out = empty((n, channels, rows.shape[0] // n), rows.dtype)
    launch(_conv_output_kernel, out.size, rows, b, out)
    return out.reshape(out_shape)


def channels_to_rows(dy):
    """(R T, O) position rows from cotangents (R, O, H, W)."""
    r, channels = dy.shape[0], dy.shape[1]
    cube = dy.reshape(r, channels, dy.size // (r * channels))
    rows = empty((r * cube.shape[2], channels), dy.dtype)
    launch(_channels_to_rows_kernel, cube.size, cube, rows)
    return rows


def gather(source, index):
    out = empty(index.shape, source.dtype)
    launch(_gather_kernel, out.size, source, index, out)
    return out


def scatter(values, index, out) -> None:
    """out[index] = values (flat)."""
    launch(_scatter_kernel, values.size, flat(values), index, out)


def take_rows(source, order, start: int, count: int):
    """Rows source[order[start:start + count]] (a batch of a device-resident data set)."""
    if source.ndim == 1:
        out = empty((count,), source.dtype)
        launch(_take_kernel, count, source, order, int(start), out)
        return out
    out = empty((count, source.shape[1]), source.dtype)
    launch(_take_rows_kernel, out.size, source, order, int(start), out)
    return out


def column_sums(rows, out) -> None:
    """out = rows.sum(axis=0) (out may be a view into theta's gradient)."""
    launch(_column_sums_kernel, rows.shape[1], rows, out)


def last_sums(x):
    """x (R, O, H, W) summed over the spatial positions: (R, O)."""
    r, channels = x.shape[0], x.shape[1]
    cube = x.reshape(r, channels, x.size // (r * channels))
    out = empty((r, channels), x.dtype)
    launch(_last_sums_kernel, out.size, cube, out)
    return out


def gram(rows, scale_by: float, homogeneous: bool):
    """scale * sum over rows of abar abar^T (abar = [row; 1] when homogeneous)."""
    size = rows.shape[1] + int(homogeneous)
    out = empty((size, size), rows.dtype)
    launch(_gram_kernel, out.size, rows, float(scale_by), bool(homogeneous), out)
    return out


def softmax(logits):
    probs = empty(logits.shape, logits.dtype)
    launch(_softmax_kernel, logits.shape[0], logits, probs)
    return probs


def exact_rows(probs):
    n, classes = probs.shape
    out = empty((classes * n, classes), probs.dtype)
    launch(_exact_rows_kernel, out.size, probs, out)
    return out


def sampled_rows(probs, labels):
    samples, n = labels.shape
    out = empty((samples * n, probs.shape[1]), probs.dtype)
    launch(_sampled_rows_kernel, out.size, probs, labels, 1.0 / math.sqrt(samples), out)
    return out


def _reduce(kind: int, scalars, index: int, x, y) -> None:
    for array in (x, y):
        if isinstance(array, np.ndarray):
            raise TypeError("a host array was passed to a device reduction; upload it first")
    _reduce_kernel[1, REDUCE](flat(x), flat(y), kind, scalars, int(index))


def dot(x, y, scalars, index: int) -> None:
    """scalars[index] = <x, y> (accumulated in float64)."""
    _reduce(DOT, scalars, index, x, y)


def total(x, scalars, index: int) -> None:
    """scalars[index] = sum of x."""
    _reduce(SUM, scalars, index, x, x)


def nonfinite(x, scalars, index: int) -> None:
    """scalars[index] = how many entries of x are NaN or infinite."""
    _reduce(NONFINITE, scalars, index, x, x)
