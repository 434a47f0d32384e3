"""Direct convolution kernels for the CPU, generated per shape: the forward pass and the weight
and bias gradients of a stride-1 convolution without patches (docs/performance.md, "The convolution
without patches").

A convolution with few products per output position (the paper CNN's first one: 5 outputs of
25 taps each) is badly shaped for im2col and BLAS: the patches are 25 times the input and the
per-sample products have 5 rows.  Here each output is a sum over taps read straight from the
input, y[n, o, a, b] = sum_{c,i,j} W[o, c, i, j] x[n, c, a + i, b + j], and LLVM vectorises the loop
over an output row's b (8 or 16 positions per instruction) provided that

- the taps are unrolled, with every weight a scalar hoisted out of the loops, and all outputs of
  one position held in scalars (the loop's body: one load per tap, O fused multiply-adds per
  load, one store per output channel);
- every array is addressed as one flat block through compile-time strides, so that LLVM checks
  one pair of pointers for overlap (with a 4-D array and runtime strides it gave up: "too many
  memory checks needed").

Both need the shape as constants, so the kernel's source is written for each (C, O, k, H, W) (and dtype, for the gradient)
by :func:`forward_source` / :func:`gradient_source` and compiled once per process
(:func:`forward_kernel`, :func:`gradient_kernel`; about a second each).  The unrolled body
grows with O C k^2, so :func:`forward_fits` limits it to :data:`MAX_FORWARD_PRODUCTS` (the paper
CNN's second convolution, 875 products per position, took 70 s to compile and was not vectorised).

The weight gradient dW[o, c, i, j] = sum_{n,a,b} dy[n, o, a, b] x[n, c, a + i, b + j] is computed per
sample and input row offset (c, i) as O k dot products over the flattened output, in scalars
that LLVM turns into vector accumulators, a block of output channels at a time (one body for the
full blocks, in a loop, and one for the rest, so the source stays small whatever O is): each
sample's cotangent is first copied into rows of the input's width W (zeros past W_out), so that
output position t = a W + b reads input t + i W + j at a constant offset; the padding positions
add zero products (so an inf or NaN in x can make a tap NaN whose windows never reach it: 0 inf;
the network's inputs are checked finite).  The bias gradient
db[o] = sum_{n,a,b} dy[n, o, a, b] is summed per sample in a loop of its own (summed within the
copy, it made the kernel 2.5x slower).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

MAX_FORWARD_PRODUCTS = 128  # products per output position (O C k^2) of a generated forward kernel
MAX_GRADIENT_PRODUCTS = 4096  # of a generated gradient kernel (docs/performance.md: it still won at 4,608, lost at 9,216)
MAX_ACCUMULATORS = 25  # the gradient's scalars per loop (a block of output channels times k)


def forward_fits(in_channels: int, out_channels: int, kernel: int) -> bool:
    """Whether the generated forward kernel takes a convolution of this size (O C k^2 <= :data:`MAX_FORWARD_PRODUCTS`)."""
    return out_channels * in_channels * kernel * kernel <= MAX_FORWARD_PRODUCTS


def gradient_fits(in_channels: int, out_channels: int, kernel: int) -> bool:
    """Whether the generated gradient kernel takes a convolution of this size (O C k^2 <= :data:`MAX_GRADIENT_PRODUCTS`):
    its source has two unrolled blocks of at most :data:`MAX_ACCUMULATORS` products whatever the
    size, but with many channels the patches' products run nearer BLAS's peak."""
    return out_channels * in_channels * kernel * kernel <= MAX_GRADIENT_PRODUCTS


def _taps(c: int, k: int) -> list[tuple[int, int, int]]:
    return [(ch, i, j) for ch in range(c) for i in range(k) for j in range(k)]


def forward_source(c: int, o: int, k: int, h: int, w: int) -> str:
    """Source of ``conv(x, weight, bias, y)``: x the flat (N, C, H, W) input, weight (O, C, k, k),
    bias (O,), y the flat (N, O, H - k + 1, W - k + 1) output, overwritten.  Each output sums its
    taps in (c, i, j) order (the order of im2col's rows) by fused multiply-adds, then adds the
    bias, as the product with the patches does."""
    out_h, out_w = h - k + 1, w - k + 1
    plane, out_plane = h * w, out_h * out_w
    lines = ["def conv(x, weight, bias, y):"]
    lines += [f"    w_{q}_{ch}_{i}_{j} = weight[{q}, {ch}, {i}, {j}]" for q in range(o) for ch, i, j in _taps(c, k)]
    lines += [f"    b_{q} = bias[{q}]" for q in range(o)]
    lines += [
        f"    for n in range(x.size // {c * plane}):",
        f"        for a in range({out_h}):",
        f"            source = n * {c * plane} + a * {w}",
        f"            target = n * {o * out_plane} + a * {out_w}",
        f"            for b in range({out_w}):",
    ]
    for tap, (ch, i, j) in enumerate(_taps(c, k)):
        lines.append(f"                v = x[source + b + {ch * plane + i * w + j}]")
        lines += [f"                s{q} {'=' if tap == 0 else '+='} w_{q}_{ch}_{i}_{j} * v" for q in range(o)]
    lines += [f"                y[target + b + {q * out_plane}] = s{q} + b_{q}" for q in range(o)]
    return "\n".join(lines)


def gradient_source(c: int, o: int, k: int, h: int, w: int, dtype: str) -> str:
    """Source of ``grads(x, dy, dw, db)``: x the flat (N, C, H, W) input, dy the flat (N, O, H - k + 1,
    W - k + 1) output cotangent, dw (O, C, k, k) overwritten with the sum over samples and positions
    of dy x at each tap and db (O,) with the sum of dy (module docstring)."""
    out_h, out_w = h - k + 1, w - k + 1
    plane, out_plane = h * w, out_h * out_w
    length = (out_h - 1) * w + out_w  # flattened positions t = a W + b up to the last output
    block = max(1, MAX_ACCUMULATORS // k)  # output channels per loop
    lines = [
        "def grads(x, dy, dw, db):",
        f"    zero = np.{dtype}(0)",
        "    dw[...] = zero",
        "    db[...] = zero",
        f"    rows = np.zeros({o * out_h * w}, dtype=np.{dtype})  # one sample's cotangent in rows of width W",
        f"    for n in range(x.size // {c * plane}):",
        f"        cotangent = dy[n * {o * out_plane} :]",
        f"        for q in range({o}):",
        f"            for a in range({out_h}):",
        f"                for b in range({out_w}):",
        f"                    rows[q * {out_h * w} + a * {w} + b] = cotangent[q * {out_plane} + a * {out_w} + b]",
        f"        for q in range({o}):",
        "            total = zero",
        f"            for u in range({out_plane}):",
        f"                total += cotangent[q * {out_plane} + u]",
        "            db[q] += total",
        f"        for ch in range({c}):",
        f"            for i in range({k}):",
        f"                source = x[n * {c * plane} + ch * {plane} + i * {w} :]  # a view: its indices are provably nonnegative",
    ]
    full, rest = divmod(o, block)
    for first, size, indent in (("first", block, "    "), (str(full * block), rest, "")):  # the full blocks in a loop, then the rest
        if size == 0 or (indent and full == 0):
            continue
        if indent:
            lines.append(f"                for first in range(0, {full * block}, {block}):")
        pad = "                " + indent
        lines.append(f"{pad}block = rows[{first} * {out_h * w} :]")
        lines += [f"{pad}s{q}_{j} = zero" for q in range(size) for j in range(k)]
        lines.append(f"{pad}for t in range({length}):")
        lines += [f"{pad}    v{j} = source[t + {j}]" for j in range(k)]
        lines += [f"{pad}    d{q} = block[t + {q * out_h * w}]" for q in range(size)]
        lines += [f"{pad}    s{q}_{j} += d{q} * v{j}" for q in range(size) for j in range(k)]
        lines += [f"{pad}dw[{first} + {q}, ch, i, {j}] += s{q}_{j}" for q in range(size) for j in range(k)]
    return "\n".join(lines)


def _compile(source: str, name: str, fastmath: set[str]):
    namespace: dict = {"np": np}
    exec(compile(source, f"<kldwrm_ref direct convolution {name}>", "exec"), namespace)  # our own generated source, no input
    return njit(fastmath=fastmath)(namespace[name])


@functools.cache
def forward_kernel(c: int, o: int, k: int, h: int, w: int):
    """The compiled :func:`forward_source` (fused multiply-adds, no reassociation)."""
    return _compile(forward_source(c, o, k, h, w), "conv", {"contract"})


@functools.cache
def gradient_kernel(c: int, o: int, k: int, h: int, w: int, dtype: str):
    """The compiled :func:`gradient_source`; its sums are reassociated into vector accumulators
    (the order of a sum over positions differs from BLAS's, rounding only)."""
    return _compile(gradient_source(c, o, k, h, w, dtype), "grads", {"contract", "reassoc", "nsz"})
