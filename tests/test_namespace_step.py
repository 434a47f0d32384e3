"""The optimiser step is namespace-clean: run on array-api-strict arrays, it equals NumPy.

array-api-strict implements the array API standard and nothing else (no ``.sum()`` method, no
mixing of float32 with float64, no fancy indexing across axes, ...).  Every optimiser steps an MLP
and a small CNN with theta, the batches and the whole state as strict arrays; the kernels come
from :func:`~kldwrm_ref.backends.host_hop_backend` (the NumPy twins through a host copy: kernels
are per device by design), so anything NumPy-only left in the model, the curvature engine or
the step fails here.  Settings force every branch of the paper preset: refreshes every 2 steps,
the kl and RMS clips, QE's inner solve from the first step.
"""

from __future__ import annotations

import numpy as np
import pytest

from kldwrm_ref import optim
from kldwrm_ref.arrays import array_namespace, to_numpy
from kldwrm_ref.backends import host_hop_backend
from kldwrm_ref.model import MLP, Network
from kldwrm_ref.model.conv import Conv2d, Dropout, Flatten, MaxPool2d
from kldwrm_ref.model.layers import Dense, ReLU

xps = pytest.importorskip("array_api_strict")
STRICT = host_hop_backend(array_namespace(xps.asarray(0.0)))
STEPS = 5
FORCED = dict(period=2, step_size=0.05, kl_clip=1e-3, rms_clip=0.05, m=2, inner_steps=2, inner_after_full_wake=False)


def small_cnn() -> Network:
    layers = [Conv2d(1, 2, 3, kfac_scaling="authors"), MaxPool2d(2), ReLU(), Flatten(), Dense(8, 4, init="torch"), ReLU(), Dropout(0.5), Dense(4, 3, init="torch")]
    return Network(layers, (1, 6, 6), np.float64)


def small_mlp() -> Network:
    return MLP([5, 4, 3], activation="tanh", dtype=np.float64)


def trajectory(net: Network, name: str, backend, preset: str, overrides: dict) -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    batches = [(rng.standard_normal((6, *net.input_shape)), rng.integers(0, net.n_classes, 6)) for _ in range(STEPS)]
    platform = None if name == "sgd" else "kfac"
    opt = optim.make(name, net, platform=platform, preset=preset, backend=backend, **({} if name == "sgd" else overrides))
    be = opt.network.backend
    theta = opt.network.init(0)
    state = opt.init(theta)
    thetas = []
    for X, y in batches:
        theta, state, _ = opt.step(theta, state, be.asarray(X), be.asarray(y))
        thetas.append(to_numpy(theta))
    assert (type(theta).__module__.split(".")[0] == "array_api_strict") == (backend is STRICT)
    return thetas


CASES = [(name, "paper", FORCED) for name in ("kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm", "sgd")]
CASES += [  # the theory preset's branches: exact Kronecker sum and correction, MC Fisher, joint bias, proximal term
    ("ea-cm", "theory", dict(period=2, step_size=0.1, damping=0.1, bias="joint")),
    ("q-kld-wrm", "theory", dict(period=2, step_size=0.1, damping=0.1, fisher_type="mc", samples=2, kl_clip=1e-3, rms_clip=0.05)),
    ("qe-kld-wrm", "theory", dict(period=2, step_size=0.1, damping=0.1, inner_steps=2, m=2, inner_after_full_wake=False)),
]


@pytest.mark.parametrize("make_net", [small_mlp, small_cnn])
@pytest.mark.parametrize(("name", "preset", "overrides"), CASES)
def test_strict_namespace_trajectory_equals_numpy(make_net, name, preset, overrides):
    want = trajectory(make_net(), name, "numpy", preset, overrides)
    got = trajectory(make_net(), name, STRICT, preset, overrides)
    for k, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13, err_msg=f"{name} {preset} step {k}")


def test_the_dense_platform_refuses_another_namespace_when_made():
    with pytest.raises(ValueError, match="platform 'dense' runs on the host with NumPy arrays only"):
        optim.make("so-kld-wrm", small_mlp(), platform="dense", backend=STRICT)
