"""A step between refreshes reads the device twice: its inputs' checks at the start, its checks
and info's numbers at the end (docs/gpu.md).  On a GPU every read is a synchronisation.

The step runs on array-api-strict arrays, whose every way to the host (``bool``, ``float``,
``int``, ``__index__``, DLPack, ``__array__``) is counted; the kernels' host hop of
:func:`~kldwrm_ref.backends.host_hop_backend` is not counted (on a GPU the kernels run there).
The deferred checks must still name the first non-finite quantity, in step order.
"""

from __future__ import annotations

import numpy as np
import pytest

from kldwrm_ref import optim
from kldwrm_ref.arrays import array_namespace, counting_transfers, host_arrays
from kldwrm_ref.backends import OPERATIONS, host_hop_backend
from kldwrm_ref.curvature.estimators import KFACEstimator
from kldwrm_ref.model import MLP, Network
from kldwrm_ref.model.conv import Conv2d, Dropout, Flatten, MaxPool2d
from kldwrm_ref.model.layers import Dense, ReLU
from kldwrm_ref.optim import DivergenceError
from kldwrm_ref.optim.qe import WakeObjective

xps = pytest.importorskip("array_api_strict")
HOST_WAYS = ("__bool__", "__float__", "__int__", "__index__", "__complex__", "__dlpack__", "__array__")
PERIOD = 4
SETTINGS = dict(period=PERIOD, step_size=0.05, m=2, inner_steps=2, inner_after_full_wake=False)


def small_mlp() -> Network:
    return MLP([5, 4, 3], activation="tanh", dtype=np.float64)


def small_cnn() -> Network:
    layers = [Conv2d(1, 2, 3, kfac_scaling="authors"), MaxPool2d(2), ReLU(), Flatten(), Dense(8, 4, init="torch"), ReLU(), Dropout(0.5), Dense(4, 3, init="torch")]
    return Network(layers, (1, 6, 6), np.float64)


@pytest.fixture
def counted(monkeypatch):
    """(the strict backend, the list of reads made outside its kernels)."""
    array_type = type(xps.asarray(0.0))
    reads: list[str] = []
    in_kernel = [False]

    def counting(way):
        original = getattr(array_type, way)

        def read(self, *args, **kwargs):
            if not in_kernel[0]:
                reads.append(way)
            return original(self, *args, **kwargs)

        return read

    for way in HOST_WAYS:
        if hasattr(array_type, way):
            monkeypatch.setattr(array_type, way, counting(way))

    def uncounted(kernel):
        def call(*args, **kwargs):
            in_kernel[0] = True
            try:
                return kernel(*args, **kwargs)
            finally:
                in_kernel[0] = False

        return call

    strict = host_hop_backend(array_namespace(xps.asarray(0.0)))
    return strict._replace(**{op: uncounted(getattr(strict, op)) for op in OPERATIONS[:-1]}), reads


def batches(net: Network, n: int, seed: int = 2):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((6, *net.input_shape)), rng.integers(0, net.n_classes, 6)) for _ in range(n)]


@pytest.mark.parametrize("make_net", [small_mlp, small_cnn])
@pytest.mark.parametrize("name", ["sgd", "kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm"])
def test_a_step_between_refreshes_reads_the_device_twice(counted, make_net, name):
    strict, reads = counted
    net = make_net()
    opt = optim.make(name, net, platform=None if name == "sgd" else "kfac", preset="paper", backend=strict, **({} if name == "sgd" else SETTINGS))
    be = opt.network.backend
    theta = be.asarray(opt.network.init(0))
    state = opt.init(theta)
    per_step = []
    for X, y in batches(net, 3 * PERIOD):
        X_dev, y_dev = be.asarray(X), be.asarray(y)  # device-resident batches, as the trainer's
        reads.clear()
        theta, state, info = opt.step(theta, state, X_dev, y_dev)
        per_step.append(len(reads))
    # steps 0 and 1 of each period refresh (Q and QE also rebuild their Kronecker-sum inverse on
    # the step after a refresh); the others only use the averaged curvature
    steady = [count for k, count in enumerate(per_step) if k % PERIOD > 1]
    assert steady and all(count == 2 for count in steady), per_step
    assert info["loss"] > 0 and info["step_norm"] > 0  # info still holds host floats


def _diverging(opt, net, batches_, monkeypatch, at: int):
    """Steps until a DivergenceError, with the gradient of step ``at`` replaced by NaNs."""
    original = net.training_pass
    calls = []

    def nan_gradient(theta, X, y, rng=None, **kwargs):
        loss, grad, cache = original(theta, X, y, rng, **kwargs)
        calls.append(1)
        return (loss, grad * float("nan"), cache) if len(calls) == at + 1 else (loss, grad, cache)

    monkeypatch.setattr(net, "training_pass", nan_gradient)
    be = net.backend
    theta = be.asarray(net.init(0))
    state = opt.init(theta)
    with pytest.raises(DivergenceError) as info:
        for X, y in batches_:
            theta, state, _ = opt.step(theta, state, be.asarray(X), be.asarray(y))
    return info.value


@pytest.mark.parametrize("name", ["sgd", "kfac", "q-kld-wrm", "qe-kld-wrm"])
def test_deferred_checks_name_the_first_non_finite_quantity(counted, monkeypatch, name):
    """The gradient is NaN from its phase on, so are the step and the inner solve's iterates: the
    error names the gradient, at its step, whether the refresh read it early (step 4) or the
    step's end did (step 2)."""
    strict, _ = counted
    refreshes: list[int] = []
    compute = KFACEstimator.compute
    monkeypatch.setattr(KFACEstimator, "compute", lambda self, *args: refreshes.append(1) or compute(self, *args))
    for at in (2, 4):
        net = small_mlp()
        opt = optim.make(name, net, platform=None if name == "sgd" else "kfac", preset="paper", backend=strict, **({} if name == "sgd" else SETTINGS))
        refreshes.clear()
        error = _diverging(opt, opt.network, batches(net, 6), monkeypatch, at)
        assert (error.step, error.quantity) == (at, "gradient"), str(error)
        if name != "sgd":  # step 4's refresh never starts on a non-finite gradient
            assert len(refreshes) == 1, refreshes


def test_a_non_finite_gradient_stops_qes_line_search_at_once(counted, monkeypatch):
    """The theory preset's QE (Gauss-Newton with a line search): with the gradient NaN from its
    phase on and the checks deferred, the inner solve evaluates E_k once and stops, instead of
    halving its trial step 40 times per iteration; the error still names the gradient."""
    strict, _ = counted
    evaluations: list[int] = []
    value_and_gradient = WakeObjective.value_and_gradient
    monkeypatch.setattr(WakeObjective, "value_and_gradient", lambda self, theta: evaluations.append(1) or value_and_gradient(self, theta))
    net = small_mlp()
    opt = optim.make("qe-kld-wrm", net, platform="kfac", preset="theory", backend=strict, period=PERIOD, step_size=0.1, damping=0.1, inner_steps=3, m=2, inner_after_full_wake=False)
    error = _diverging(opt, opt.network, batches(net, 4), monkeypatch, 2)
    assert (error.step, error.quantity) == (2, "gradient"), str(error)
    healthy = len(evaluations)
    evaluations.clear()
    net = small_mlp()
    opt = optim.make("qe-kld-wrm", net, platform="kfac", preset="theory", backend=strict, period=PERIOD, step_size=0.1, damping=0.1, inner_steps=3, m=2, inner_after_full_wake=False)
    be = opt.network.backend
    theta = be.asarray(opt.network.init(0))
    state = opt.init(theta)
    for X, y in batches(net, 2):
        theta, state, _ = opt.step(theta, state, be.asarray(X), be.asarray(y))
    assert healthy - len(evaluations) == 1, (healthy, len(evaluations))  # the failing step's single evaluation


def test_deferred_input_checks_keep_their_messages(counted):
    strict, _ = counted
    net = small_mlp()
    opt = optim.make("kfac", net, platform="kfac", preset="paper", backend=strict, **SETTINGS)
    be = opt.network.backend
    theta = be.asarray(opt.network.init(0))
    (X, y), = batches(net, 1)
    poisoned = X.copy()
    poisoned[1, 2] = np.inf
    with pytest.raises(DivergenceError, match="diverged at step 0: batch holds a NaN or an infinity"):
        opt.step(theta, opt.init(theta), be.asarray(poisoned), be.asarray(y))
    with pytest.raises(DivergenceError, match="batch holds a NaN"):  # reported before the labels, as before deferral
        opt.step(theta, opt.init(theta), be.asarray(poisoned), be.asarray(np.array([0, 1, 2, 7, 0, 1])))
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 3\), got range \[0, 7\]"):
        opt.step(theta, opt.init(theta), be.asarray(X), be.asarray(np.array([0, 1, 2, 7, 0, 1])))
    with pytest.raises(ValueError, match="theta must be finite; it has 1 non-finite entries"):
        bad = np.asarray(small_mlp().init(0))
        bad[3] = np.nan
        opt.step(be.asarray(bad), opt.init(theta), be.asarray(X), be.asarray(y))


def test_host_arrays_reads_every_shape_in_one_transfer():
    xp = array_namespace(xps.asarray(0.0))
    values = [xp.asarray(True), xp.asarray([[1.5, 2.5], [3.5, 4.5]], dtype=xp.float32), 7, xp.asarray(-2, dtype=xp.int64)]
    with counting_transfers() as log:
        read = host_arrays(xp, *values)
    assert [direction for direction, _ in log] == ["to host"]
    assert [r.shape for r in read] == [(), (2, 2), (), ()] and all(r.dtype == np.float64 for r in read)
    np.testing.assert_array_equal(read[1], [[1.5, 2.5], [3.5, 4.5]])
    assert [float(read[0]), float(read[2]), float(read[3])] == [1.0, 7.0, -2.0]
