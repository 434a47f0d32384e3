import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kldwrm_ref.curvature.averaging import ExponentialAverage, truncated_wake_weights, wake_weights


@given(st.floats(0.0, 0.999), st.integers(0, 30), st.booleans(), st.integers(0, 2**31 - 1))
def test_unrolled_weights_sum_to_one_and_reproduce_the_recursion(rho, k, zero_start, seed):
    rng = np.random.default_rng(seed)
    matrices = [rng.standard_normal((3, 2)) for _ in range(k + 1)]
    ea = ExponentialAverage.create(rho, zero_start=zero_start)
    state = ea.init()
    for m in matrices:
        state = ea.update(state, (m,))
    weights = ea.weights(state)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(ea.value(state)[0], sum(w * m for w, m in zip(weights, matrices)), rtol=1e-12, atol=1e-12)


def test_wake_weights_closed_form():
    np.testing.assert_allclose(wake_weights(0.5, 3), [0.125, 0.125, 0.25, 0.5])
    np.testing.assert_allclose(wake_weights(0.0, 2), [0.0, 0.0, 1.0])
    assert list(wake_weights(0.3, 0)) == [1.0]
    idx, w = truncated_wake_weights(0.5, 5, 3)
    np.testing.assert_array_equal(idx, [3, 4, 5])
    np.testing.assert_allclose(w, [0.25, 0.25, 0.5])


def test_refresh_period_advances_only_on_multiples():
    ea = ExponentialAverage.create(0.5, period=3)
    state = ea.init()
    seen = []
    for step in range(7):
        due = ea.due(state)
        state = ea.update(state, (np.full(1, float(step)),) if due else None)
        seen.append(due)
    assert seen == [True, False, False, True, False, False, True]
    assert state.updates == 3 and ea.value(state)[0][0] == pytest.approx(0.25 * 0 + 0.25 * 3 + 0.5 * 6)


@pytest.mark.parametrize("rho", [1.0, -0.1, 1.5, float("nan")])
def test_rho_outside_unit_interval_is_rejected(rho):
    with pytest.raises(ValueError, match=r"rho must be a real number in \[0, 1\)"):
        ExponentialAverage.create(rho)
    with pytest.raises(ValueError, match="rho"):
        wake_weights(rho, 2)


def test_update_does_not_modify_its_inputs():
    ea = ExponentialAverage.create(0.5)
    first = np.ones(2)
    state = ea.update(ea.init(), (first,))
    state2 = ea.update(state, (np.zeros(2),))
    np.testing.assert_array_equal(first, 1.0)
    np.testing.assert_array_equal(state.average[0], 1.0)
    np.testing.assert_array_equal(state2.average[0], 0.5)

