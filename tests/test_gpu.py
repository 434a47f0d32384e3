"""The device-resident path (kldwrm_ref.gpu) against the host engine, on numba's CUDA simulator.

- each new kernel against a NumPy computation of the same quantity;
- the device network's logits, gradient and K-FAC factors against the host network's;
- 10-step trajectories (refreshes at steps 0, 4 and 8) of every method, MLP and CNN, equal to the
  NumPy step to 1e-10 in float64, while counting every host <-> device copy: a step between
  refreshes copies only a few scalars (and a CNN's dropout flags), a refresh step copies the
  factors down and the eigenbases up;
- resuming from a downloaded state, divergence, and ``kldwrm mnist --backend cuda`` end to end.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from kldwrm_ref import gpu, optim
from kldwrm_ref.backends import NUMPY, reference
from kldwrm_ref.backends import cuda as device_ops
from kldwrm_ref.curvature.kfac import kfac_factors, kron_blocks
from kldwrm_ref.gpu import kernels
from kldwrm_ref.model import MLP, Network
from kldwrm_ref.model.conv import Conv2d, Dropout, Flatten, MaxPool2d
from kldwrm_ref.model.layers import Dense, ReLU

SCALAR_BYTES = 8 * 8  # "a few scalars": no copy of a non-refresh step may be larger (the dropout flags aside)


def tiny_cnn(dtype=np.float64) -> Network:
    """The paper CNN's layer sequence at toy size: conv, pool, ReLU, flatten, dense, ReLU, dropout, dense."""
    layers = [Conv2d(1, 2, 3, kfac_scaling="authors"), MaxPool2d(2), ReLU(), Flatten(), Dense(8, 3, init="torch"), ReLU(), Dropout(0.5), Dense(3, 3, init="torch")]
    return Network(layers, (1, 6, 6), dtype)


def tiny_mlp(dtype=np.float64) -> Network:
    return MLP([4, 3, 3], dtype=dtype)


def problem(net: Network, n: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *net.input_shape)), rng.integers(0, net.n_classes, n)


def host(array) -> np.ndarray:
    return gpu.to_host(array)


# ------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("tiled", [True, False])
@pytest.mark.parametrize("transpose", ["", "a", "b", "ab"])
def test_both_device_products_match_numpy(tiled, transpose):
    rng = np.random.default_rng(len(transpose) + tiled)
    a = rng.standard_normal((7, 5) if "a" in transpose else (5, 7))
    b = rng.standard_normal((3, 7) if "b" in transpose else (7, 3))
    out = device_ops.matmul_device(gpu.to_device(a), gpu.to_device(b), "a" in transpose, "b" in transpose, tiled=tiled)
    expected = (a.T if "a" in transpose else a) @ (b.T if "b" in transpose else b)
    np.testing.assert_allclose(host(out), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("homogeneous", [True, False])
def test_gram_is_the_scaled_second_moment(homogeneous):
    rows = np.random.default_rng(1).standard_normal((6, 3))
    bar = np.hstack([rows, np.ones((6, 1))]) if homogeneous else rows
    np.testing.assert_allclose(host(kernels.gram(gpu.to_device(rows), 0.25, homogeneous)), 0.25 * bar.T @ bar, rtol=1e-12)


def test_layout_and_row_kernels_match_numpy():
    rng = np.random.default_rng(2)
    dy = rng.standard_normal((3, 2, 2, 3))  # (R, O, H, W)
    rows = host(kernels.channels_to_rows(gpu.to_device(dy)))
    np.testing.assert_array_equal(rows, dy.reshape(3, 2, 6).transpose(0, 2, 1).reshape(18, 2))
    b = rng.standard_normal(2)
    np.testing.assert_allclose(host(kernels.conv_output(gpu.to_device(rows), gpu.to_device(b), (3, 2, 2, 3))), dy + b[None, :, None, None])
    np.testing.assert_allclose(host(kernels.last_sums(gpu.to_device(dy))), dy.sum(axis=(2, 3)))
    out = gpu.to_device(np.zeros(2))
    kernels.column_sums(gpu.to_device(rows), out)
    np.testing.assert_allclose(host(out), rows.sum(axis=0))
    factor = rng.standard_normal((2, 5))
    many = rng.standard_normal((6, 5))  # 3 reps of 2 samples
    np.testing.assert_allclose(host(kernels.multiply_rows(gpu.to_device(many), gpu.to_device(factor))), many * np.tile(factor, (3, 1)))
    source, index = rng.standard_normal(9), np.array([4, 0, 8, 2])
    gathered = kernels.gather(gpu.to_device(source), gpu.to_device(index))
    np.testing.assert_array_equal(host(gathered), source[index])
    target = gpu.to_device(np.zeros(9))
    kernels.scatter(gathered, gpu.to_device(index), target)
    expected = np.zeros(9)
    expected[index] = source[index]
    np.testing.assert_array_equal(host(target), expected)
    X, order = rng.standard_normal((5, 3)), np.array([3, 1, 4, 0, 2])
    np.testing.assert_array_equal(host(kernels.take_rows(gpu.to_device(X), gpu.to_device(order), 1, 3)), X[order[1:4]])


def test_activation_and_dropout_kernels_match_the_host_layers():
    x = np.random.default_rng(3).standard_normal((4, 5))
    x[2, 3] = np.nan  # passes through, as np.maximum(NaN, 0) does on the host
    y, derivative = kernels.relu(gpu.to_device(x))
    np.testing.assert_array_equal(host(y), np.maximum(x, 0))
    np.testing.assert_array_equal(host(derivative), (x > 0).astype(float))
    x[2, 3] = 0.5
    y, derivative = kernels.tanh(gpu.to_device(x))
    np.testing.assert_allclose(host(y), np.tanh(x), rtol=1e-14)
    np.testing.assert_allclose(host(derivative), 1 - np.tanh(x) ** 2, rtol=1e-13)
    expected, mask = Dropout(0.3).forward([], x, NUMPY, np.random.default_rng(7))
    keep = np.random.default_rng(7).random(x.shape) >= 0.3
    y, device_mask = kernels.dropout(gpu.to_device(x), gpu.to_device(keep, np.uint8), 0.7)
    np.testing.assert_allclose(host(y), expected, rtol=1e-15)
    np.testing.assert_allclose(host(device_mask), mask, rtol=1e-15)


def test_softmax_and_fisher_cotangent_rows_match_the_reference():
    logits = np.random.default_rng(4).standard_normal((3, 4))
    probs = np.exp(reference.log_softmax(logits))
    device_probs = kernels.softmax(gpu.to_device(logits))
    np.testing.assert_allclose(host(device_probs), probs, rtol=1e-14)
    exact = reference.fisher_cotangents(probs).transpose(1, 0, 2).reshape(12, 4)  # rep-major rows
    np.testing.assert_allclose(host(kernels.exact_rows(device_probs)), exact, rtol=1e-13, atol=1e-15)
    labels = np.array([[0, 3, 1], [2, 2, 0]])
    expected = np.concatenate([probs - np.eye(4)[labels[s]] for s in range(2)]) / np.sqrt(2)
    np.testing.assert_allclose(host(kernels.sampled_rows(device_probs, gpu.to_device(labels))), expected, rtol=1e-14)


def test_reductions_write_one_scalar_each():
    x, y = np.random.default_rng(5).standard_normal((2, 37))
    x[3] = np.inf
    x[9] = np.nan
    scalars = kernels.zeros(3, np.float64)
    finite = np.where(np.isfinite(x), x, 0.0)
    kernels.dot(gpu.to_device(finite), gpu.to_device(y), scalars, 0)
    kernels.total(gpu.to_device(y), scalars, 1)
    kernels.nonfinite(gpu.to_device(x), scalars, 2)
    np.testing.assert_allclose(host(scalars), [finite @ y, y.sum(), 2], rtol=1e-13)


def test_kernels_refuse_host_arrays():
    with pytest.raises(TypeError, match="host array"):
        kernels.dot(np.ones(3), gpu.to_device(np.ones(3)), kernels.zeros(1, np.float64), 0)
    with pytest.raises(TypeError, match="host array"):
        device_ops.launch(kernels._fill_kernel, 3, np.ones(3), 0.0)


# ------------------------------------------------------------------------------ network
@pytest.mark.parametrize("make_net", [tiny_mlp, tiny_cnn, lambda: MLP([4, 3, 3], activation="tanh")])
@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_device_network_passes_equal_the_host_network(make_net, fisher_type):
    net = make_net()
    X, y = problem(net)
    theta = net.init(1)
    device_net = gpu.DeviceNetwork(net)
    d_theta, d_X = gpu.to_device(theta), gpu.to_device(X)
    keeps = device_net.dropout_keeps(net.training_rng((0, 0, 1)), len(y))
    cache = device_net.forward(d_theta, d_X, keeps)
    _, host_grad, host_cache = net.loss_grad_cache(theta, X, y, net.training_rng((0, 0, 1)))
    np.testing.assert_allclose(host(cache.logits), host_cache.logits, rtol=1e-12, atol=1e-14)
    _, dlogits = device_ops.xent_device(cache.logits, gpu.to_device(y))
    grad = device_net.vjp(d_theta, cache, dlogits)
    np.testing.assert_allclose(host(grad) / len(y), host_grad, rtol=1e-11, atol=1e-14)
    probs = kernels.softmax(cache.logits)
    rows = kernels.exact_rows(probs) if fisher_type == "exact" else dlogits
    factors = device_net.kfac_factors(cache, device_net.backward(d_theta, cache, rows), len(y))
    expected = kfac_factors(net, theta, X, y, fisher_type, cache=host_cache)
    for got, want in zip(factors, expected):
        for g_part, w_part in zip(got, want):
            np.testing.assert_allclose(host(g_part), w_part, rtol=1e-11, atol=1e-14)


def test_unsupported_layers_and_optimisers_are_named():
    class Custom(ReLU):
        pass

    with pytest.raises(ValueError, match="Custom"):
        gpu.DeviceNetwork(Network([Dense(3, 2), Custom()], (3,)))
    net = tiny_mlp()
    with pytest.raises(ValueError, match="platform 'dense'"):
        gpu.make_device(optim.make("q-kld-wrm", net, platform="dense", backend="numpy"))
    with pytest.raises(ValueError, match="inner='preconditioned'"):
        gpu.make_device(optim.make("qe-kld-wrm", net, platform="kfac", backend="numpy"))


# ------------------------------------------------------------------------------ trajectories
def _trajectory(net, name, steps=10, **overrides):
    """Run ``steps`` host and device steps side by side; per step (host theta, device theta,
    refreshed?, the copies the device step made)."""
    X, y = problem(net)
    settings = {"period": 4, "step_size": 0.05, **overrides}
    opt = optim.make(name, net, platform=None if name == "sgd" else "kfac", preset="paper", backend="numpy", **settings)
    device = gpu.make_device(opt)
    theta = net.init(0)
    state = opt.init(theta)
    d_theta, d_state = device.upload(theta, state)
    d_X, d_y = gpu.to_device(X), gpu.to_device(y)
    out = []
    for _ in range(steps):
        theta, state, info = opt.step(theta, state, X, y)
        with gpu.counting() as copies:
            d_theta, d_state, d_info = device.step(d_theta, d_state, d_X, d_y)
        assert d_info["loss"] == pytest.approx(info["loss"], rel=1e-12)
        for key in ("kl_clip_factor", "rms_clip_factor"):
            assert (key in d_info) == (key in info)
            if key in info:
                assert d_info[key] == pytest.approx(info[key], rel=1e-9)
        out.append((theta, host(d_theta), info.get("refreshed", False), copies))
    return out, device, d_state


def _factor_sizes(net, bias):
    """The byte sizes of the K-FAC factor arrays (down on a refresh) and of the eigenbases (up)."""
    X, y = problem(net)
    factors = kfac_factors(net, net.init(0), X, y, "empirical")
    down = {a.nbytes for f in factors for a in f}
    blocks = kron_blocks(net, factors, bias)
    up = {m.nbytes for b in blocks for m in (b.A, b.G)} | {8 * m.shape[0] for b in blocks for m in (b.A, b.G)}  # eigenvectors, eigenvalues
    return down, up


METHODS = ["kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm"]


@pytest.mark.parametrize(("make_net", "name"), [(net, name) for net in (tiny_mlp, tiny_cnn) for name in METHODS] + [(tiny_mlp, "sgd")])
def test_device_trajectory_equals_numpy_and_copies_only_what_it_must(make_net, name):
    net = make_net()
    extra = dict(inner_steps=3) if (name == "qe-kld-wrm" and make_net is tiny_cnn) else {}
    # 7 steps with period 3: refreshes at 0, 3, 6, and QE's inner solve once its wake is full (k >= m = 3)
    steps, period = 7, 3
    if name == "sgd":
        trajectory, _, _ = _trajectory(net, name, steps=steps)
    else:
        trajectory, _, _ = _trajectory(net, name, steps=steps, period=period, kl_clip=1e-3, rms_clip=0.05, **extra)
    down, up = _factor_sizes(net, "separate")
    dropout_bytes = {np.prod((4, *net.shapes[i])) for i, layer in enumerate(net.layers) if isinstance(layer, Dropout)}
    for k, (theta, device_theta, refreshed, copies) in enumerate(trajectory):
        np.testing.assert_allclose(device_theta, theta, rtol=1e-10, atol=1e-10, err_msg=f"step {k}")
        large = [c for c in copies if c.nbytes > SCALAR_BYTES and not (c.direction == "to_device" and c.nbytes in dropout_bytes)]
        if not refreshed:
            assert large == [], f"step {k} (no refresh) copied {large}"
        else:
            assert {c.nbytes for c in large if c.direction == "to_host"} <= down, f"step {k}"
            assert {c.nbytes for c in large if c.direction == "to_device"} <= up, f"step {k}"
            assert any(c.direction == "to_host" for c in large) and any(c.direction == "to_device" for c in large)
    assert [refreshed for *_, refreshed, _ in trajectory] == [name != "sgd" and k % period == 0 for k in range(steps)]


@pytest.mark.parametrize("name", ["q-kld-wrm", "qe-kld-wrm"])
def test_theory_options_on_the_device(name):
    """The other branches: MC Fisher, joint bias, exact Kronecker sum, exact correction,
    sequential clips by layer, the proximal term, the last B_k between refreshes."""
    overrides = dict(fisher_type="mc", samples=2, bias="joint", kron_sum="exact", correction="exact", rms_clip_per="layer",
                     clip_order="sequential", stale_current="last", kl_clip=1e-3, rms_clip=0.05, eig_floor=0.0, damping=0.1)
    if name == "qe-kld-wrm":
        overrides.update(proximal=True, kl="forward", inner_after_full_wake=False, inner_steps=2)
    trajectory, _, _ = _trajectory(tiny_mlp(), name, **overrides)
    for k, (theta, device_theta, _, _) in enumerate(trajectory):
        np.testing.assert_allclose(device_theta, theta, rtol=1e-10, atol=1e-10, err_msg=f"step {k}")


def test_resuming_from_a_downloaded_state_continues_the_trajectory():
    net = tiny_mlp()
    X, y = problem(net)
    opt = optim.make("q-kld-wrm", net, platform="kfac", preset="paper", backend="numpy", period=3, step_size=0.05)
    device = gpu.make_device(opt)
    d_X, d_y = gpu.to_device(X), gpu.to_device(y)
    theta, state = device.upload(net.init(0), opt.init(net.init(0)))
    for _ in range(4):
        theta, state, _ = device.step(theta, state, d_X, d_y)
    host_theta, host_state = device.download(theta, state)
    assert isinstance(host_state.ea.average[0].A, np.ndarray) and host_state.inverse is None
    resumed = device.upload(host_theta, host_state)
    for _ in range(3):
        theta, state, _ = device.step(theta, state, d_X, d_y)
        resumed = device.step(*resumed, d_X, d_y)[:2]
    np.testing.assert_allclose(host(resumed[0]), host(theta), rtol=1e-13, atol=1e-15)
    reference_theta, reference_state = net.init(0), opt.init(net.init(0))
    for _ in range(7):
        reference_theta, reference_state, _ = opt.step(reference_theta, reference_state, X, y)
    np.testing.assert_allclose(host(theta), reference_theta, rtol=1e-10, atol=1e-10)


def test_a_non_finite_batch_diverges_with_the_host_message():
    net = tiny_mlp()
    X, y = problem(net)
    X[1, 2] = np.nan
    opt = optim.make("kfac", net, platform="kfac", preset="paper", backend="numpy")
    device = gpu.make_device(opt)
    theta, state = device.upload(net.init(0), opt.init(net.init(0)))
    with pytest.raises(optim.DivergenceError, match="diverged at step 0: batch holds a NaN"):
        device.step(theta, state, gpu.to_device(X), gpu.to_device(y))


def test_mnist_command_runs_device_resident_and_matches_numpy(tmp_path):
    from kldwrm_ref.cli import main

    results = {}
    for backend in ("numpy", "cuda"):
        config = dict(name="tiny", optimizers=["kfac", "qe-kld-wrm"], architectures=[[12, 4, 10]], epochs=2, seeds=[0], batch=16, preset="paper",
                      dtype="float64", backend=backend, data=dict(source="synthetic", pool=1, subset=None, n_train=48, n_test=24), hyper={"*": {"period": 2}, "qe-kld-wrm": {"inner_steps": 2}})
        path = tmp_path / f"{backend}.json"
        path.write_text(json.dumps(config))
        assert main(["mnist", "--config", str(path), "--out", str(tmp_path / backend), "--no-progress"]) == 0
        results[backend] = {opt: (tmp_path / backend / "tiny" / "12-4-10" / opt / "seed-0" / "metrics.csv").read_text().splitlines() for opt in config["optimizers"]}
    for opt, rows in results["cuda"].items():
        host_rows = results["numpy"][opt]
        header = host_rows[0].split(",")
        for got, want in zip(rows[1:], host_rows[1:]):
            for field, a, b in zip(header, got.split(","), want.split(",")):
                if field in ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "batch_loss"):
                    assert float(a) == pytest.approx(float(b), rel=1e-9, abs=1e-12), (opt, field)



def test_float32_device_steps_stay_float32_and_track_numpy():
    """Training runs in float32: the device arrays keep the dtype, and 4 steps agree with the
    NumPy step to float32 round-off."""
    net = tiny_mlp(np.float32)
    X, y = problem(net)
    X = X.astype(np.float32)
    opt = optim.make("q-kld-wrm", net, platform="kfac", preset="paper", backend="numpy", period=2, step_size=0.05)
    device = gpu.make_device(opt)
    theta, state = net.init(0), opt.init(net.init(0))
    d_theta, d_state = device.upload(theta, state)
    d_X, d_y = gpu.to_device(X), gpu.to_device(y)
    for _ in range(4):
        theta, state, _ = opt.step(theta, state, X, y)
        d_theta, d_state, _ = device.step(d_theta, d_state, d_X, d_y)
    got = host(d_theta)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, theta, rtol=1e-4, atol=1e-5)


def test_a_step_size_schedule_is_called_only_for_its_own_step():
    """Q under a schedule: the device builds no inverse ahead (which would call the schedule for
    the next step) and follows the host."""
    net = tiny_mlp()
    X, y = problem(net)
    schedule = [0.05, 0.04, 0.03]
    opt = optim.make("q-kld-wrm", net, platform="kfac", preset="paper", backend="numpy", period=2, step_size=lambda k: schedule[k])
    device = gpu.make_device(opt)
    theta, state = net.init(0), opt.init(net.init(0))
    d_theta, d_state = device.upload(theta, state)
    d_X, d_y = gpu.to_device(X), gpu.to_device(y)
    for _ in schedule:  # step 2 refreshes; schedule[3] does not exist
        theta, state, _ = opt.step(theta, state, X, y)
        d_theta, d_state, _ = device.step(d_theta, d_state, d_X, d_y)
    np.testing.assert_allclose(host(d_theta), theta, rtol=1e-10, atol=1e-10)


def test_an_inner_solve_that_blows_up_diverges_on_host_and_device():
    net = tiny_mlp()
    X, y = problem(net)
    opt = optim.make("qe-kld-wrm", net, platform="kfac", preset="paper", backend="numpy", inner_after_full_wake=False, inner_steps=3, inner_step_factor=1e308)
    with pytest.raises(optim.DivergenceError, match="inner-solve step"):
        opt.step(net.init(0), opt.init(net.init(0)), X, y)
    device = gpu.make_device(opt)
    theta, state = device.upload(net.init(0), opt.init(net.init(0)))
    with pytest.raises(optim.DivergenceError, match="inner-solve step"):
        device.step(theta, state, gpu.to_device(X), gpu.to_device(y))
