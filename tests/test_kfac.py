import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kldwrm_ref import MLP
from kldwrm_ref.backends import NUMPY
from kldwrm_ref.curvature.fisher import fisher
from kldwrm_ref.curvature.inverses import EigenDampedInverse, ExactKronSumInverse, FactoredKronSumInverse, KFACOperator, damped_inverse, pi_damping
from kldwrm_ref.curvature.kfac import KronBlock, kfac_factors, kron_blocks, kron_dense
from kldwrm_ref.curvature.linalg import CurvatureError, safe_eigh

import reference_net as ref
from strategies import nets


def assert_solves(x, dense, b):
    """x solves dense x = b up to the accuracy float64 allows: |x - x*| <= 1e-13 cond |x*|."""
    expected = np.linalg.solve(dense, b)
    assert np.linalg.norm(x - expected) <= 1e-13 * np.linalg.cond(dense) * np.linalg.norm(expected)


def layer_block(mlp, F, l):
    sl = slice(mlp.offsets[l], mlp.offsets[l + 1])
    return F[sl, sl]


@given(nets(max_width=5))
def test_kfac_is_exact_for_one_input(case):
    mlp, theta, X, _, _ = case
    x = X[:1]
    F = fisher(mlp, theta, x)
    blocks = kron_blocks(mlp, kfac_factors(mlp, theta, x))
    dense = kron_dense(blocks, mlp.n_params)
    for l in range(mlp.n_layers):
        expected = layer_block(mlp, F, l)
        assert np.linalg.norm(layer_block(mlp, dense, l) - expected) <= 1e-10 * max(np.linalg.norm(expected), 1e-300)


@given(nets(max_width=4, max_hidden=1))
def test_factors_equal_independent_complex_step_implementation(case):
    mlp, theta, X, _, _ = case
    for (A, G), (A_ref, G_ref) in zip(kfac_factors(mlp, theta, X), ref.kfac_factors_exact(mlp.sizes, mlp.activation, theta, X)):
        assert np.linalg.norm(A - A_ref) <= 1e-12 * np.linalg.norm(A_ref)
        assert np.linalg.norm(G - G_ref) <= 1e-10 * max(np.linalg.norm(G_ref), 1e-300)


@given(nets(max_width=5))
def test_separate_bias_blocks_match_their_part_of_the_joint_kronecker_product(case):
    mlp, theta, X, y, _ = case
    factors = kfac_factors(mlp, theta, X, y, "empirical")
    joint = kron_dense(kron_blocks(mlp, factors, "joint"), mlp.n_params)
    separate = kron_dense(kron_blocks(mlp, factors, "separate"), mlp.n_params)
    mask = separate != 0
    np.testing.assert_allclose(separate[mask], joint[mask], rtol=1e-12)  # separate drops only W-b cross terms


def random_spd_factors(mlp, rng, rank_deficient=False):
    factors = []
    for out, inp in mlp.layer_shapes:
        a = rng.standard_normal((inp + 1, inp + (0 if rank_deficient else 3)))
        g = rng.standard_normal((out, out + 2))
        factors.append((a @ a.T / a.shape[1], g @ g.T / g.shape[1]))
    return factors


def factored_damped_dense(blocks, eta, n_params):
    """Block-diagonal (G + gamma_G I) (x) (A + gamma_A I) with pi-damping, dense in theta layout."""
    dense = np.zeros((n_params, n_params))
    for b in blocks:
        gamma_a, gamma_g = pi_damping(b.A, b.G, eta)
        dense[np.ix_(b.positions, b.positions)] = np.kron(b.G + gamma_g * np.eye(len(b.G)), b.A + gamma_a * np.eye(len(b.A)))
    return dense


@st.composite
def kfac_cases(draw):
    mlp, _theta, _X, _y, rng = draw(nets(max_width=5))
    return mlp, rng, draw(st.floats(1e-3, 1.0)), draw(st.sampled_from(["joint", "separate"]))


@given(kfac_cases())
def test_eigen_damped_inverse_equals_dense_solve(case):
    mlp, rng, eta, bias = case
    blocks = kron_blocks(mlp, random_spd_factors(mlp, rng, rank_deficient=True), bias)
    inv = damped_inverse(blocks, mlp.n_params, eta, "eigen", 0.0, NUMPY)
    dense = kron_dense(blocks, mlp.n_params) + eta * np.eye(mlp.n_params)
    V = rng.standard_normal((mlp.n_params, 3))
    assert_solves(inv @ V, dense, V)
    round_trip = inv @ (KFACOperator(blocks, mlp.n_params, NUMPY) @ V + eta * V)  # inverse times operator = identity
    assert np.linalg.norm(round_trip - V) <= 1e-13 * np.linalg.cond(dense) * np.linalg.norm(V)


@pytest.mark.parametrize("style", ["factored", "factored-explicit"])
@given(case=kfac_cases())
def test_factored_damping_inverse_equals_dense_solve(style, case):
    mlp, rng, eta, bias = case
    blocks = kron_blocks(mlp, random_spd_factors(mlp, rng), bias)
    inv = damped_inverse(blocks, mlp.n_params, eta, style, 0.0, NUMPY)
    dense = factored_damped_dense(blocks, eta, mlp.n_params)
    for b in blocks:
        gamma_a, gamma_g = pi_damping(b.A, b.G, eta)
        assert gamma_a * gamma_g == pytest.approx(eta)
    v = rng.standard_normal(mlp.n_params)
    assert_solves(inv @ v, dense, v)


@given(kfac_cases(), st.floats(1e-3, 10.0))
def test_exact_kronecker_sum_solve_equals_dense(case, alpha):
    mlp, rng, eta, bias = case
    average = kron_blocks(mlp, random_spd_factors(mlp, rng), bias)
    current = kron_blocks(mlp, random_spd_factors(mlp, rng, rank_deficient=True), bias)
    inv = ExactKronSumInverse(average, current, mlp.n_params, alpha, eta, NUMPY)
    dense = factored_damped_dense(average, eta, mlp.n_params) + alpha * kron_dense(current, mlp.n_params)
    v = rng.standard_normal(mlp.n_params)
    assert_solves(inv @ v, dense, v)


@given(kfac_cases(), st.floats(1e-3, 10.0))
def test_factored_kronecker_sum_is_the_kronecker_product_of_summed_factors(case, alpha):
    mlp, rng, eta, bias = case
    average = kron_blocks(mlp, random_spd_factors(mlp, rng), bias)
    current = kron_blocks(mlp, random_spd_factors(mlp, rng), bias)
    inv = FactoredKronSumInverse(average, current, mlp.n_params, alpha, eta, "eigen", 0.0, NUMPY)
    dense = np.zeros((mlp.n_params, mlp.n_params))
    for bar, cur in zip(average, current):
        dense[np.ix_(bar.positions, bar.positions)] = np.kron(bar.G + alpha * cur.G, bar.A + alpha * cur.A)
    dense += eta * np.eye(mlp.n_params)
    v = rng.standard_normal(mlp.n_params)
    assert_solves(inv @ v, dense, v)


def test_eigenvalue_floor_works_on_a_copy_of_the_cached_decomposition():
    mlp = MLP([3, 2])
    blocks = kron_blocks(mlp, random_spd_factors(mlp, np.random.default_rng(0), rank_deficient=True))
    inv = EigenDampedInverse(blocks, mlp.n_params, 0.1, 1e-1, NUMPY)
    _eig_g, eig_a = inv.eigens[0]
    np.testing.assert_allclose(eig_a.vectors @ np.diag(eig_a.values) @ eig_a.vectors.T, blocks[0].A, atol=1e-12)
    assert np.any(eig_a.values < 1e-1)  # the floor has something to do
    _d_g, d_a, _ = inv.scales[0]
    assert np.all(d_a[eig_a.values <= 1e-1] == 0) and np.all(d_a[eig_a.values > 1e-1] == eig_a.values[eig_a.values > 1e-1])


def test_failed_decomposition_names_the_factor_and_saves_it():
    bad = np.array([[1.0, np.nan], [np.nan, 1.0]])
    with pytest.raises(CurvatureError, match=r"layer 3 factor G has non-finite entries; saved to (\S+\.npz)") as info:
        safe_eigh(bad, "layer 3 factor G")
    path = str(info.value).rsplit(" ", 1)[-1]
    np.testing.assert_array_equal(np.load(path)["matrix"], bad)


def test_singular_undamped_kfac_is_rejected():
    mlp = MLP([2, 2])
    blocks = [KronBlock(np.eye(3), np.zeros((2, 2)), np.arange(6), "layer 0")]
    with pytest.raises(ValueError, match="singular"):
        EigenDampedInverse(blocks, mlp.n_params, 0.0, 0.0, NUMPY)
    with pytest.raises(ValueError, match="damping must be a finite real number >= 0"):
        EigenDampedInverse(blocks, mlp.n_params, -1.0, 0.0, NUMPY)


@pytest.mark.parametrize("kron_sum", [False, True])
def test_each_distinct_factor_is_decomposed_once(monkeypatch, kron_sum):
    """Separate bias blocks share their layer's G: 2 layers give 6 decompositions (G, A_w, A_b each), not 8."""
    from kldwrm_ref.curvature import inverses

    calls = []
    real = inverses.safe_eigh
    monkeypatch.setattr(inverses, "safe_eigh", lambda matrix, name, *rest: calls.append(name) or real(matrix, name, *rest))
    mlp = MLP([6, 5, 3])
    rng = np.random.default_rng(0)
    blocks = kron_blocks(mlp, random_spd_factors(mlp, rng), "separate")
    if kron_sum:
        FactoredKronSumInverse(blocks, kron_blocks(mlp, random_spd_factors(mlp, rng), "separate"), mlp.n_params, 0.1, 0.01, "eigen", 0.0, NUMPY)
    else:
        damped_inverse(blocks, mlp.n_params, 0.01, "eigen", 0.0, NUMPY)
    assert len(blocks) == 4 and len(calls) == 6
    assert sum("factor G" in name for name in calls) == 2


def test_refresh_decompositions_run_with_one_blas_thread(monkeypatch):
    """Every BLAS pool is at one thread while the factors are decomposed, and back afterwards."""
    from threadpoolctl import threadpool_info

    from kldwrm_ref.curvature import inverses

    seen = []
    real = inverses.safe_eigh

    def spy(matrix, name, other=None):
        seen.append({lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})
        return real(matrix, name, other)

    monkeypatch.setattr(inverses, "safe_eigh", spy)
    before = {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}
    rng = np.random.default_rng(0)
    A, G = (np.cov(rng.standard_normal((n, 3 * n))) for n in (4, 3))
    block = KronBlock(A, G, np.arange(12), "block")
    damped_inverse([block], 12, 0.1, "eigen", 0.0, NUMPY)
    ExactKronSumInverse([block], [block], 12, 0.5, 0.1, NUMPY)
    assert seen and all(set(threads.values()) == {1} for threads in seen)
    assert {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"} == before


def test_block_index_is_a_slice_only_for_one_ascending_run():
    from kldwrm_ref.curvature.inverses import block_index

    v = np.arange(20.0)
    for positions in (np.arange(3, 11), np.array([0, 2, 3]), np.array([5, 4, 3]), np.array([7]), np.array([1, 2, 4, 5])):
        index = block_index(positions)
        assert isinstance(index, slice) == (positions.size > 0 and np.array_equal(positions, np.arange(positions[0], positions[0] + positions.size)))
        np.testing.assert_array_equal(v[index], v[positions])


def test_blocks_must_cover_each_parameter_once():
    block = KronBlock(np.eye(3), np.eye(2), np.arange(6), "layer 0")
    overlapping = KronBlock(np.eye(3), np.eye(2), np.arange(3, 9), "layer 1")
    with pytest.raises(ValueError, match="blocks cover 12 parameters, expected n_params=9"):
        KFACOperator([block, overlapping], 9, NUMPY)
    with pytest.raises(ValueError, match="must cover each of the n_params=9 parameters once"):
        KFACOperator([block, KronBlock(np.eye(1), np.eye(3), np.array([5, 6, 7]), "layer 1")], 9, NUMPY)
    with pytest.raises(ValueError, match=r"must lie in \[0, 9\), got \[0, 9\]"):
        KFACOperator([block, KronBlock(np.eye(1), np.eye(3), np.array([6, 7, 9]), "layer 1")], 9, NUMPY)


def test_blocks_out_of_theta_order_are_put_back_by_the_inverse_permutation():
    """Blocks whose positions interleave in theta: unpermute is argsort of their concatenation, and
    the operator equals the dense block-diagonal matrix assembled position by position."""
    rng = np.random.default_rng(4)
    positions = rng.permutation(12)
    blocks = [KronBlock(m @ m.T, g @ g.T, positions[start : start + m.shape[0] * g.shape[0]], f"block {i}")
              for i, (start, m, g) in enumerate(((0, rng.standard_normal((3, 3)), rng.standard_normal((2, 2))), (6, rng.standard_normal((2, 2)), rng.standard_normal((3, 3)))))]
    operator = KFACOperator(blocks, 12, NUMPY)
    np.testing.assert_array_equal(operator.unpermute, np.argsort(positions))
    dense = np.zeros((12, 12))
    for block in blocks:
        dense[np.ix_(block.positions, block.positions)] = np.kron(block.G, block.A)  # row-major (out, k) V: vec(G V A) = (G kron A) vec(V) for symmetric A
    v = rng.standard_normal(12)
    np.testing.assert_allclose(operator.matvec(v), dense @ v, rtol=1e-12, atol=1e-12)
