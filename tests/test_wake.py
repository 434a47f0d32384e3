import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kldwrm_ref.curvature.linalg import DenseInverse
from kldwrm_ref.optim.correction import wake_corrected_gradient
from kldwrm_ref.theory import objectives
from kldwrm_ref.theory.objectives import OBJECTIVES, History, check_history, q_objective, so_objective
from kldwrm_ref.theory.recursion import damped_solve_step
from kldwrm_ref.theory.verify import CheckResult, compare_with_direct, limits_check, qe_quadratic_check, random_stream, synthetic_history


@st.composite
def streams(draw, varying_alpha=True):
    n = draw(st.integers(1, 7))
    steps = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    stream = random_stream(rng, n, steps, varying_alpha)
    stream["rho"] = draw(st.floats(0.0, 0.99))
    stream["damping"] = draw(st.floats(1e-4, 1.0))
    return stream


def status(objective, history, nxt, solver="linear"):
    return CheckResult("claim", "test", history.n_steps, compare_with_direct(objective, history, nxt, solver), 1e-9).status


@pytest.mark.parametrize("method", ["ea-cm", "so-kld-wrm", "q-kld-wrm"])
@given(stream=streams())
def test_recursion_equals_direct_minimisation(method, stream):
    history, nxt = synthetic_history(method, stream)
    assert compare_with_direct(OBJECTIVES[method], history, nxt, "linear") < 1e-10
    assert compare_with_direct(OBJECTIVES[method], history, nxt, "scipy") < 1e-9


@given(stream=streams(varying_alpha=False))
def test_theorem_1_as_stated_with_constant_alpha(stream):
    """docs/theory.md's Q_k (§3.1) with a fixed lambda: sum_j rho^(k-j) [g_j^T d + (lambda c_j / 2) d^T M_j d]."""
    history, nxt = synthetic_history("ea-cm", stream)
    lam = 1.0 / history.alphas[0]
    for k in range(history.n_steps):
        H = sum(history.rho ** (k - j) * lam * (1.0 if j == 0 else 1.0 - history.rho) * history.damped(j) for j in range(k + 1))
        rhs = sum(history.rho ** (k - j) * (lam * (1.0 if j == 0 else 1.0 - history.rho) * history.damped(j) @ history.thetas[j] - history.grads[j]) for j in range(k + 1))
        minimiser = np.linalg.solve(H, rhs)
        assert np.linalg.norm(minimiser - nxt[k]) <= 1e-9 * np.linalg.norm(minimiser - history.thetas[k])


def test_limits_and_quadratic_qe_consistency():
    rng = np.random.default_rng(5)
    assert limits_check(rng, 6).status == "PASS"
    assert qe_quadratic_check(rng, 5, 6).status == "PASS"


def test_ea_cm_step_fails_the_so_objective():
    history, nxt = synthetic_history("ea-cm", random_stream(np.random.default_rng(1), 5, 6))
    assert status(so_objective, history, nxt) == "FAIL"


def test_q_step_without_previous_curvature_term_fails():
    stream = random_stream(np.random.default_rng(2), 5, 6)
    thetas = [stream["theta0"]]
    avg, prev_g, prev_alpha = None, None, None
    for k in range(6):
        F, B, g, alpha = stream["curvatures"][k], stream["currents"][k], stream["grads"][k], stream["alphas"][k]
        avg = F if avg is None else stream["rho"] * avg + (1 - stream["rho"]) * F
        ghat = wake_corrected_gradient(g, prev_g, stream["rho"], alpha, prev_alpha)
        thetas.append(thetas[-1] + damped_solve_step(DenseInverse(avg + alpha * B, stream["damping"]), ghat, alpha))
        prev_g, prev_alpha = g, alpha  # wrong: omits B_{k-1} s_{k-1}
    thetas = np.array(thetas)
    history = History(thetas[:-1], stream["grads"], stream["curvatures"], stream["alphas"], stream["rho"], stream["damping"], stream["currents"])
    assert status(q_objective, history, thetas[1:]) == "FAIL"
    right, nxt = synthetic_history("q-kld-wrm", stream)
    assert status(q_objective, right, nxt) == "PASS"


def test_wrong_wake_weight_fails(monkeypatch):
    history, nxt = synthetic_history("so-kld-wrm", random_stream(np.random.default_rng(3), 5, 6))
    assert status(so_objective, history, nxt) == "PASS"
    monkeypatch.setattr(objectives, "wake_weights", lambda rho, k: (1 - rho) * rho ** np.arange(k, -1, -1.0))  # drops w_{k,0} = rho^k
    assert status(so_objective, history, nxt) == "FAIL"


def test_bad_histories_are_rejected():
    stream = random_stream(np.random.default_rng(4), 4, 3)
    history, _ = synthetic_history("q-kld-wrm", stream)
    bad = history.curvatures.copy()
    bad[1] = -np.eye(4)
    with pytest.raises(ValueError, match="M_1 = F_1 \\+ damping I is not symmetric positive definite"):
        check_history(history._replace(curvatures=bad))
    with pytest.raises(ValueError, match=r"rho must be a real number in \[0, 1\)"):
        check_history(history._replace(rho=1.0))
    with pytest.raises(ValueError, match=r"history\.grads has shape"):
        check_history(history._replace(grads=history.grads[:-1]))
    with pytest.raises(ValueError, match="alphas\\[0\\]"):
        check_history(history._replace(alphas=np.array([0.0, 1.0, 1.0])))
    with pytest.raises(ValueError, match="B_2 is not positive semi-definite"):
        currents = history.currents.copy()
        currents[2] = -np.eye(4)
        check_history(history._replace(currents=currents))
