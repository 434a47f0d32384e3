from contextlib import contextmanager
from typing import NamedTuple
from unittest import mock

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from kldwrm_ref.backends import NUMPY, get_backend
from kldwrm_ref.curvature.fisher import cotangent_rows, fisher, kl_divergence
from kldwrm_ref.curvature.kfac import kfac_factors, kron_blocks, kron_dense
from kldwrm_ref.model import Dense, Network, ReLU, losses
from kldwrm_ref.model import conv as conv_module
from kldwrm_ref.model.conv import KFAC_SCALINGS, Conv2d, Dropout, Flatten, MaxPool2d, paper_cnn

import reference_net as ref


class Case(NamedTuple):
    net: Network
    spec: list
    theta: np.ndarray
    X: np.ndarray
    y: np.ndarray
    rng: np.random.Generator
    dropout_seed: int | None

    def train_rng(self):
        """The training-mode rng that draws the dropout mask the reference ``spec`` holds."""
        return None if self.dropout_seed is None else np.random.default_rng(self.dropout_seed)


@st.composite
def cnns(draw, dropout=False, max_channels=3, sizes=(3, 5, 7), max_batch=4):
    """Conv -> MaxPool -> ReLU [-> Conv -> ReLU] -> Flatten [-> Dropout] -> Dense, with its reference spec."""
    c_in, c_1 = draw(st.integers(1, max_channels)), draw(st.integers(1, max_channels))
    k, s, p = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 1))
    h, w = draw(st.sampled_from(sizes)), draw(st.sampled_from(sizes))
    conv = Conv2d(c_in, c_1, k, s, p, kfac_scaling=draw(st.sampled_from(KFAC_SCALINGS)))
    shape = conv.output_shape((c_in, h, w))
    pool = MaxPool2d(min(2, *shape[1:]))
    shape = pool.output_shape(shape)
    layers, spec = [conv, pool, ReLU()], [("conv", c_in, c_1, k, s, p), ("pool", pool.kernel_size), ("relu",)]
    if draw(st.booleans()):
        c_2, p_2 = draw(st.integers(1, max_channels)), draw(st.integers(0, 1))
        k_2 = draw(st.integers(1, min(2, *shape[1:]) + p_2))
        conv_2 = Conv2d(c_1, c_2, k_2, 1, p_2, kfac_scaling=draw(st.sampled_from(KFAC_SCALINGS)))
        shape = conv_2.output_shape(shape)
        layers += [conv_2, ReLU()]
        spec += [("conv", c_1, c_2, k_2, 1, p_2), ("relu",)]
    n_flat, classes = int(np.prod(shape)), draw(st.integers(2, 3))
    layers.append(Flatten())
    spec.append(("flatten",))
    if dropout:
        layers.append(Dropout(draw(st.sampled_from([0.25, 0.5]))))
    layers.append(Dense(n_flat, classes))
    spec.append(("dense", n_flat, classes))
    net = Network(layers, (c_in, h, w))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    theta = net.init(seed) + 0.1 * rng.standard_normal(net.n_params)
    n = draw(st.integers(1, max_batch))
    X, y = rng.standard_normal((n, c_in, h, w)), rng.integers(0, classes, n)
    if dropout:
        mask = net.forward(theta, X, np.random.default_rng(seed)).caches[-2]
        spec.insert(-1, ("dropout", mask))
    return Case(net, spec, theta, X, y, rng, seed if dropout else None)


def convs(net):
    return [(i, layer) for i, layer in enumerate(net.layers) if isinstance(layer, Conv2d)]


def input_gradient(net, theta, X, y, rng=None):
    """d mean loss / d X by the layers' backward passes."""
    cache = net.forward(theta, X, rng)
    _, dlogits = losses.cross_entropy(cache.logits, y, net.backend)
    cotangents = net.backward(theta, cache, dlogits / len(y))
    return net.layers[0].backward(net.params(theta)[0], cache.caches[0], cotangents[0], net.backend)


def central_difference(f, x, direction, h=1e-6):
    return (f(x + h * direction) - f(x - h * direction)) / (2 * h)


# ------------------------------------------------------------------ forward passes vs direct loops
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(0, 1), st.sampled_from([3, 5, 7]), st.sampled_from([3, 5, 7]), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_conv_forward_equals_direct_loops(c_in, c_out, k, s, p, h, w, n, seed):
    rng = np.random.default_rng(seed)
    conv = Conv2d(c_in, c_out, k, s, p)
    W, b, x = rng.standard_normal((c_out, c_in, k, k)), rng.standard_normal(c_out), rng.standard_normal((n, c_in, h, w))
    y, _ = conv.forward([W, b], x, NUMPY, None)
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    expected = np.zeros((n, *conv.output_shape((c_in, h, w))))
    for m in range(n):
        for o in range(c_out):
            for i in range(expected.shape[2]):
                for j in range(expected.shape[3]):
                    expected[m, o, i, j] = np.sum(W[o] * xp[m, :, i * s : i * s + k, j * s : j * s + k]) + b[o]
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@given(st.integers(1, 3), st.integers(1, 3), st.sampled_from([3, 5, 6, 7]), st.sampled_from([3, 4, 7]), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_max_pool_equals_direct_loop_and_routes_to_the_first_maximum(k, c, h, w, n, seed):
    rng = np.random.default_rng(seed)
    pool = MaxPool2d(k)
    x = rng.integers(0, 3, (n, c, h, w)).astype(float)  # few values: many ties
    y, cache = pool.forward([], x, NUMPY, None)
    tangent = rng.standard_normal(x.shape)
    expected, expected_jvp, first = np.zeros((n, c, h // k, w // k)), np.zeros((n, c, h // k, w // k)), np.zeros((n, c, h, w))
    for m in range(n):
        for ch in range(c):
            for i in range(h // k):
                for j in range(w // k):
                    window = x[m, ch, i * k : (i + 1) * k, j * k : (j + 1) * k]
                    expected[m, ch, i, j] = window.max()
                    u, v = divmod(int(np.flatnonzero(window.ravel() == window.max())[0]), k)
                    first[m, ch, i * k + u, j * k + v] = 1.0
                    expected_jvp[m, ch, i, j] = tangent[m, ch, i * k + u, j * k + v]
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(pool.jvp([], cache, [], tangent, NUMPY), expected_jvp)
    dy = rng.standard_normal((2 * n, c, h // k, w // k))  # two cotangents per sample
    dx = pool.backward([], cache, dy, NUMPY)
    for r in range(2 * n):
        spread = np.zeros((c, h, w))  # dy[r, :, i, j] on the whole window (i, j)
        spread[:, : h // k * k, : w // k * k] = dy[r].repeat(k, axis=1).repeat(k, axis=2)
        np.testing.assert_array_equal(dx[r], spread * first[r % n])


# ------------------------------------------------------------------ gradients, jvp, per-sample rows
@given(cnns(dropout=True))
def test_gradients_match_central_finite_differences(case):
    net, _, theta, X, y, rng, _ = case
    _, grad, _ = net.loss_grad_cache(theta, X, y, case.train_rng())
    d_X = input_gradient(net, theta, X, y, case.train_rng())
    loss_theta = lambda t: net.loss_grad_cache(t, X, y, case.train_rng())[0]  # noqa: E731
    loss_X = lambda x: net.loss_grad_cache(theta, x, y, case.train_rng())[0]  # noqa: E731
    for _ in range(3):
        v, V = rng.standard_normal(theta.shape), rng.standard_normal(X.shape)
        assert abs(central_difference(loss_theta, theta, v) - grad @ v) <= 1e-6 * max(1.0, abs(grad @ v))
        assert abs(central_difference(loss_X, X, V) - np.sum(d_X * V)) <= 1e-6 * max(1.0, abs(np.sum(d_X * V)))


@given(cnns(dropout=True))
def test_gradients_match_independent_complex_step_network(case):
    net, spec, theta, X, y, _, _ = case
    _, grad, _ = net.loss_grad_cache(theta, X, y, case.train_rng())
    expected_theta, expected_X = ref.cnn_gradients(spec, theta, X, y)
    assert np.linalg.norm(grad - expected_theta) <= 1e-10 * max(np.linalg.norm(expected_theta), 1e-12)
    d_X = input_gradient(net, theta, X, y, case.train_rng())
    assert np.linalg.norm(d_X - expected_X) <= 1e-10 * max(np.linalg.norm(expected_X), 1e-12)


@given(cnns(dropout=True))
def test_jvp_is_the_adjoint_of_vjp_and_matches_the_complex_step_jacobian(case):
    net, spec, theta, X, _, rng, _ = case
    cache = net.forward(theta, X, case.train_rng())
    u, v = rng.standard_normal(cache.logits.shape), rng.standard_normal(net.n_params)
    jv, vjp = net.jvp(theta, cache, v), net.vjp(theta, cache, u)
    assert abs(np.sum(u * jv) - vjp @ v) <= 1e-12 * max(1.0, np.linalg.norm(u) * np.linalg.norm(jv))
    np.testing.assert_allclose(jv, ref.cnn_jacobians(spec, theta, X) @ v, rtol=1e-10, atol=1e-12)


@given(cnns(dropout=True))
def test_per_sample_rows_sum_to_the_gradient(case):
    """Two cotangents per sample: each row of U is the vjp of its cotangent alone, and the rows sum to
    the gradient (conv layers accept the stacked rows in ``param_gradients`` too)."""
    net, _, theta, X, _, rng, _ = case
    n = len(X)
    cache = net.forward(theta, X, case.train_rng())
    dlogits = rng.standard_normal((2 * n, net.n_classes))
    cotangents = net.backward(theta, cache, dlogits)
    rows = net.per_sample_gradients(cache, cotangents)
    np.testing.assert_allclose(rows.sum(axis=0), net.vjp(theta, cache, dlogits[:n] + dlogits[n:]), rtol=1e-12, atol=1e-13)
    r = rng.integers(2 * n)
    only_r = np.zeros((n, net.n_classes))
    only_r[r % n] = dlogits[r]
    np.testing.assert_allclose(rows[r], net.vjp(theta, cache, only_r), rtol=1e-12, atol=1e-13)
    params = net.params(theta)
    for i, conv in convs(net):
        grad = conv.param_gradients(params[i], cache.caches[i], cotangents[i], NUMPY)
        start = net.layer_offset(i)
        np.testing.assert_allclose(np.concatenate([g.ravel() for g in grad]), rows[:, start : start + grad[0].size + grad[1].size].sum(axis=0), rtol=1e-12, atol=1e-13)


@given(cnns(max_channels=2, sizes=(3, 5), max_batch=3))
def test_dense_fisher_is_the_hessian_of_the_kl_and_matches_the_complex_step_jacobians(case):
    net, spec, theta0, X, _, _, _ = case
    F = fisher(net, theta0, X)
    np.testing.assert_allclose(F, ref.cnn_exact_fisher(spec, theta0, X), rtol=1e-10, atol=1e-12)
    h = 1e-5
    pattern = kinks(net, theta0, X)
    assume(all(kinks(net, theta0 + sign * h * e, X) == pattern for e in np.eye(net.n_params) for sign in (1, -1)))  # the KL is smooth in the box
    columns = [(kl_divergence(net, theta0, theta0 + h * e, X)[1] - kl_divergence(net, theta0, theta0 - h * e, X)[1]) / (2 * h) for e in np.eye(net.n_params)]
    assert np.linalg.norm(np.array(columns).T - F) <= 1e-6 * max(np.linalg.norm(F), 1e-8)


def kinks(net, theta, X):
    """Where the network is not smooth in theta: every max-pooling argmax and every ReLU's sign
    pattern of the pass (a central difference across a switch measures no derivative)."""
    caches = net.forward(theta, X).caches
    return tuple(np.asarray(c[0] if isinstance(layer, MaxPool2d) else c).tobytes() for layer, c in zip(net.layers, caches) if isinstance(layer, MaxPool2d | ReLU))


@contextmanager
def chunked_patches(chunk_bytes):
    """Every Conv2d recomputes its patches per chunk of samples of about ``chunk_bytes`` (1: one
    sample per chunk) instead of keeping the batch's, as the CPU does for large batches."""
    with mock.patch.object(conv_module, "PATCH_CACHE_BYTES", 0), mock.patch.object(conv_module, "PATCH_CHUNK_BYTES", chunk_bytes):
        yield


@given(cnns(dropout=True, max_batch=5), st.integers(1, 3))
def test_chunked_patches_give_the_independent_gradients_jacobians_kfc_factors_and_rows(case, samples):
    """With patches recomputed in chunks (uneven last chunk included): the gradients and input
    gradient equal the complex-step reference network's, the jvp its Jacobians, the K-FAC factors of
    the Fisher's C cotangents per sample the direct loops', and the per-sample rows sum to the gradient."""
    net, spec, theta, X, y, rng, _ = case
    first = net.layers[0]
    per_sample = first.patch_size * int(np.prod(net.shapes[1][1:])) * X.itemsize
    with chunked_patches(samples * per_sample):  # chunks of `samples` samples in the first convolution
        assert (net.forward(theta, X).caches[0].patches is None) == (samples < len(X))
        _, grad, _ = net.loss_grad_cache(theta, X, y, case.train_rng())
        expected_theta, expected_X = ref.cnn_gradients(spec, theta, X, y)
        assert np.linalg.norm(grad - expected_theta) <= 1e-10 * max(np.linalg.norm(expected_theta), 1e-12)
        d_X = input_gradient(net, theta, X, y, case.train_rng())
        assert np.linalg.norm(d_X - expected_X) <= 1e-10 * max(np.linalg.norm(expected_X), 1e-12)
        cache = net.forward(theta, X, case.train_rng())
        v = rng.standard_normal(net.n_params)
        np.testing.assert_allclose(net.jvp(theta, cache, v), ref.cnn_jacobians(spec, theta, X) @ v, rtol=1e-10, atol=1e-12)
        dlogits = cotangent_rows(net, cache, "exact")  # C rows per sample, rep-major
        cotangents = net.backward(theta, cache, dlogits)
        for i, conv in convs(net):
            got = conv.kfac_factors(cache.caches[i], cotangents[i], len(X), NUMPY)
            for name, value, expected in zip(got._fields, got, direct_kfc(conv, cache.caches[i].x, cotangents[i], conv.kfac_scaling)):
                assert np.linalg.norm(value - expected) <= 1e-12 * max(np.linalg.norm(expected), 1e-300), name
        rows = net.per_sample_gradients(cache, cotangents)
        summed = dlogits.reshape(-1, len(X), net.n_classes).sum(axis=0)
        np.testing.assert_allclose(rows.sum(axis=0), net.vjp(theta, cache, summed), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_chunks_share_one_patch_buffer_and_never_write_into_the_input(backend):
    """A 1 x 1 convolution's patches are the input itself (NumPy's im2col then returns a read-only
    view of it): chunked passes must still write each chunk into their own buffer, leave X as it
    was, and equal the whole-batch pass, in the forward product, the weight gradient and the A factor."""
    net = Network([Conv2d(2, 3, 1), Flatten(), Dense(3 * 4 * 4, 2)], (2, 4, 4), np.float64, backend)
    rng = np.random.default_rng(7)
    theta, X, y = net.init(0), rng.standard_normal((5, 2, 4, 4)), rng.integers(0, 2, 5)
    X_before = X.copy()
    loss, grad, cache = net.loss_grad_cache(theta, X, y)
    dy = rng.standard_normal((5, 3, 4, 4))
    factors = net.layers[0].kfac_factors(cache.caches[0], dy, 5, net.backend)
    no_direct = mock.patch.multiple(Conv2d, convolves_directly=lambda self: False, differentiates_directly=lambda self: False)
    with chunked_patches(2 * 2 * 16 * 8), no_direct:  # two samples per chunk, an uneven last chunk
        chunked_loss, chunked_grad, chunked_cache = net.loss_grad_cache(theta, X, y)
        assert chunked_cache.caches[0].patches is None
        chunked_factors = net.layers[0].kfac_factors(chunked_cache.caches[0], dy, 5, net.backend)
    np.testing.assert_array_equal(X, X_before)
    assert chunked_loss == pytest.approx(loss, rel=1e-14)
    np.testing.assert_allclose(chunked_grad, grad, rtol=1e-13, atol=1e-15)
    for got, want in zip(chunked_factors, factors):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("conv, in_shape", [(Conv2d(1, 5, 5), (1, 12, 10)), (Conv2d(2, 3, 3, padding=1), (2, 5, 6)), (Conv2d(5, 7, 5), (5, 9, 8))])
def test_a_direct_convolution_equals_the_products_with_kept_patches(backend, conv, in_shape):
    """Where the patches are not kept, a convolution that :meth:`Conv2d.convolves_directly` makes
    no patches in its forward pass and jvp, one that :meth:`Conv2d.differentiates_directly` none in
    its parameter gradients (cotangent rows summed over two reps), and each equals the products with
    kept patches (float64; on numba the generated kernels; the third is the paper CNN's second
    convolution, direct in its gradients only)."""
    be, rng = get_backend(backend), np.random.default_rng(11)
    params = [rng.standard_normal(shape) for _, shape in conv.param_shapes()]
    x = rng.standard_normal((7, *in_shape))
    kept = conv.prepare(x, be)
    out = conv.forward_prepared(params, kept, be)[0]
    dy = rng.standard_normal((2 * 7, *out.shape[1:]))
    tangents = [rng.standard_normal(p.shape) for p in params]
    dx = rng.standard_normal(x.shape)
    assert kept.patches is not None and conv.differentiates_directly()
    no_patches = be._replace(im2col=None)  # a call to im2col fails
    forward_backend = no_patches if conv.convolves_directly() else be
    with chunked_patches(1):
        direct = conv.prepare(x, be)
        assert direct.patches is None
        np.testing.assert_allclose(conv.forward_prepared(params, direct, forward_backend)[0], out, rtol=1e-12, atol=1e-13)
        for got, want in zip(conv.param_gradients(params, direct, dy, no_patches), conv.param_gradients(params, kept, dy, be)):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(conv.jvp(params, direct, tangents, dx, forward_backend), conv.jvp(params, kept, tangents, dx, be), rtol=1e-12, atol=1e-12)


def test_patches_are_kept_below_the_cache_size_and_chunked_above_it():
    """The paper CNN at batch 512 in float32: conv1's 29.5 MB and conv2's 16.4 MB of patches are
    never held (chunks of at most PATCH_CHUNK_BYTES); a small batch keeps its patches."""
    net = paper_cnn(dtype=np.float32)
    conv1, conv2 = net.layers[0], net.layers[3]
    big = np.zeros((512, 1, 28, 28), dtype=np.float32)
    assert conv1.prepare(big, NUMPY).patches is None
    assert conv1._chunk_samples(big, NUMPY.xp) * 25 * 576 * 4 <= conv_module.PATCH_CHUNK_BYTES
    assert conv2._chunk_samples(np.zeros((512, 5, 12, 12), dtype=np.float32), NUMPY.xp) * 125 * 64 * 4 <= conv_module.PATCH_CHUNK_BYTES
    assert conv1.prepare(big[:4], NUMPY).patches.shape == (4, 25, 576)


def test_chunked_and_kept_patches_promote_dtypes_alike():
    """A float64 weight on float32 inputs: the chunked forward and backward return what the
    whole-batch products return (NumPy's promotion to float64), not a result rounded to the input's type."""
    conv = Conv2d(2, 3, 3, padding=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 2, 5, 5)).astype(np.float32)
    params = [rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)]
    dy = rng.standard_normal((4, 3, 5, 5))
    y_kept, cache_kept = conv.forward(params, x, NUMPY, None)
    dx_kept = conv.backward(params, cache_kept, dy, NUMPY)
    with chunked_patches(1):
        y, cache = conv.forward(params, x, NUMPY, None)
        dx = conv.backward(params, cache, dy, NUMPY)
    assert cache.patches is None and cache_kept.patches is not None
    assert y.dtype == y_kept.dtype == dx.dtype == dx_kept.dtype == np.float64
    np.testing.assert_allclose(y, y_kept, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx_kept, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ K-FAC (KFC)
def direct_kfc(conv, x, deltas, scaling):
    """(A, G, G_bias, A_bias) of one conv layer by loops over samples, positions and cotangent rows."""
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    n, (rows, _, ho, wo) = x.shape[0], deltas.shape
    T = ho * wo
    A, G, G_bias = 0.0, 0.0, 0.0
    for i in range(ho):
        for j in range(wo):
            for m in range(n):
                pbar = np.append(xp[m, :, i * s : i * s + k, j * s : j * s + k].ravel(), 1.0)
                A = A + np.outer(pbar, pbar)
            for r in range(rows):
                G = G + np.outer(deltas[r, :, i, j], deltas[r, :, i, j])
    for r in range(rows):
        G_bias = G_bias + np.outer(deltas[r].sum(axis=(1, 2)), deltas[r].sum(axis=(1, 2)))
    if scaling == "textbook":
        return A / (n * T), G / n, G_bias / n, np.ones((1, 1))
    return A / (n * T**2), G * T / n, G_bias / n, np.ones((1, 1))


def factors_of(conv, cache, cotangent, n, scaling):
    """The layer's factors computed under ``scaling`` (same layer shape, same cache)."""
    twin = Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, kfac_scaling=scaling)
    return twin.kfac_factors(cache, cotangent, n, NUMPY)


@given(cnns())
def test_kfc_factors_equal_direct_loops_and_both_scalings_give_the_same_blocks(case):
    net, _, theta, X, _, _, _ = case
    cache = net.forward(theta, X)
    cotangents = net.backward(theta, cache, cotangent_rows(net, cache, "exact"))
    F = fisher(net, theta, X)
    for i, conv in convs(net):
        factors = {s: factors_of(conv, cache.caches[i], cotangents[i], len(X), s) for s in KFAC_SCALINGS}
        for scaling, got in factors.items():
            for name, value, expected in zip(got._fields, got, direct_kfc(conv, cache.caches[i].x, cotangents[i], scaling)):
                assert np.linalg.norm(value - expected) <= 1e-12 * max(np.linalg.norm(expected), 1e-300), (scaling, name)
        textbook, authors = factors["textbook"], factors["authors"]
        np.testing.assert_allclose(np.kron(authors.G, authors.A), np.kron(textbook.G, textbook.A), rtol=1e-12, atol=1e-15)
        assert textbook.A[-1, -1] == 1.0
        b_index = net.layer_offset(i) + conv.out_channels * conv.patch_size + np.arange(conv.out_channels)
        np.testing.assert_allclose(textbook.G_bias, F[np.ix_(b_index, b_index)], rtol=1e-10, atol=1e-13)  # the separate bias block is exact


def direct_moment(x, k, s, p):
    """sum over samples and output positions of pbar pbar^T, pbar = [patch; 1], by loops (float64)."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p, p), (p, p)))
    h_out, w_out = (xp.shape[2] - k) // s + 1, (xp.shape[3] - k) // s + 1
    total = 0.0
    for m in range(x.shape[0]):
        for i in range(h_out):
            for j in range(w_out):
                pbar = np.append(xp[m, :, i * s : i * s + k, j * s : j * s + k].ravel(), 1.0)
                total = total + np.outer(pbar, pbar)
    return total


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2), st.integers(4, 9), st.integers(4, 9), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_both_ways_to_the_a_factor_equal_direct_loops(c_in, k, s, p, h, w, n, seed):
    """A's unscaled moment sum_{n,t} pbar pbar^T by row lowering (R^T R, then sums of W_out blocks;
    whole batch, and chunks of two samples) and by the patches' Gram (whole batch, and chunks of one
    sample) equals the loop over patches,
    for every stride, padding and non-square input."""
    conv = Conv2d(c_in, 2, k, s, p)
    x = np.random.default_rng(seed).standard_normal((n, c_in, h, w))
    if h + 2 * p < k or w + 2 * p < k:
        return
    want = direct_moment(x, k, s, p)
    scale = np.abs(want).max()
    cache = conv.prepare(x, NUMPY)
    np.testing.assert_allclose(conv._row_moment(x, NUMPY), want, rtol=0, atol=1e-12 * scale)
    h_out = conv.output_shape(x.shape[1:])[1]
    with mock.patch.object(conv_module, "PATCH_CHUNK_BYTES", 2 * h_out * c_in * k * (w + 2 * p) * 8):  # lowered rows in chunks of two samples
        np.testing.assert_allclose(conv._row_moment(x, NUMPY), want, rtol=0, atol=1e-12 * scale)
    with mock.patch.object(conv_module, "ROW_MOMENT_FLOPS", 0.0):
        assert not conv.lowers_rows(x.shape[1:])
        np.testing.assert_allclose(conv._patch_moment(cache, NUMPY), want, rtol=0, atol=1e-12 * scale)
        with chunked_patches(conv.patch_size * int(np.prod(conv.output_shape(x.shape[1:])[1:])) * 8):
            np.testing.assert_allclose(conv._patch_moment(conv.prepare(x, NUMPY), NUMPY), want, rtol=0, atol=1e-12 * scale)


def test_the_a_factor_is_lowered_by_rows_where_that_is_the_cheaper_product():
    """The paper CNN's two convolutions (5 x 5 kernels on 28 and 12 pixels) take the row-lowered
    product; a 3 x 3 convolution of 64 channels on 32 x 32 (4x the patches' FLOPs by rows) does not."""
    net = paper_cnn(dtype=np.float32)
    assert [net.layers[i].lowers_rows(net.shapes[i]) for i in (0, 3)] == [True, True]
    assert not Conv2d(64, 64, 3, padding=1).lowers_rows((64, 32, 32))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        Conv2d(1, 1, 5).lowers_rows((1, 2, 20))  # no output row: the lowering would be empty


def test_the_row_lowered_a_factor_on_array_api_strict_arrays_equals_numpy():
    """Around the backend's lowering (here the host-hop reference twin) the row-lowered A uses only
    the array API (products, strided slices, sums of blocks): on array-api-strict arrays it gives
    NumPy's A to rounding."""
    import array_api_strict as xps

    from kldwrm_ref.backends import host_hop_backend

    strict = host_hop_backend(xps)
    conv = Conv2d(2, 3, 3, stride=2, padding=1)
    x = np.random.default_rng(5).standard_normal((3, 2, 7, 6))
    got = np.asarray(conv._row_moment(xps.asarray(x), strict))
    np.testing.assert_allclose(got, conv._row_moment(x, NUMPY), rtol=1e-14, atol=1e-13)


@given(cnns(), st.sampled_from(["joint", "separate"]))
def test_kron_blocks_of_a_cnn(case, bias):
    """Joint: G (x) A on [W | b] in theta's layout; separate: its W-W sub-block, and for a convolution
    G_bias (x) A_bias = G_bias (x) [1] on b (a dense layer's G (x) A[-1, -1])."""
    net, _, theta, X, _, _, _ = case
    factors = kfac_factors(net, theta, X)
    dense = kron_dense(kron_blocks(net, factors, bias), net.n_params)
    for f, i in zip(factors, net.parametrised):
        k, n_out, start = f.A.shape[0] - 1, f.G.shape[0], net.layer_offset(i)
        w = start + np.arange(n_out * k).reshape(n_out, k)
        b = start + n_out * k + np.arange(n_out)
        if bias == "joint":
            wb = np.concatenate([w, b[:, None]], axis=1).ravel()
            np.testing.assert_allclose(dense[np.ix_(wb, wb)], np.kron(f.G, f.A), rtol=1e-15)
        else:
            np.testing.assert_allclose(dense[np.ix_(w.ravel(), w.ravel())], np.kron(f.G, f.A[:-1, :-1]), rtol=1e-15)
            expected = f.G_bias * f.A_bias[0, 0] if isinstance(net.layers[i], Conv2d) else f.G * f.A[-1, -1]
            np.testing.assert_allclose(dense[np.ix_(b, b)], expected, rtol=1e-15)
            assert not dense[np.ix_(w.ravel(), b)].any()


def test_kfc_is_the_exact_fisher_block_for_one_input_and_one_position():
    net = Network([Conv2d(2, 3, 3), ReLU(), Flatten(), Dense(3, 4)], (2, 3, 3))
    theta, X = net.init(0), np.random.default_rng(0).standard_normal((1, 2, 3, 3))
    F = fisher(net, theta, X)
    for block in kron_blocks(net, kfac_factors(net, theta, X)):
        expected = F[np.ix_(block.positions, block.positions)]
        assert np.linalg.norm(np.kron(block.G, block.A) - expected) <= 1e-10 * np.linalg.norm(expected)


# ------------------------------------------------------------------ dropout
def test_dropout_mask_is_reused_and_scaled():
    drop, rng = Dropout(0.3), np.random.default_rng(0)
    x = rng.standard_normal((4, 5000))
    y, mask = drop.forward([], x, NUMPY, np.random.default_rng(1))
    kept = mask != 0
    assert abs(kept.mean() - 0.7) < 4 * np.sqrt(0.7 * 0.3 / kept.size)
    np.testing.assert_allclose(y[kept], x[kept] / 0.7, rtol=1e-15)
    assert not y[~kept].any()
    dy = rng.standard_normal((8, 5000))  # two cotangents per sample
    np.testing.assert_array_equal(drop.backward([], mask, dy, NUMPY), dy * np.tile(mask, (2, 1)))
    np.testing.assert_array_equal(drop.jvp([], mask, [], dy[:4], NUMPY), dy[:4] * mask)
    np.testing.assert_array_equal(drop.forward([], x, NUMPY, np.random.default_rng(1))[1], mask)  # the rng decides the mask


def test_dropout_is_the_identity_in_evaluation():
    drop, x = Dropout(0.5), np.random.default_rng(0).standard_normal((3, 7))
    y, cache = drop.forward([], x, NUMPY, None)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(drop.backward([], cache, np.tile(x, (2, 1)), NUMPY), np.tile(x, (2, 1)))
    np.testing.assert_array_equal(drop.jvp([], cache, [], x, NUMPY), x)
    assert drop.jvp([], cache, [], None, NUMPY) is None


# ------------------------------------------------------------------ dtypes, the paper CNN, validation
def test_float32_network_stays_float32_and_agrees_with_float64():
    layers = [Conv2d(2, 3, 3, padding=1), MaxPool2d(2), ReLU(), Conv2d(3, 2, 2, stride=2), Flatten(), Dropout(0.5), Dense(2, 3)]
    net64, net32 = Network(layers, (2, 5, 5)), Network(layers, (2, 5, 5), np.float32)
    rng = np.random.default_rng(0)
    theta, X, y = net64.init(0), rng.standard_normal((3, 2, 5, 5)), np.array([0, 2, 1])
    loss32, grad32, cache32 = net32.loss_grad_cache(theta.astype(np.float32), X, y, np.random.default_rng(1))
    loss64, grad64, _ = net64.loss_grad_cache(theta, X, y, np.random.default_rng(1))
    assert grad32.dtype == np.float32
    assert net32.jvp(theta.astype(np.float32), cache32, theta).dtype == np.float32
    cotangents = net32.backward(theta.astype(np.float32), cache32, np.ones((6, 3), np.float32))
    assert all(f.dtype == np.float32 for f in net32.layers[0].kfac_factors(cache32.caches[0], cotangents[0], 3, NUMPY))
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    np.testing.assert_allclose(grad32, grad64, rtol=1e-3, atol=1e-5)


def test_paper_cnn_has_the_pytorch_layout():
    net = paper_cnn()
    assert net.n_params == 4712
    layout = [(t.layer, t.name, t.shape) for t in net.tensors]
    assert layout == [(0, "weight", (5, 1, 5, 5)), (0, "bias", (5,)), (3, "weight", (7, 5, 5, 5)), (3, "bias", (7,)), (7, "weight", (30, 112)), (7, "bias", (30,)), (10, "weight", (10, 30)), (10, "bias", (10,))]
    assert [layer.kfac_scaling for _, layer in convs(net)] == ["authors", "authors"]
    theta = net.init(0)
    W0, b0 = net.params(theta)[0]
    assert np.abs(W0).max() <= 1 / 5 and np.abs(b0).max() <= 1 / 5 and abs(W0.var() - (1 / 5) ** 2 / 3) < 0.4 * (1 / 5) ** 2 / 3
    X = np.random.default_rng(0).random((2, 784))  # flat rows are reshaped to (1, 28, 28)
    assert net.logits(theta, X).shape == (2, 10)


def test_paper_cnn_kfac_blocks():
    net = paper_cnn()
    theta, X = net.init(0), np.random.default_rng(0).random((3, 1, 28, 28))
    factors = kfac_factors(net, theta, X)
    assert [(f.A.shape, f.G.shape) for f in factors] == [((26, 26), (5, 5)), ((126, 126), (7, 7)), ((113, 113), (30, 30)), ((31, 31), (10, 10))]
    blocks = kron_blocks(net, factors, "separate")
    assert [(b.name, b.A.shape[0], b.G.shape[0]) for b in blocks[:4]] == [("layer 0 weight", 25, 5), ("layer 0 bias", 1, 5), ("layer 1 weight", 125, 7), ("layer 1 bias", 1, 7)]
    assert blocks[1].A[0, 0] == 1.0 and blocks[3].A[0, 0] == 1.0  # the bias blocks: A = [1]
    n, T = 3, 24**2  # the weight block carries the authors' 1/(N T^2): compare with the textbook mean over n, t
    patches = np.lib.stride_tricks.sliding_window_view(X[:, 0], (5, 5), axis=(1, 2)).reshape(n * T, 25)
    np.testing.assert_allclose(blocks[0].A, patches.T @ patches / (n * T**2), rtol=1e-12)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Conv2d(0, 1, 3), "in_channels must be an integer >= 1"),
        (lambda: Conv2d(1, 1, 3, stride=0), "stride must be an integer >= 1"),
        (lambda: Conv2d(1, 1, 3, padding=-1), "padding must be an integer >= 0"),
        (lambda: Conv2d(1, 1, 3, padding=1.5), "padding must be an integer >= 0"),
        (lambda: Conv2d(1, 1, 3, init="he"), "init must be one of"),
        (lambda: Conv2d(1, 1, 3, kfac_scaling="paper"), "kfac_scaling must be one of"),
        (lambda: MaxPool2d(0), "kernel_size must be an integer >= 1"),
        (lambda: Dropout(1.0), r"p must be a real number in \[0, 1\)"),
        (lambda: Dropout(-0.1), r"p must be a real number in \[0, 1\)"),
        (lambda: Conv2d(2, 3, 3).output_shape((1, 5, 5)), r"expects inputs of shape \(2, H, W\)"),
        (lambda: Conv2d(1, 3, 3).output_shape((1, 5)), r"expects inputs of shape \(1, H, W\)"),
        (lambda: Conv2d(1, 3, 5, padding=1).output_shape((1, 2, 8)), "smaller than the kernel"),
        (lambda: MaxPool2d(3).output_shape((1, 2, 8)), "H, W >= 3"),
        (lambda: Network([Conv2d(1, 2, 3), Flatten(), Dense(10, 2)], (1, 4, 4)), r"expects inputs of shape \(10,\)"),
    ],
)
def test_bad_arguments_and_shapes_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_prepared_batch_skips_the_first_convolutions_im2col_and_changes_nothing(monkeypatch):
    """Network.prepare does the first Conv2d's im2col once; passes on the prepared batch equal
    passes on the raw batch and do not unfold it again (QE runs a dozen passes per step on it)."""
    net = paper_cnn(dtype=np.float64)
    rng = np.random.default_rng(0)
    X, theta = rng.standard_normal((3, 1, 28, 28)), net.init(0)
    prepared = net.prepare(X)
    first, calls = net.layers[0], []
    real = first.prepare
    monkeypatch.setattr(first, "prepare", lambda x, backend: calls.append(x.shape) or real(x, backend))
    key = (0, 1, 2)
    for _ in range(3):
        np.testing.assert_array_equal(net.forward(theta, prepared, net.training_rng(key)).logits, net.forward(theta, X, net.training_rng(key)).logits)
    assert calls == [X.shape] * 3  # only the raw-batch passes unfolded it
    assert net.prepare(rng.standard_normal((2, 784))).X.shape == (2, 1, 28, 28)  # flat rows are accepted as by forward
