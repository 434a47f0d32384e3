import numpy as np
import pytest

from kldwrm_ref import MLP
from kldwrm_ref.curvature.fisher import fisher
from kldwrm_ref.curvature.inverses import pi_damping
from kldwrm_ref.curvature.kfac import kfac_factors, kron_blocks, kron_dense
from kldwrm_ref.data import synthetic_classification
from kldwrm_ref.optim import NAMES, DivergenceError, make
from kldwrm_ref.theory.verify import qe_gradient_check, trajectory_checks


@pytest.fixture(scope="module")
def problem():
    X, y = synthetic_classification(8 * 32, 6, 4, seed=3)
    batches = [(X[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32]) for i in range(8)]
    return MLP([6, 5, 4], "tanh"), batches


def test_dense_trajectories_equal_direct_minimisers(problem):
    mlp, batches = problem
    for result in trajectory_checks(mlp, batches, 0, "test")[:3]:  # theorems 1-3 (QE: next test)
        assert result.status == "PASS", result


def test_qe_inner_solve_drives_objective_gradient_to_zero(problem):
    mlp, batches = problem
    result = qe_gradient_check(mlp, batches, 0, "test", inner_steps=60, steps=6)
    assert result.worst < 1e-8, result


def dense_kfac(mlp, flat, bias="joint"):
    return kron_dense(kron_blocks(mlp, [(flat[2 * l], flat[2 * l + 1]) for l in range(mlp.n_layers)], bias), mlp.n_params)


@pytest.mark.parametrize("name, kron_sum", [("kfac", "exact"), ("so-kld-wrm", "exact"), ("q-kld-wrm", "exact"), ("q-kld-wrm", "factored")])
def test_kfac_platform_steps_equal_dense_solves(problem, name, kron_sum):
    """Replay the recursion with densely assembled K-FAC matrices and np.linalg.solve."""
    mlp, batches = problem
    rho, alpha, eta = 0.6, 0.3, 0.05
    opt = make(name, mlp, platform="kfac", rho=rho, step_size=alpha, damping=eta, kron_sum=kron_sum)
    theta = mlp.init(1)
    state = opt.init(theta)
    avg = prev_model_grad = None
    for X, y in batches[:4]:
        _, g = mlp.loss_and_grad(theta, X, y)
        cur = [m for f in kfac_factors(mlp, theta, X) for m in f]
        avg = cur if avg is None else [rho * a + (1 - rho) * c for a, c in zip(avg, cur)]
        ghat = g if (name == "kfac" or prev_model_grad is None) else g - rho * prev_model_grad
        if name == "q-kld-wrm" and kron_sum == "exact":
            matrix = np.zeros((mlp.n_params, mlp.n_params))
            for l in range(mlp.n_layers):
                Abar, Gbar = avg[2 * l], avg[2 * l + 1]
                gamma_a, gamma_g = pi_damping(Abar, Gbar, eta)
                sl = slice(mlp.offsets[l], mlp.offsets[l + 1])
                damped = [Abar + gamma_a * np.eye(len(Abar)), Gbar + gamma_g * np.eye(len(Gbar))]
                matrix[sl, sl] = dense_kfac(MLP(mlp.sizes[l : l + 2]), damped)
            matrix += alpha * dense_kfac(mlp, cur)
        elif name == "q-kld-wrm":
            matrix = dense_kfac(mlp, [a + alpha * c for a, c in zip(avg, cur)]) + eta * np.eye(mlp.n_params)
        else:
            matrix = dense_kfac(mlp, avg) + eta * np.eye(mlp.n_params)
        expected_step = -alpha * np.linalg.solve(matrix, ghat)
        new_theta, state, _ = opt.step(theta, state, X, y)
        np.testing.assert_allclose(new_theta - theta, expected_step, rtol=1e-9, atol=1e-12)
        if name == "so-kld-wrm":
            prev_model_grad = g
        elif name == "q-kld-wrm":
            prev_model_grad = g + dense_kfac(mlp, cur) @ expected_step  # g_{k-1} + B_{k-1} s_{k-1}
        theta = new_theta


def test_rho_zero_so_ea_cm_and_natural_gradient_coincide(problem):
    mlp, batches = problem
    trajectories = {}
    for name in ("ea-cm", "so-kld-wrm"):
        opt = make(name, mlp, rho=0.0, step_size=0.2, damping=0.01)
        theta = mlp.init(2)
        state = opt.init(theta)
        path = []
        for X, y in batches[:4]:
            natural = theta - 0.2 * np.linalg.solve(fisher(mlp, theta, X) + 0.01 * np.eye(mlp.n_params), mlp.loss_and_grad(theta, X, y)[1])
            theta, state, _ = opt.step(theta, state, X, y)
            np.testing.assert_allclose(theta, natural, rtol=1e-10, atol=1e-12)
            path.append(theta)
        trajectories[name] = np.array(path)
    np.testing.assert_allclose(trajectories["ea-cm"], trajectories["so-kld-wrm"], rtol=1e-10)


def test_sgd_with_momentum_matches_hand_computation(problem):
    mlp, batches = problem
    opt = make("sgd", mlp, step_size=0.1, momentum=0.9, weight_decay=0.01)
    theta = mlp.init(0)
    state = opt.init(theta)
    velocity = np.zeros_like(theta)
    for X, y in batches[:3]:
        velocity = 0.9 * velocity + mlp.loss_and_grad(theta, X, y)[1] + 0.01 * theta
        expected = theta - 0.1 * velocity
        theta, state, _ = opt.step(theta, state, X, y)
        np.testing.assert_allclose(theta, expected, rtol=1e-14)


@pytest.mark.parametrize("platform", ["dense", "kfac"])
@pytest.mark.parametrize("name", NAMES)
def test_every_optimiser_reduces_the_training_loss(name, platform):
    if name == "kfac" and platform == "dense":
        pytest.skip("K-FAC exists on the kfac platform only")
    X, y = synthetic_classification(256, 8, 4, seed=0)
    mlp = MLP([8, 6, 4], "tanh")
    opt = make(name, mlp, platform=platform, step_size=0.1 if name != "sgd" else 0.5, damping=0.1, inner_steps=3)
    theta = mlp.init(0)
    state = opt.init(theta)
    before = mlp.loss(theta, X, y)
    for k in range(40):
        rows = np.arange(k * 32, (k + 1) * 32) % 256
        theta, state, info = opt.step(theta, state, X[rows], y[rows])
    assert mlp.loss(theta, X, y) < 0.7 * before
    assert {"loss", "step_norm", "time"} <= set(info)


@pytest.mark.parametrize("name", ["kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm"])
def test_paper_preset_runs_at_mnist_size_without_nans(name):
    X, y = synthetic_classification(512 * 4, 784, 10, seed=1)
    mlp = MLP([784, 256, 10])
    opt = make(name, mlp, platform="kfac", preset="paper")
    theta = mlp.init(0)
    state = opt.init(theta)
    losses = []
    for k in range(40 if name == "qe-kld-wrm" else 70):  # the preset refreshes every 30 steps: 2 or 3 refreshes
        rows = slice((k % 4) * 512, (k % 4 + 1) * 512)
        theta, state, info = opt.step(theta, state, X[rows], y[rows])
        losses.append(info["loss"])
    assert np.all(np.isfinite(losses)) and np.all(np.isfinite(theta))
    assert np.mean(losses[-10:]) < losses[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="adam"), "name must be one of"),
        (dict(name="kfac", platform="dense"), "platform='kfac'"),
        (dict(name="so-kld-wrm", rho=1.0), r"rho must be a real number in \[0, 1\)"),
        (dict(name="so-kld-wrm", step_size=0.0), "step_size must be a finite real number > 0"),
        (dict(name="so-kld-wrm", damping=-1.0), "damping must be a finite real number >= 0"),
        (dict(name="q-kld-wrm", kron_sum="approx"), "kron_sum must be one of"),
        (dict(name="qe-kld-wrm", m=0), "m must be an integer >= 1"),
        (dict(name="qe-kld-wrm", kl="reverse"), "kl must be one of"),
        (dict(name="sgd", momentum=1.0), r"momentum must be in \[0, 1\)"),
        (dict(name="kfac", kl_clip=-0.1), "kl_clip must be a finite real number > 0"),
        (dict(name="ea-cm", learning_rate=0.1), "unknown hyperparameter"),
        (dict(name="ea-cm", preset="fast"), "preset must be one of"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        make(name, MLP([3, 2]), **kwargs)


@pytest.mark.parametrize("name", ["sgd", "so-kld-wrm", "qe-kld-wrm"])
def test_forced_divergence_raises_with_step_and_quantity(problem, name, monkeypatch):
    mlp, batches = problem
    original = mlp.training_pass  # the step's forward and backward pass
    calls = []

    def nan_gradient_at_step_2(theta, X, y, rng=None, **kwargs):
        loss, grad, cache = original(theta, X, y, rng, **kwargs)
        calls.append(1)
        return (loss, np.full_like(grad, np.nan), cache) if len(calls) == 3 else (loss, grad, cache)

    monkeypatch.setattr(mlp, "training_pass", nan_gradient_at_step_2)
    opt = make(name, mlp, backend=mlp.backend.name, inner_steps=1)  # the same (patched) MLP object
    theta = mlp.init(0)
    state = opt.init(theta)
    with pytest.raises(DivergenceError, match=r"diverged at step 2: gradient is not finite") as info:
        for X, y in batches:
            theta, state, _ = opt.step(theta, state, X, y)
    assert (info.value.step, info.value.quantity) == (2, "gradient")


def _first_divergence(opt, theta, batches):
    state = opt.init(theta)
    with pytest.raises(DivergenceError) as info:
        for X, y in batches:
            theta, state, _ = opt.step(theta, state, X, y)
    return info.value


@pytest.mark.parametrize("name", ["sgd", "kfac", "qe-kld-wrm"])
def test_a_batch_with_a_nan_is_a_divergence_at_its_step(problem, name):
    mlp, batches = problem
    poisoned = [(X.copy(), y) for X, y in batches[:4]]
    poisoned[2][0][1, 3] = np.nan
    opt = make(name, mlp, platform="kfac" if name == "kfac" else "dense", inner_steps=1)
    error = _first_divergence(opt, mlp.init(0), poisoned)
    assert (error.step, error.quantity) == (2, "batch") and "NaN or an infinity" in str(error)


@pytest.mark.parametrize("name", ["sgd", "so-kld-wrm"])
def test_a_step_size_schedule_returning_inf_is_a_divergence(problem, name):
    mlp, batches = problem
    opt = make(name, mlp, step_size=lambda k: 0.1 if k < 3 else float("inf"))
    error = _first_divergence(opt, mlp.init(0), batches)
    assert (error.step, error.quantity) == (3, "step size")


def test_zero_damping_with_a_rank_deficient_factor_is_a_divergence():
    """Two samples in 6 dimensions: A has rank <= 3, so G (x) A with damping 0 is singular."""
    X, y = synthetic_classification(2, 6, 4, seed=0)
    mlp = MLP([6, 5, 4], "tanh")
    opt = make("kfac", mlp, platform="kfac", damping=0.0, weight_decay=0.0)
    error = _first_divergence(opt, mlp.init(0), [(X, y)])
    assert (error.step, error.quantity) == (0, "curvature inverse") and "singular" in str(error)


def test_a_failing_eigendecomposition_is_a_divergence(problem, monkeypatch):
    """scipy's eigh raising LinAlgError (also on the float64 retry with jitter) ends the run at that step."""
    import scipy.linalg

    mlp, batches = problem
    opt = make("kfac", mlp, platform="kfac", period=2)
    real, calls = scipy.linalg.eigh, []

    def failing_after_first_refresh(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2 * mlp.n_layers:  # the first refresh decomposes A and G of each layer
            raise np.linalg.LinAlgError("forced")
        return real(*args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "eigh", failing_after_first_refresh)
    with pytest.warns(RuntimeWarning, match="retrying in float64 with jitter"):
        error = _first_divergence(opt, mlp.init(0), batches)
    assert (error.step, error.quantity) == (2, "curvature inverse") and "failed even with jitter" in str(error)
