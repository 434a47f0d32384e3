"""A float32 run stays float32: theta, every array of the optimiser state and of the step's trace
keep the network's dtype across refreshes, for every optimiser, platform and preset (a float64
constant meeting float32 factors would otherwise promote the whole run to float64 silently)."""

import numpy as np
import pytest

from kldwrm_ref import MLP, optim
from kldwrm_ref.model import Network
from kldwrm_ref.model.conv import Conv2d, Flatten, MaxPool2d
from kldwrm_ref.model.layers import Dense, ReLU

CASES = [(name, "kfac") for name in ("sgd", "kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm")] + [(name, "dense") for name in ("ea-cm", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm")]


def floating_arrays(value, path="state", seen=None):
    """(path, array) for every floating-point NumPy array reachable through tuples, lists, dicts,
    NamedTuples and the curvature engine's objects (inverses, operators, their eigenpairs)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating):
            yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from floating_arrays(item, f"{path}[{key!r}]", seen)
    elif isinstance(value, tuple | list):
        names = getattr(value, "_fields", range(len(value)))
        for name, item in zip(names, value):
            yield from floating_arrays(item, f"{path}.{name}", seen)
    elif type(value).__module__.startswith("kldwrm_ref.curvature"):
        for name, item in vars(value).items():
            if name not in ("backend", "xp", "net"):
                yield from floating_arrays(item, f"{path}.{name}", seen)


def small_cnn() -> Network:
    return Network([Conv2d(1, 2, 3, kfac_scaling="authors"), MaxPool2d(2), ReLU(), Flatten(), Dense(8, 4, init="torch")], (1, 6, 6), np.float32)


@pytest.mark.parametrize("preset", ["theory", "paper"])
@pytest.mark.parametrize(("name", "platform"), CASES)
@pytest.mark.parametrize("make_net", [lambda: MLP([6, 5, 4], dtype=np.float32), small_cnn], ids=["mlp", "cnn"])
def test_a_float32_run_stays_float32(make_net, name, platform, preset):
    net = make_net()
    overrides = {} if name == "sgd" else {"period": 2}
    if name == "qe-kld-wrm":
        overrides.update(inner_after_full_wake=False, inner_steps=2)
    opt = optim.make(name, net, platform=platform if name != "sgd" else None, preset=preset, **overrides)
    rng = np.random.default_rng(0)
    theta = opt.network.init(0)
    state = opt.init(theta)
    for _ in range(5):  # refreshes at steps 0, 2 and 4; Q and QE rebuild their inverse on the steps between
        X, y = rng.standard_normal((8, *net.input_shape)).astype(np.float32), rng.integers(0, 4, 8)
        theta, state, info = opt.step(theta, state, X, y)
        wrong = [(path, a.dtype) for path, a in [("theta", theta), *floating_arrays(state), *floating_arrays(info.get("trace"), "trace")] if a.dtype != np.float32]
        assert not wrong, wrong
