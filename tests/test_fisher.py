import numpy as np
import pytest
from hypothesis import given

from kldwrm_ref import MLP
from kldwrm_ref.curvature.fisher import FisherOperator, fisher, kl_divergence

import reference_net as ref
from strategies import nets


@given(nets(max_width=5))
def test_dense_fisher_equals_independent_jacobian_computation(case):
    mlp, theta, X, _, _ = case
    expected = ref.exact_fisher(mlp.sizes, mlp.activation, theta, X)
    F = fisher(mlp, theta, X)
    assert np.linalg.norm(F - expected) <= 1e-10 * max(np.linalg.norm(expected), 1e-300)


@given(nets(max_width=4, max_hidden=1))
def test_dense_fisher_is_hessian_of_kl_wake_term(case):
    """F(theta_0) = Hessian of theta -> D(theta_0 || theta) at theta_0 (central differences of its gradient)."""
    mlp, theta0, X, _, _ = case
    h = 1e-5
    columns = []
    for e in np.eye(mlp.n_params):
        plus = kl_divergence(mlp, theta0, theta0 + h * e, X)[1]
        minus = kl_divergence(mlp, theta0, theta0 - h * e, X)[1]
        columns.append((plus - minus) / (2 * h))
    hessian = np.array(columns).T
    F = fisher(mlp, theta0, X)
    assert np.linalg.norm(hessian - F) <= 1e-6 * max(np.linalg.norm(F), 1e-8)


@given(nets(max_width=5))
def test_kl_wake_term_vanishes_with_its_gradient_at_the_centre(case):
    mlp, theta0, X, _, _ = case
    for kind in ("forward", "symmetric"):
        value, grad = kl_divergence(mlp, theta0, theta0, X, kind)
        assert abs(value) < 1e-14 and np.abs(grad).max() < 1e-14


@pytest.mark.parametrize("fisher_type", ["exact", "empirical", "mc"])
@given(case=nets(max_width=5))
def test_matrix_free_operator_equals_dense(fisher_type, case):
    mlp, theta, X, y, _ = case
    op = FisherOperator(mlp, theta, X, fisher_type, y=y, samples=3, rng=np.random.default_rng(1))
    dense = fisher(mlp, theta, X, fisher_type, y=y, samples=3, rng=np.random.default_rng(1))
    np.testing.assert_allclose(op @ np.eye(mlp.n_params), dense, rtol=1e-10, atol=1e-13)


@given(nets(max_width=5))
def test_empirical_fisher_is_mean_outer_product_of_per_sample_gradients(case):
    mlp, theta, X, y, _ = case
    grads = np.array([mlp.loss_and_grad(theta, X[i : i + 1], y[i : i + 1])[1] for i in range(len(y))])
    np.testing.assert_allclose(fisher(mlp, theta, X, "empirical", y=y), grads.T @ grads / len(y), rtol=1e-10, atol=1e-13)


def test_mc_fisher_converges_to_exact_within_its_own_variance():
    """E |F_mc - F|_F^2 = (1 / (N^2 S)) sum_i sum_ab Var_i(g g^T)_ab, computed exactly from the
    per-class gradients; the observed error must be of that size and shrink like 1 / S."""
    mlp = MLP([4, 5, 3], "tanh")
    rng = np.random.default_rng(0)
    theta, X = mlp.init(0) + 0.3 * rng.standard_normal(mlp.n_params), rng.standard_normal((6, 4))
    F = fisher(mlp, theta, X)
    probs = np.exp(mlp.logits(theta, X) - np.log(np.exp(mlp.logits(theta, X)).sum(1, keepdims=True)))
    variance = 0.0
    for i in range(len(X)):
        per_class = np.array([mlp.loss_and_grad(theta, X[i : i + 1], np.array([c]))[1] for c in range(3)])
        outer = np.einsum("ca,cb->cab", per_class, per_class)
        mean = np.einsum("c,cab->ab", probs[i], outer)
        variance += np.einsum("c,cab->", probs[i], (outer - mean) ** 2)
    errors = {}
    for samples in (4, 400):
        expected_sq = variance / (len(X) ** 2 * samples)
        observed = [np.sum((fisher(mlp, theta, X, "mc", samples=samples, rng=np.random.default_rng(s)) - F) ** 2) for s in range(20)]
        errors[samples] = np.mean(observed)
        assert 0.3 * expected_sq < errors[samples] < 3.0 * expected_sq  # mean of 20 draws around its expectation
    assert errors[400] < errors[4] / 30


def test_fisher_type_and_missing_arguments_are_rejected():
    mlp = MLP([2, 2])
    theta, X = mlp.init(0), np.zeros((1, 2))
    with pytest.raises(ValueError, match="fisher_type must be one of"):
        fisher(mlp, theta, X, "gauss")
    with pytest.raises(ValueError, match=r"y \(true labels\) is required"):
        fisher(mlp, theta, X, "empirical")
    with pytest.raises(ValueError, match="rng"):
        fisher(mlp, theta, X, "mc")
