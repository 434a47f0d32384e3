"""The curvature engine on array-api-strict arrays (float64) equals the NumPy engine.

array-api-strict refuses everything outside the array API standard (array methods such as
``.ravel()``, ``np.*`` calls on its arrays, fancy scatter, mixed dtypes), so these tests fail if a
NumPy-only call creeps into the K-FAC operators, the eigendecompositions, the exponential average
or the Fisher's cotangent rows.  Operators are compared with the NumPy ones at rtol 1e-12 and
with dense matrices built independently (np.kron, numpy.linalg).
"""

import array_api_strict as xps
import numpy as np
import pytest

from kldwrm_ref import MLP
from kldwrm_ref.arrays import array_namespace, to_numpy
from kldwrm_ref.backends import NUMPY, host_hop_backend
from kldwrm_ref.curvature import linalg
from kldwrm_ref.curvature.averaging import ExponentialAverage
from kldwrm_ref.curvature.estimators import DenseEstimator
from kldwrm_ref.curvature.fisher import fisher_cotangents
from kldwrm_ref.curvature.inverses import ExactKronSumInverse, FactoredKronSumInverse, KFACOperator, damped_inverse, pi_damping
from kldwrm_ref.curvature.kfac import KFACFactors, kron_blocks, kron_dense

XS = array_namespace(xps.asarray(0.0))
STRICT = host_hop_backend(XS)
SIZES = [5, 4, 3]


def strict(x):
    return XS.asarray(np.asarray(x))


def random_factors(rng, rank_deficient=False):
    """One SPD (A, G) per layer of an MLP(SIZES); A rank-deficient on request (a floor bites)."""
    factors = []
    for out, inp in MLP(SIZES).layer_shapes:
        a = rng.standard_normal((inp + 1, inp - 1 if rank_deficient else inp + 3))
        g = rng.standard_normal((out, out + 2))
        factors.append(KFACFactors(a @ a.T / a.shape[1], g @ g.T / g.shape[1]))
    return factors


def both(factors, bias):
    """The blocks over the NumPy factors and over strict copies of them."""
    mlp = MLP(SIZES)
    strict_factors = [KFACFactors(strict(A), strict(G)) for A, G in factors]
    return mlp, kron_blocks(mlp, factors, bias), kron_blocks(mlp, strict_factors, bias)


def assert_applies_like(strict_op, numpy_op, n, rng):
    """strict_op v == numpy_op v (rtol 1e-12) on random vectors, returning a strict array."""
    for _ in range(2):
        v = rng.standard_normal(n)
        out = strict_op @ strict(v)
        assert array_namespace(out) is XS
        np.testing.assert_allclose(to_numpy(out), numpy_op @ v, rtol=1e-12, atol=0)


def assert_matrix(op, dense):
    """op.to_scipy() @ I equals ``dense`` up to float64 rounding of a product of condition cond(dense)."""
    n = dense.shape[0]
    matrix = op.to_scipy() @ np.eye(n)
    assert np.linalg.norm(matrix - dense) <= 1e-12 * np.linalg.cond(dense) * np.linalg.norm(dense)


def floored_factor(M, floor):
    """M with its eigenvalues <= floor zeroed, by numpy.linalg (independent of the engine)."""
    values, vectors = np.linalg.eigh(M)
    return (vectors * np.where(values <= floor, 0.0, values)) @ vectors.T


def dense_blocks(blocks, n, build):
    """Block-diagonal dense matrix in theta layout with ``build(block)`` on each block."""
    dense = np.zeros((n, n))
    for b in blocks:
        dense[np.ix_(b.positions, b.positions)] = build(b)
    return dense


@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_kfac_operator_equals_numpy_and_the_kronecker_product(bias):
    rng = np.random.default_rng(0)
    mlp, blocks, strict_blocks = both(random_factors(rng), bias)
    op = KFACOperator(strict_blocks, mlp.n_params, STRICT)
    assert_applies_like(op, KFACOperator(blocks, mlp.n_params, NUMPY), mlp.n_params, rng)
    assert_matrix(op, dense_blocks(blocks, mlp.n_params, lambda b: np.kron(b.G, b.A)))
    np.testing.assert_allclose(op.to_scipy() @ np.eye(mlp.n_params), kron_dense(strict_blocks, mlp.n_params), rtol=1e-12, atol=1e-15)


def test_blocks_in_theta_order_are_read_by_slices_and_joint_blocks_put_back_by_one_take():
    mlp, _, strict_blocks = both(random_factors(np.random.default_rng(0)), "separate")
    assert KFACOperator(strict_blocks, mlp.n_params, STRICT).unpermute is None
    _, _, joint = both(random_factors(np.random.default_rng(0)), "joint")
    assert KFACOperator(joint, mlp.n_params, STRICT).unpermute is not None


@pytest.mark.parametrize("style", ["eigen", "factored", "factored-explicit"])
@pytest.mark.parametrize("bias", ["joint", "separate"])
@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_damped_inverses_equal_numpy_and_a_dense_inverse(style, bias, floor):
    rng = np.random.default_rng(1)
    eta = 0.05
    mlp, blocks, strict_blocks = both(random_factors(rng, rank_deficient=True), bias)
    n = mlp.n_params
    op = damped_inverse(strict_blocks, n, eta, style, floor, STRICT)
    assert_applies_like(op, damped_inverse(blocks, n, eta, style, floor, NUMPY), n, rng)
    if style == "eigen":
        dense = dense_blocks(blocks, n, lambda b: np.kron(floored_factor(b.G, floor), floored_factor(b.A, floor))) + eta * np.eye(n)
    else:

        def build(b):
            gamma_a, gamma_g = pi_damping(b.A, b.G, eta)
            return np.kron(floored_factor(b.G, floor) + gamma_g * np.eye(len(b.G)), floored_factor(b.A, floor) + gamma_a * np.eye(len(b.A)))

        dense = dense_blocks(blocks, n, build)
    assert_matrix(op, np.linalg.inv(dense))
    if floor:
        assert any(np.any(to_numpy(ea.values) <= floor) for _, ea in op.eigenpairs)  # the floor has something to do


@pytest.mark.parametrize("bias", ["joint", "separate"])
def test_kronecker_sum_inverses_equal_numpy_and_a_dense_inverse(bias):
    rng = np.random.default_rng(2)
    eta, alpha = 0.05, 0.7
    mlp, average, strict_average = both(random_factors(rng), bias)
    _, current, strict_current = both(random_factors(rng, rank_deficient=True), bias)
    n = mlp.n_params

    factored = FactoredKronSumInverse(strict_average, strict_current, n, alpha, eta, "eigen", 0.0, STRICT)
    assert_applies_like(factored, FactoredKronSumInverse(average, current, n, alpha, eta, "eigen", 0.0, NUMPY), n, rng)
    summed = {b.name: (b.G + alpha * c.G, b.A + alpha * c.A) for b, c in zip(average, current)}
    assert_matrix(factored, np.linalg.inv(dense_blocks(average, n, lambda b: np.kron(*summed[b.name])) + eta * np.eye(n)))

    exact = ExactKronSumInverse(strict_average, strict_current, n, alpha, eta, STRICT)
    assert_applies_like(exact, ExactKronSumInverse(average, current, n, alpha, eta, NUMPY), n, rng)
    damped = {b.name: pi_damping(b.A, b.G, eta) for b in average}
    bar = dense_blocks(average, n, lambda b: np.kron(b.G + damped[b.name][1] * np.eye(len(b.G)), b.A + damped[b.name][0] * np.eye(len(b.A))))
    assert_matrix(exact, np.linalg.inv(bar + alpha * dense_blocks(current, n, lambda b: np.kron(b.G, b.A))))


@pytest.mark.parametrize("zero_start", [False, True])
def test_exponential_average_of_strict_factor_tuples_equals_numpy(zero_start):
    rng = np.random.default_rng(3)
    average = ExponentialAverage.create(0.8, period=2, zero_start=zero_start)
    host, device = average.init(), average.init()
    for _ in range(5):
        new = random_factors(rng) if average.due(host) else None
        host = average.update(host, None if new is None else tuple(new), NUMPY)
        device = average.update(device, None if new is None else tuple(KFACFactors(strict(A), strict(G)) for A, G in new), STRICT)
    for host_pair, device_pair in zip(average.value(host), average.value(device)):
        assert type(device_pair) is KFACFactors
        for h, d in zip(host_pair, device_pair):
            assert array_namespace(d) is XS
            np.testing.assert_allclose(to_numpy(d), h, rtol=1e-12, atol=0)


def test_first_average_is_a_copy_in_the_namespace():
    A = strict(np.eye(3))
    state = ExponentialAverage.create(0.5).update(ExponentialAverage.create(0.5).init(), (A,), STRICT)
    assert state.average[0] is not A and array_namespace(state.average[0]) is XS


def assert_eigenpairs(eigen, M):
    """eigen holds strict arrays with M V = V diag(w), V^T V = I and w = eigvalsh(M)."""
    values, vectors = to_numpy(eigen.values), to_numpy(eigen.vectors)
    assert array_namespace(eigen.values) is XS and array_namespace(eigen.vectors) is XS
    np.testing.assert_allclose(values, np.linalg.eigvalsh(M), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(M @ vectors, vectors * values, atol=1e-12)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(len(M)), atol=1e-12)


def spd(n, seed):
    a = np.random.default_rng(seed).standard_normal((n, n + 1))
    return a @ a.T


def test_safe_eigh_runs_the_plain_problem_in_the_namespace(monkeypatch):
    calls = []
    real = XS.linalg.eigh
    monkeypatch.setattr(XS.linalg, "eigh", lambda m: calls.append(1) or real(m))
    M = spd(5, 0)
    assert_eigenpairs(linalg.safe_eigh(strict(M), "factor"), M)
    assert calls == [1]


def nan_eigh(matrix):
    values, vectors = np.linalg.eigh(to_numpy(matrix))
    return strict(np.full_like(values, np.nan)), strict(vectors)


def raising_eigh(matrix):
    raise RuntimeError("solver failed")


@pytest.mark.parametrize("broken", [raising_eigh, nan_eigh])
def test_safe_eigh_falls_back_to_the_host_when_the_device_fails(monkeypatch, broken):
    monkeypatch.setattr(XS.linalg, "eigh", broken)
    M = spd(6, 1)
    with pytest.warns(RuntimeWarning, match="eigh of layer 1 factor A failed on array_api_strict; retrying on the host"):
        eigen = linalg.safe_eigh(strict(M), "layer 1 factor A")
    assert_eigenpairs(eigen, M)


def test_safe_eigh_on_the_host_when_forced_and_for_the_generalised_problem(monkeypatch):
    def forbidden(matrix):
        raise AssertionError("xp.linalg.eigh must not be called")

    monkeypatch.setattr(XS.linalg, "eigh", forbidden)
    M, B = spd(4, 2), spd(4, 3)
    assert_eigenpairs(linalg.safe_eigh(strict(M), "factor", force_on_host=True), M)
    general = linalg.safe_eigh(strict(M), "factor", B)
    values, vectors = to_numpy(general.values), to_numpy(general.vectors)
    assert array_namespace(general.values) is XS
    np.testing.assert_allclose(M @ vectors, B @ vectors * values, atol=1e-10)
    np.testing.assert_allclose(vectors.T @ B @ vectors, np.eye(4), atol=1e-12)


@pytest.mark.parametrize("fisher_type", ["exact", "empirical", "mc"])
def test_fisher_cotangents_equal_numpy(fisher_type):
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((7, 4))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 4, 7)
    host = fisher_cotangents(probs, NUMPY, fisher_type, y, 3, np.random.default_rng(5))
    device = fisher_cotangents(strict(probs), STRICT, fisher_type, strict(y), 3, np.random.default_rng(5))
    assert array_namespace(device) is XS
    np.testing.assert_allclose(to_numpy(device), host, rtol=1e-12, atol=0)


def test_dense_platform_refuses_another_namespace():
    net = MLP([3, 2], backend=STRICT)
    estimator = DenseEstimator(net, 0.1)
    with pytest.raises(ValueError, match=r"the dense Fisher runs on the host with NumPy arrays only .* use the K-FAC platform"):
        estimator.compute(strict(net.init(0)), strict(np.zeros((2, 3))), None, None, None)
