import numpy as np
import pytest
from hypothesis import given

from kldwrm_ref import MLP

import reference_net as ref
from strategies import nets


def central_difference(f, theta, direction, h=1e-6):
    return (f(theta + h * direction) - f(theta - h * direction)) / (2 * h)


@given(nets())
def test_gradient_matches_central_finite_differences(case):
    mlp, theta, X, y, _rng = case
    _, grad = mlp.loss_and_grad(theta, X, y)
    f = lambda t: mlp.loss(t, X, y)  # noqa: E731
    fd = np.array([central_difference(f, theta, e) for e in np.eye(mlp.n_params)])
    scale = max(np.linalg.norm(fd), 1e-8)
    assert np.linalg.norm(fd - grad) / scale < 1e-6


@given(nets())
def test_gradient_matches_independent_complex_step_network(case):
    mlp, theta, X, y, _ = case
    _, grad = mlp.loss_and_grad(theta, X, y)
    expected = ref.gradient(mlp.sizes, mlp.activation, theta, X, y)
    assert np.linalg.norm(grad - expected) <= 1e-10 * max(np.linalg.norm(expected), 1e-12)


@given(nets())
def test_backward_from_any_cotangent_is_gradient_of_inner_product(case):
    mlp, theta, X, _, rng = case
    cotangent = rng.standard_normal((X.shape[0], mlp.n_classes))
    cache = mlp.forward(theta, X)
    vjp = mlp.vjp(theta, cache, cotangent)
    f = lambda t: float(np.sum(cotangent * mlp.logits(t, X)))  # noqa: E731
    direction = rng.standard_normal(mlp.n_params)
    assert abs(central_difference(f, theta, direction) - vjp @ direction) < 1e-6 * max(1.0, abs(vjp @ direction))


@given(nets())
def test_forward_mode_jvp_matches_complex_step_jacobian(case):
    mlp, theta, X, _, rng = case
    v = rng.standard_normal(mlp.n_params)
    J = ref.jacobians(mlp.sizes, mlp.activation, theta, X)
    jv = mlp.jvp(theta, mlp.forward(theta, X), v)
    np.testing.assert_allclose(jv, J @ v, rtol=1e-10, atol=1e-12)


def test_unflatten_returns_views_in_pytorch_layout():
    mlp = MLP([3, 4, 2])
    theta = np.arange(mlp.n_params, dtype=float)
    (W0, b0), (W1, b1) = mlp.unflatten(theta)
    assert W0.shape == (4, 3) and b0.shape == (4,) and W1.shape == (2, 4) and b1.shape == (2,)
    np.testing.assert_array_equal(W0[1], [3, 4, 5])  # row-major weight first
    np.testing.assert_array_equal(b0, [12, 13, 14, 15])  # then the bias
    W1[0, 0] = -1.0
    assert theta[16] == -1.0 and np.shares_memory(W1, theta)
    np.testing.assert_array_equal(mlp.flatten(mlp.unflatten(theta)), theta)


def test_init_is_scaled_and_seeded():
    mlp = MLP([400, 300, 10])
    theta = mlp.init(3)
    np.testing.assert_array_equal(theta, mlp.init(3))
    (W0, b0), (W1, _) = mlp.unflatten(theta)
    assert abs(W0.var() - 2.0 / 400) < 0.05 * 2.0 / 400  # He for ReLU layers
    assert abs(W1.var() - 1.0 / 300) < 0.1 / 300
    assert not b0.any()


def test_loss_is_stable_for_huge_logits():
    mlp = MLP([1, 2])
    theta = np.array([1e4, -1e4, 0.0, 0.0])
    loss, grad = mlp.loss_and_grad(theta, np.array([[1.0]]), np.array([1]))
    assert np.isfinite(loss) and np.isclose(loss, 2e4) and np.all(np.isfinite(grad))


def test_predict_and_accuracy():
    mlp = MLP([2, 2])
    theta = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    X = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0]])
    np.testing.assert_array_equal(mlp.predict(theta, X), [0, 1, 0])
    assert mlp.accuracy(theta, X, np.array([0, 1, 1])) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, t: m.loss(t, np.zeros((2, 4)), np.array([0, 1])), r"X must have shape \(N, 3\)"),
        (lambda m, t: m.loss(t, np.zeros((2, 3)), np.array([0, 2])), r"y must hold labels in \[0, 2\)"),
        (lambda m, t: m.loss(t, np.zeros((2, 3)), np.array([0.0, 1.0])), "integer class labels"),
        (lambda m, t: m.loss(t, np.zeros((2, 3)), np.array([0, 1, 1])), r"y must have shape \(2,\)"),
        (lambda m, t: m.loss(t, np.full((2, 3), np.nan), np.array([0, 1])), "X must be finite"),
        (lambda m, t: m.loss(np.full_like(t, np.inf), np.zeros((2, 3)), np.array([0, 1])), "theta must be finite"),
        (lambda m, t: m.loss(t[:-1], np.zeros((2, 3)), np.array([0, 1])), "theta must be a 1-D array of length 8"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    mlp = MLP([3, 2])
    with pytest.raises(ValueError, match=match):
        call(mlp, mlp.init(0))


@pytest.mark.parametrize("kwargs, match", [(dict(sizes=[3]), "sizes"), (dict(sizes=[3, 1]), "C"), (dict(sizes=[3, 2], activation="gelu"), "activation"), (dict(sizes=[3, 2], dtype=np.int32), "dtype")])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLP(**kwargs)


def test_dense_torch_init_is_uniform_in_the_fan_in_bound():
    """PyTorch's default (kaiming-uniform, a = sqrt(5)): W and b ~ U(-1/sqrt(in), 1/sqrt(in))."""
    from kldwrm_ref.model import Dense, Network

    net = Network([Dense(400, 300, init="torch")], (400,))
    theta = net.init(0)
    W, b = net.params(theta)[0]
    bound = 1.0 / np.sqrt(400)
    assert np.abs(W).max() <= bound and np.abs(b).max() <= bound
    assert abs(W.var() / (bound**2 / 3.0) - 1.0) < 0.02  # variance of U(-c, c) is c^2 / 3
    assert abs(b.mean()) < 3 * bound / np.sqrt(3 * 300)
