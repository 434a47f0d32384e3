"""Every kernel of the numba and cuda backends against its NumPy twin (kldwrm_ref.backends.reference).

The cuda backend runs on numba's simulator here (conftest sets NUMBA_ENABLE_CUDASIM=1 unless the
environment says 0); the same tests run unchanged on a GPU.  Shapes include tiny, odd and
non-square ones; the simulator runs kernels in Python, so its shapes stay small.
"""

import numpy as np
import pytest
from devices import CUDA
from hypothesis import given, settings
from hypothesis import strategies as st

from kldwrm_ref import MLP, optim
from kldwrm_ref.backends import AUTO_NUMPY, BACKENDS, NUMPY, OPERATIONS, get_backend
from kldwrm_ref.backends import reference as ops

KERNEL_BACKENDS = ["numba", CUDA]
TOLERANCE = {np.float64: 1e-12, np.float32: 2e-5}  # relative to the largest entry


def close(got, want, dtype):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    assert np.max(np.abs(got - want), initial=0.0) <= TOLERANCE[dtype] * scale


shapes = st.tuples(st.integers(1, 9), st.integers(2, 7))
dtypes = st.sampled_from([np.float64, np.float32])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(max_examples=6)
@given(shape=shapes, dtype=dtypes, seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 30.0]))
def test_softmax_xent_and_kl_kernels(backend, shape, dtype, seed, scale):
    be = get_backend(backend)
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal(shape)).astype(dtype)
    ref = (scale * rng.standard_normal(shape)).astype(dtype)
    labels = rng.integers(0, shape[1], shape[0])
    for got, want in zip(be.softmax_cross_entropy(logits, labels), ops.softmax_cross_entropy(logits, labels)):
        close(got, want, dtype)
    for kind in ("forward", "symmetric"):
        for got, want in zip(be.kl_and_grad(ref, logits, kind), ops.kl_and_grad(ref, logits, kind)):
            close(got, want, dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(max_examples=6)
@given(shape=shapes, dtype=dtypes, seed=st.integers(0, 2**16), samples=st.integers(1, 3))
def test_fisher_kernels(backend, shape, dtype, seed, samples):
    be = get_backend(backend)
    rng = np.random.default_rng(seed)
    probs = np.exp(ops.log_softmax(rng.standard_normal(shape))).astype(dtype)
    uniforms = rng.random((samples, shape[0]))
    np.testing.assert_array_equal(be.sample_labels(probs, uniforms), ops.sample_labels(probs, uniforms))
    close(be.fisher_cotangents(probs), ops.fisher_cotangents(probs), dtype)
    n_in = int(rng.integers(1, 5))
    deltas = rng.standard_normal((samples * shape[0], shape[1])).astype(dtype)
    inputs = rng.standard_normal((shape[0], n_in)).astype(dtype)
    width = shape[1] * n_in + shape[1]
    got, want = np.full((deltas.shape[0], width + 3), 7.0, dtype), np.full((deltas.shape[0], width + 3), 7.0, dtype)
    be.per_sample_rows(deltas, inputs, got, 2)
    ops.per_sample_rows(deltas, inputs, want, 2)
    close(got, want, dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(max_examples=6)
@given(shape=shapes, dtype=dtypes, seed=st.integers(0, 2**16), rho=st.floats(0.0, 0.99))
def test_curvature_kernels(backend, shape, dtype, seed, rho):
    be = get_backend(backend)
    rng = np.random.default_rng(seed)
    rotated = rng.standard_normal(shape).astype(dtype)
    d_g, d_a = rng.random(shape[0]).astype(dtype), rng.random(shape[1]).astype(dtype)
    close(be.eigen_divide(rotated, d_g, d_a, 0.1), ops.eigen_divide(rotated, d_g, d_a, 0.1), dtype)
    close(be.kron_sum_divide(rotated, d_g, d_a, 0.3), ops.kron_sum_divide(rotated, d_g, d_a, 0.3), dtype)
    new = rng.standard_normal(shape).astype(dtype)
    close(be.ea_update(rotated, new, rho), ops.ea_update(rotated, new, rho), dtype)
    out = np.empty_like(rotated)
    assert be.ea_update(rotated, new, rho, out=out) is out
    close(out, ops.ea_update(rotated, new, rho), dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(max_examples=5)
@given(m=st.integers(1, 11), k=st.integers(1, 13), n=st.integers(1, 9), dtype=dtypes, seed=st.integers(0, 2**16), transpose=st.sampled_from(["", "a", "b", "ab"]))
def test_matmul_and_its_transposed_variants(backend, m, k, n, dtype, seed, transpose):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m) if "a" in transpose else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if "b" in transpose else (k, n)).astype(dtype)
    a = a.T if "a" in transpose else a  # transposed views, read in place by the cuda kernel
    b = b.T if "b" in transpose else b
    close(get_backend(backend).matmul(a, b), a @ b, dtype)


conv_geometry = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2))  # channels, kernel, stride, padding


def _direct_im2col(x, k, s, p):
    """Patches (N, C k k, T) by explicit loops over samples, positions and (c, i, j) (independent of the kernels)."""
    n, c, h, w = x.shape
    out_h, out_w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    cols = np.zeros((n, c * k * k, out_h * out_w), dtype=x.dtype)
    for a in range(n):
        for oh in range(out_h):
            for ow in range(out_w):
                for ch in range(c):
                    for i in range(k):
                        for j in range(k):
                            hh, ww = oh * s + i - p, ow * s + j - p
                            if 0 <= hh < h and 0 <= ww < w:
                                cols[a, (ch * k + i) * k + j, oh * out_w + ow] = x[a, ch, hh, ww]
    return cols


@pytest.mark.parametrize("backend", ["numpy", *KERNEL_BACKENDS])
@settings(max_examples=6)
@given(geometry=conv_geometry, n=st.integers(1, 3), extra=st.tuples(st.integers(0, 4), st.integers(0, 3)), reps=st.integers(1, 2), dtype=dtypes, seed=st.integers(0, 2**16))
def test_im2col_and_its_adjoint(backend, geometry, n, extra, reps, dtype, seed):
    """im2col equals the direct loops; col2im is its adjoint: <col2im(u), x> = <u, im2col(x)>."""
    channels, k, s, p = geometry
    shape = (channels, max(1, k - 2 * p) + extra[0], max(1, k - 2 * p) + extra[1])
    be, rng = get_backend(backend), np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)).astype(dtype)
    cols = be.im2col(x, k, s, p)
    close(cols, _direct_im2col(x, k, s, p), dtype)
    u = rng.standard_normal((reps * n, *cols.shape[1:])).astype(dtype)
    dx = be.col2im(u, shape, k, s, p)
    assert dx.shape == (reps * n, *shape) and dx.dtype == dtype
    x_rows = np.concatenate([x] * reps)
    lhs, rhs = float(np.sum(dx.astype(np.float64) * x_rows)), float(np.sum(u.astype(np.float64) * _direct_im2col(x_rows, k, s, p)))
    assert abs(lhs - rhs) <= TOLERANCE[dtype] * max(1.0, float(np.sum(np.abs(u))) * float(np.max(np.abs(x))))
    close(dx, ops.col2im(u, shape, k, s, p), dtype)
    # into buffers (the CPU's chunked convolution reuses one): overwritten, not accumulated into
    cols_out, dx_out = np.full(cols.shape, np.nan, dtype=dtype), np.full(dx.shape, np.nan, dtype=dtype)
    assert be.im2col(x, k, s, p, out=cols_out) is cols_out and be.col2im(u, shape, k, s, p, out=dx_out) is dx_out
    np.testing.assert_array_equal(cols_out, np.asarray(cols))
    np.testing.assert_array_equal(dx_out, np.asarray(dx))


def _direct_lower_rows(x, k, s, p):
    """Lowered rows (N H_out, C k W_pad) by explicit loops over samples, output rows, (c, i) and
    padded columns (independent of the kernels)."""
    n, c, h, w = x.shape
    out_h, width = (h + 2 * p - k) // s + 1, w + 2 * p
    rows = np.zeros((n * out_h, c * k * width), dtype=x.dtype)
    for m in range(n):
        for a in range(out_h):
            for ch in range(c):
                for i in range(k):
                    for u in range(width):
                        hh, ww = a * s + i - p, u - p
                        if 0 <= hh < h and 0 <= ww < w:
                            rows[m * out_h + a, (ch * k + i) * width + u] = x[m, ch, hh, ww]
    return rows


@pytest.mark.parametrize("backend", ["numpy", *KERNEL_BACKENDS])
@settings(max_examples=6)
@given(geometry=conv_geometry, n=st.integers(1, 3), extra=st.tuples(st.integers(0, 4), st.integers(0, 3)), dtype=dtypes, seed=st.integers(0, 2**16))
def test_lower_rows_equals_direct_loops_and_writes_into_a_buffer(backend, geometry, n, extra, dtype, seed):
    """lower_rows equals the direct loops exactly for every stride, padding and non-square input
    (and, on the CPU, for a strided view whose neighbours are NaN: nothing outside the input is
    read), and overwrites a given buffer (the CPU's chunked A factor reuses one); a buffer of the
    wrong shape is refused."""
    channels, k, s, p = geometry
    shape = (channels, max(1, k - 2 * p) + extra[0], max(1, k - 2 * p) + extra[1])
    be, rng = get_backend(backend), np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)).astype(dtype)
    lowered = be.lower_rows(x, k, s, p)
    np.testing.assert_array_equal(np.asarray(lowered), _direct_lower_rows(x, k, s, p))  # a copy: exact
    assert lowered.dtype == dtype
    buffer = np.full(lowered.shape, np.nan, dtype=dtype)
    assert be.lower_rows(x, k, s, p, out=buffer) is buffer
    np.testing.assert_array_equal(buffer, np.asarray(lowered))
    if backend != "cuda":  # a view inside NaNs (the cuda kernels take contiguous arrays, as im2col)
        framed = np.full((n, channels, shape[1] + 2, 2 * shape[2] + 1), np.nan, dtype=dtype)
        framed[:, :, 1:-1, 1::2] = x
        np.testing.assert_array_equal(np.asarray(be.lower_rows(framed[:, :, 1:-1, 1::2], k, s, p)), np.asarray(lowered))
    with pytest.raises(ValueError, match=r"out must be a C-contiguous"):
        be.lower_rows(x, k, s, p, out=np.empty((lowered.shape[0], lowered.shape[1] + 1), dtype=dtype))


@pytest.mark.parametrize("backend", ["numpy", *KERNEL_BACKENDS])
@settings(max_examples=8)
@given(
    channels=st.tuples(st.integers(1, 3), st.integers(1, 6)),
    k=st.integers(1, 4),
    s=st.sampled_from([1, 1, 2, 3]),
    p=st.integers(0, 2),
    n=st.integers(1, 3),
    extra=st.tuples(st.integers(0, 4), st.integers(0, 3)),
    bias=st.booleans(),
    dtype=dtypes,
    seed=st.integers(0, 2**16),
)
def test_conv2d_and_its_gradients_equal_products_with_looped_patches(backend, channels, k, s, p, n, extra, bias, dtype, seed):
    """conv2d = W_mat P[n] + b and conv2d_grads = (sum_n dy_n P[n]^T, dy summed), P the patches of the
    direct loops, for every stride, padding and non-square input; on the numba backend the
    stride-1 cases that fit take the generated kernels (the others the NumPy twin)."""
    (c, o), be, rng = channels, get_backend(backend), np.random.default_rng(seed)
    shape = (c, max(1, k - 2 * p) + extra[0], max(1, k - 2 * p) + extra[1])
    x = rng.standard_normal((n, *shape)).astype(dtype)
    weight = rng.standard_normal((o, c, k, k)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype) if bias else None
    patches = _direct_im2col(x, k, s, p)
    out_h, out_w = (shape[1] + 2 * p - k) // s + 1, (shape[2] + 2 * p - k) // s + 1
    want = np.einsum("ok,nkt->not", weight.reshape(o, -1), patches) + (0 if b is None else b[:, None])
    close(be.conv2d(x, weight, b, s, p), want.reshape(n, o, out_h, out_w), dtype)
    dy = rng.standard_normal((n, o, out_h, out_w)).astype(dtype)
    want_dw = np.einsum("not,nkt->ok", dy.reshape(n, o, -1), patches).reshape(o, c, k, k)
    dw, db = be.conv2d_grads(x, dy, k, s, p)
    close(dw, want_dw, dtype)
    close(db, dy.astype(np.float64).sum(axis=(0, 2, 3)).astype(dtype), dtype)


def test_the_generated_convolution_kernels_take_the_paper_cnns_sizes():
    """The forward kernel takes the first convolution (5 x 1 x 5 x 5: 125 products per position),
    not the second (7 x 5 x 5 x 5: 875); the gradient kernel both, not 32 x 32 x 3 x 3; the
    gradient's scalars come in blocks of output channels, the full blocks in one loop (which a
    case of two full blocks and a rest checks against looped patches)."""
    from kldwrm_ref.backends import direct_conv

    assert direct_conv.forward_fits(1, 5, 5) and not direct_conv.forward_fits(5, 7, 5)
    assert direct_conv.gradient_fits(5, 7, 5) and not direct_conv.gradient_fits(32, 32, 3)
    source = direct_conv.gradient_source(1, 7, 3, 6, 6, "float64")
    assert source.count("for t in range(") == 1 + (7 * 3 - 1) // direct_conv.MAX_ACCUMULATORS  # 21 scalars: one block
    assert direct_conv.gradient_source(1, 9, 3, 6, 6, "float64").count("for t in range(") == 2  # 27 scalars: 8 + 1 channels
    assert direct_conv.gradient_source(1, 1025, 2, 6, 6, "float64").count("for t in range(") == 2  # a loop over 85 blocks of 12, then 5: the source stays small
    rng = np.random.default_rng(5)
    x, dy = rng.standard_normal((3, 2, 7, 6)), rng.standard_normal((3, 13, 3, 2))  # 13 outputs of k = 5: two full blocks of 5 in the loop, then 3
    patches = _direct_im2col(x, 5, 1, 0)
    dw, db = get_backend("numba").conv2d_grads(x, dy, 5, 1, 0)
    close(dw, np.einsum("not,nkt->ok", dy.reshape(3, 13, -1), patches).reshape(13, 2, 5, 5), np.float64)
    close(db, dy.sum(axis=(0, 2, 3)), np.float64)


@pytest.mark.parametrize("backend", ["numpy", *KERNEL_BACKENDS])
def test_conv2d_refuses_shapes_that_disagree_and_takes_an_empty_batch_and_mixed_dtypes(backend):
    """One ValueError naming the argument when x, the weight, the bias and dy disagree (the
    generated kernels would read and write past the arrays); an empty batch gives zero gradients;
    with float32 x and float64 dy both gradients are float64 on every backend."""
    be = get_backend(backend)
    x, weight = np.ones((2, 2, 6, 6)), np.ones((3, 2, 3, 3))
    bad_forward = [
        (np.ones((2, 1, 3, 3)), None, r"the weight must have shape \(O, 2, k, k\)"),
        (np.ones((3, 2, 3, 2)), None, r"the weight must have shape"),
        (np.ones((3, 2, 7, 7)), None, r"a 7 x 7 kernel does not fit x of shape \(2, 2, 6, 6\)"),
        (weight, np.ones(2), r"bias must have shape \(3,\), got \(2,\)"),
    ]
    for w, b, match in bad_forward:
        with pytest.raises(ValueError, match=match):
            be.conv2d(x, w, b, 1, 0)
    for dy in (np.ones((1, 3, 4, 4)), np.ones((2, 3, 5, 5)), np.ones((2, 3, 4, 4, 1))):
        with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 4, 4\)"):
            be.conv2d_grads(x, dy, 3, 1, 0)
    dw, db = be.conv2d_grads(np.ones((0, 2, 6, 6)), np.ones((0, 3, 4, 4)), 3, 1, 0)
    np.testing.assert_array_equal(np.asarray(dw), np.zeros((3, 2, 3, 3)))
    np.testing.assert_array_equal(np.asarray(db), np.zeros(3))
    dw, db = be.conv2d_grads(x.astype(np.float32), np.ones((2, 3, 4, 4)), 3, 1, 0)
    assert dw.dtype == db.dtype == np.float64


@pytest.mark.parametrize("backend", ["numpy", *KERNEL_BACKENDS])
def test_a_patch_buffer_of_the_wrong_shape_dtype_or_layout_is_refused(backend):
    be, x = get_backend(backend), np.ones((2, 1, 4, 4))
    for bad in (np.empty((2, 4, 8)), np.empty((2, 4, 9), dtype=np.float32), np.empty((2, 9, 4)).transpose(0, 2, 1)):
        with pytest.raises(ValueError, match=r"out must be a C-contiguous float64 array of shape \(2, 4, 9\)"):
            be.im2col(x, 2, 1, 0, out=bad)
    with pytest.raises(ValueError, match=r"out must be a C-contiguous float64 array of shape \(2, 1, 4, 4\)"):
        be.col2im(np.ones((2, 4, 9)), (1, 4, 4), 2, 1, 0, out=np.empty((2, 1, 4, 5)))


@pytest.mark.parametrize("backend", ["numpy", *KERNEL_BACKENDS])
@settings(max_examples=6)
@given(k=st.integers(1, 3), c=st.integers(1, 3), hw=st.tuples(st.integers(3, 7), st.integers(3, 7)), n=st.integers(1, 3), reps=st.integers(1, 2), ties=st.booleans(), dtype=dtypes, seed=st.integers(0, 2**16))
def test_max_pool_and_unpool(backend, k, c, hw, n, reps, ties, dtype, seed):
    """max_pool against a loop over windows (first maximum on ties, rows/columns past k floor(H/k)
    dropped); max_unpool puts each row's cotangent at its sample's argmax and zeros elsewhere."""
    be, rng = get_backend(backend), np.random.default_rng(seed)
    x = (rng.integers(0, 3, (n, c, *hw)) if ties else rng.standard_normal((n, c, *hw))).astype(dtype)
    y, argmax = be.max_pool(x, k)
    out_h, out_w = hw[0] // k, hw[1] // k
    assert y.shape == argmax.shape == (n, c, out_h, out_w)
    dy = rng.standard_normal((reps * n, c, out_h, out_w)).astype(dtype)
    want_dx = np.zeros((reps * n, c, *hw), dtype)
    for a in range(n):
        for ch in range(c):
            for i in range(out_h):
                for j in range(out_w):
                    window = x[a, ch, i * k : (i + 1) * k, j * k : (j + 1) * k].ravel()
                    first = int(np.flatnonzero(window == window.max())[0])
                    assert y[a, ch, i, j] == window.max() and argmax[a, ch, i, j] == first
                    for r in range(a, reps * n, n):
                        want_dx[r, ch, i * k + first // k, j * k + first % k] = dy[r, ch, i, j]
    np.testing.assert_array_equal(be.max_unpool(dy, argmax, (c, *hw), k), want_dx)


def test_kernels_check_their_arguments():
    be = get_backend("numba")
    with pytest.raises(ValueError, match="kind must be 'forward' or 'symmetric'"):
        be.kl_and_grad(np.zeros((2, 3)), np.zeros((2, 3)), "reverse")
    with pytest.raises(ValueError, match="ref_logits has shape"):
        be.kl_and_grad(np.zeros((2, 3)), np.zeros((3, 3)))


def test_backend_seam():
    assert get_backend("numpy") is NUMPY and get_backend(NUMPY) is NUMPY
    with pytest.raises(ValueError, match="backend must be one of 'numpy', 'numba', 'cuda', 'auto'"):
        get_backend("torch")
    auto = get_backend("auto")
    for op in OPERATIONS:
        assert getattr(auto, op) is getattr(get_backend("numpy" if op in AUTO_NUMPY else "numba"), op)
    assert set(BACKENDS) == {"numpy", "numba", "cuda", "auto"}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name, platform, preset", [("kfac", "kfac", "paper"), ("q-kld-wrm", "kfac", "theory"), ("qe-kld-wrm", "kfac", "paper"), ("so-kld-wrm", "dense", "theory")])
def test_full_optimiser_steps_equal_numpy(backend, name, platform, preset):
    """Three steps of each optimiser on a small net: every backend gives NumPy's iterates to 1e-10."""
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    mlp = MLP([4, 3, 3])
    extra = dict(period=2, m=2, inner_steps=2) if name == "qe-kld-wrm" else dict(period=2)
    thetas = {}
    for be in ("numpy", backend):
        opt = optim.make(name, mlp, platform=platform, preset=preset, backend=be, **extra)
        theta = mlp.init(1)
        state = opt.init(theta)
        for _ in range(3):
            theta, state, _ = opt.step(theta, state, X, y)
        thetas[be] = theta
    scale = np.max(np.abs(thetas["numpy"]))
    assert np.max(np.abs(thetas[backend] - thetas["numpy"])) <= 1e-10 * scale


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", ["kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm"])
def test_cnn_optimiser_steps_equal_numpy(backend, name):
    """Paper-preset steps on a tiny CNN (conv, pool, dropout; QE's inner solve from the first step):
    every backend gives NumPy's iterates (one step on the slow CUDA simulator, three on numba)."""
    from kldwrm_ref.model import Conv2d, Dense, Dropout, Flatten, MaxPool2d, Network, ReLU

    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((5, 1, 6, 6)), rng.integers(0, 3, 5)
    layers = [Conv2d(1, 2, 3, kfac_scaling="authors"), MaxPool2d(2), ReLU(), Flatten(), Dense(8, 4, init="torch"), ReLU(), Dropout(0.5), Dense(4, 3, init="torch")]
    thetas = {}
    for be in ("numpy", backend):
        net = Network(layers, (1, 6, 6))
        opt = optim.make(name, net, platform="kfac", preset="paper", backend=be, period=2, m=2, inner_steps=2, inner_after_full_wake=False)
        theta = net.init(1)
        state = opt.init(theta)
        for _ in range(1 if backend == "cuda" else 3):
            theta, state, _ = opt.step(theta, state, X, y)
        thetas[be] = theta
    scale = np.max(np.abs(thetas["numpy"]))
    assert np.max(np.abs(thetas[backend] - thetas["numpy"])) <= 1e-10 * scale

