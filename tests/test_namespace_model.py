"""The model touches its arrays only through the backend's namespace: on array-api-strict arrays
(which refuse every NumPy-only method, mixed dtypes and implicit conversions), with the host-hop
kernels, an MLP and a small CNN compute what they compute on NumPy arrays with the same reference
kernels - logits, loss, gradient, per-sample gradients, jvp, vjp and every layer's K-FAC factors."""

import array_api_strict as xps
import numpy as np
import pytest

from kldwrm_ref.arrays import array_namespace, to_numpy
from kldwrm_ref.backends import host_hop_backend
from kldwrm_ref.model import MLP, Conv2d, Dense, Dropout, Flatten, MaxPool2d, Network, ReLU, Tanh

STRICT_XP = array_namespace(xps.asarray(0.0))
STRICT = host_hop_backend(STRICT_XP)
RTOL = 1e-12


def dense_net(dtype=np.float64, backend="numpy") -> Network:
    return Network([Dense(5, 7, init="he-normal"), ReLU(), Dense(7, 6, init="torch"), Tanh(), Dense(6, 3)], (5,), dtype, backend)


def small_cnn(dtype=np.float64, backend="numpy") -> Network:
    """Both K-FAC scalings, padding and stride, max-pooling with the odd rows dropped, and dropout."""
    layers = [
        Conv2d(2, 3, 3, padding=1),
        ReLU(),
        MaxPool2d(2),
        Conv2d(3, 4, 2, stride=2, kfac_scaling="authors"),
        Flatten(),
        Dense(16, 6, init="torch"),
        ReLU(),
        Dropout(0.4),
        Dense(6, 3, init="torch"),
    ]
    return Network(layers, (2, 9, 9), dtype, backend)


NETS = {"dense": dense_net, "cnn": small_cnn}


def same(strict, reference, rtol=RTOL):
    """``strict`` is an array of the strict namespace holding ``reference``'s values."""
    assert array_namespace(strict) is STRICT_XP, type(strict)
    np.testing.assert_allclose(to_numpy(strict), reference, rtol=rtol, atol=0.0)


def twins(name, dtype=np.float64, batch=5):
    """The network on NumPy and on strict arrays, its theta in each, a host batch and labels."""
    net, strict = NETS[name](dtype), NETS[name](dtype, STRICT)
    rng = np.random.default_rng(7)
    X = rng.standard_normal((batch, *net.input_shape))
    y = rng.integers(net.n_classes, size=batch)
    return net, strict, net.init(3), strict.init(3), X, y


@pytest.mark.parametrize("name", NETS)
def test_a_training_pass_on_strict_arrays_matches_numpy(name):
    net, strict, theta, theta_s, X, y = twins(name)
    same(theta_s, theta, rtol=0.0)  # init draws on the host either way
    key = (11, 2)
    loss, grad, cache = net.loss_grad_cache(theta, X, y, net.training_rng(key))
    loss_s, grad_s, cache_s = strict.loss_grad_cache(theta_s, X, y, strict.training_rng(key))
    same(cache_s.logits, cache.logits)
    assert loss_s == pytest.approx(loss, rel=RTOL)
    same(grad_s, grad)

    rng = np.random.default_rng(1)
    u = rng.standard_normal((2 * len(X), net.n_classes))  # two cotangents per sample
    v = rng.standard_normal(net.n_params)
    cot, cot_s = net.backward(theta, cache, u), strict.backward(theta_s, cache_s, STRICT.asarray(u))
    same(strict.per_sample_gradients(cache_s, cot_s), net.per_sample_gradients(cache, cot))
    same(strict.vjp(theta_s, cache_s, STRICT.asarray(u[: len(X)])), net.vjp(theta, cache, u[: len(X)]))
    same(strict.jvp(theta_s, cache_s, STRICT.asarray(v)), net.jvp(theta, cache, v))
    for i in net.parametrised:
        n = len(X)
        factors = net.layers[i].kfac_factors(cache.caches[i], cot[i], n, net.backend)
        factors_s = strict.layers[i].kfac_factors(cache_s.caches[i], cot_s[i], n, STRICT)
        assert len(factors_s) == len(factors)
        for f_s, f in zip(factors_s, factors):
            same(f_s, f)


@pytest.mark.parametrize("name", NETS)
def test_evaluation_on_strict_arrays_matches_numpy(name):
    net, strict, theta, theta_s, X, y = twins(name)
    X_s, y_s = STRICT.asarray(X), STRICT.asarray(y)
    same(strict.logits(theta_s, X_s), net.logits(theta, X))
    assert strict.loss(theta_s, X_s, y_s) == pytest.approx(net.loss(theta, X, y), rel=RTOL)
    assert strict.loss(theta_s, X, y) == pytest.approx(net.loss(theta, X, y), rel=RTOL)  # host data moves over
    same(strict.predict(theta_s, X_s), net.predict(theta, X), rtol=0.0)
    assert strict.accuracy(theta_s, X_s, y_s) == net.accuracy(theta, X, y)
    prepared = strict.prepare(STRICT.asarray(np.reshape(X, (len(X), -1))))  # flat rows are reshaped in the namespace
    same(strict.logits(theta_s, prepared), net.logits(theta, X))


def test_float32_stays_float32_on_strict_arrays():
    """The dropout mask is drawn in the pass's precision: strict arrays refuse float32 * float64."""
    net, strict, theta, theta_s, X, y = twins("cnn", np.float32)
    loss, grad, _ = net.loss_grad_cache(theta, X, y, net.training_rng((4,)))
    loss_s, grad_s, _ = strict.loss_grad_cache(theta_s, X, y, strict.training_rng((4,)))
    assert grad_s.dtype == STRICT_XP.float32
    assert loss_s == pytest.approx(loss, rel=1e-6)
    same(grad_s, grad, rtol=1e-5)


def test_mlp_flatten_and_unflatten_in_the_namespace():
    mlp, strict = MLP([4, 3, 2]), MLP([4, 3, 2], backend=STRICT)
    theta = mlp.init(0)
    pairs = strict.unflatten(STRICT.asarray(theta))
    same(pairs[1][0], mlp.unflatten(theta)[1][0], rtol=0.0)
    same(strict.flatten(pairs), theta, rtol=0.0)


def test_inputs_of_another_namespace_or_bad_labels_are_refused():
    _, strict, theta, theta_s, X, y = twins("dense")
    with pytest.raises(ValueError, match=r"theta must be an array of the backend's namespace \(array_api_strict\)"):
        strict.loss(theta, X, y)
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 3\), got range \[0, 3\]"):
        strict.loss(theta_s, X, STRICT.asarray(np.array([0, 1, 2, 3, 1])))
    with pytest.raises(ValueError, match="integer class labels"):
        strict.loss(theta_s, X, STRICT.asarray(np.zeros(5)))
    with pytest.raises(ValueError, match="X must be finite; it has 1 non-finite entries"):
        strict.loss(theta_s, np.where(np.arange(25).reshape(5, 5) == 3, np.nan, X), y)
