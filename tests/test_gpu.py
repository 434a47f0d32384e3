"""backend="cuda": one engine, every array on the GPU (docs/gpu.md).

On this machine and in CI there is no GPU: conftest sets NUMBA_ENABLE_CUDASIM=1, so the cuda
backend's kernels run on numba's simulator over NumPy arrays.  The kernels against their NumPy
twins, and whole optimiser steps through the cuda backend against NumPy, are in
tests/test_backend.py; here:

- the GPU probe names each missing piece in one line (no CuPy, no device, a numba-cuda that does
  not import beside the installed NumPy), and the ``kldwrm`` command prints that line, exit 2;
- ``kldwrm mnist --backend cuda`` end to end on the simulator gives the NumPy run's metrics;
- on hardware (CuPy and a GPU present, ``NUMBA_ENABLE_CUDASIM=0``; skipped otherwise): K-FAC, SO,
  Q and QE on an MLP and a small CNN equal NumPy to 1e-10 in float64 over steps that cross a
  refresh, with theta and the state as CuPy arrays, and a step between refreshes copies no array
  larger than a few scalars (a CNN's dropout masks aside) to or from the host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from devices import cuda_reason, gpu_reason, simulated

from kldwrm_ref import optim
from kldwrm_ref.arrays import counting_transfers, to_numpy
from kldwrm_ref.backends import GPUUnavailableError, probe
from kldwrm_ref.model import MLP, Network
from kldwrm_ref.model.conv import Conv2d, Dropout, Flatten, MaxPool2d
from kldwrm_ref.model.layers import Dense, ReLU

SCALAR_BYTES = 8 * 32  # "a few scalars": no copy of a non-refresh step may be larger (the dropout masks aside)


hardware = pytest.mark.skipif(gpu_reason() is not None, reason=f"no GPU: {gpu_reason()}")


# ------------------------------------------------------------------------------ the probe
def _fake_imports(monkeypatch, **modules):
    """probe.import_module returning ``modules[name]`` (an exception instance is raised)."""
    real = probe.import_module

    def fake(name):
        if name in modules:
            if isinstance(modules[name], Exception):
                raise modules[name]
            return modules[name]
        return real(name)

    monkeypatch.setattr(probe, "import_module", fake)


def test_a_numba_cuda_that_does_not_import_is_named_with_both_versions(monkeypatch):
    _fake_imports(monkeypatch, **{"numba.cuda": AttributeError("module 'numpy' has no attribute 'row_stack'")})
    with pytest.raises(GPUUnavailableError) as error:
        probe.require_gpu_stack()
    message = str(error.value)
    assert "numba-cuda" in message and f"numpy {np.__version__}" in message and "row_stack" in message and "numpy<2.5" in message
    assert "\n" not in message


def test_missing_cupy_is_named_with_the_install_command(monkeypatch):
    _fake_imports(monkeypatch, **{"numba.core.config": types.SimpleNamespace(ENABLE_CUDASIM=False), "cupy": ImportError("No module named 'cupy'")})
    with pytest.raises(GPUUnavailableError, match=r"needs CuPy .*pip install -e '\.\[gpu\]'.*cupy-cuda13x"):
        probe.require_gpu_stack()


@pytest.mark.parametrize("devices", [0, RuntimeError("cudaErrorInsufficientDriver")])
def test_no_device_is_named(monkeypatch, devices):
    def count():
        if isinstance(devices, Exception):
            raise devices
        return devices

    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=count)))
    _fake_imports(monkeypatch, **{"numba.core.config": types.SimpleNamespace(ENABLE_CUDASIM=False), "cupy": fake_cupy})
    with pytest.raises(GPUUnavailableError, match="needs an NVIDIA GPU with a working CUDA driver, and none was found"):
        probe.require_gpu_stack()


@pytest.mark.skipif(not simulated(), reason="a check of the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")
def test_the_simulator_needs_no_cupy(monkeypatch):
    _fake_imports(monkeypatch, cupy=ImportError("No module named 'cupy'"))
    probe.require_gpu_stack()  # conftest runs the simulator: numba-cuda is enough


COMMANDS_ON_CUDA = [
    ["bench", "step", "--backends", "cuda", "--presets", "paper", "--dtypes", "float32", "--json", "out"],
    ["mnist", "--synthetic", "--epochs", "1", "--optimizers", "kfac", "--seeds", "0", "--backend", "cuda", "--out", "out"],
]


@pytest.mark.parametrize("command", COMMANDS_ON_CUDA)
def test_the_command_says_what_is_missing_in_one_line(tmp_path, command):
    """Outside the simulator, on a machine without CuPy or a GPU: one line on stderr, exit 2, no traceback."""
    pytest.importorskip("numba.cuda")
    if gpu_reason() is None:
        pytest.skip("a GPU is present: nothing is missing")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    result = subprocess.run([sys.executable, "-m", "kldwrm_ref.cli", *command], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"kldwrm {command[0]}: error: backend 'cuda'"), lines[0]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- end to end (simulator or GPU)
@pytest.mark.skipif(cuda_reason() is not None, reason=f"neither the CUDA simulator nor a GPU: {cuda_reason()}")
def test_mnist_command_with_backend_cuda_matches_numpy(tmp_path):
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
        assert len(rows) == len(host_rows) > 1
        for got, want in zip(rows[1:], host_rows[1:]):
            for field, a, b in zip(header, got.split(","), want.split(",")):
                if field in ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "batch_loss"):
                    assert float(a) == pytest.approx(float(b), rel=1e-9, abs=1e-12), (opt, field)


# ------------------------------------------------------------------------------ hardware
def tiny_cnn() -> Network:
    """The paper CNN's layer sequence at toy size: conv, pool, ReLU, flatten, dense, ReLU, dropout, dense."""
    layers = [Conv2d(1, 2, 3, kfac_scaling="authors"), MaxPool2d(2), ReLU(), Flatten(), Dense(8, 3, init="torch"), ReLU(), Dropout(0.5), Dense(3, 3, init="torch")]
    return Network(layers, (1, 6, 6), np.float64)


def tiny_mlp() -> Network:
    return MLP([4, 3, 3], dtype=np.float64)


@hardware
@pytest.mark.parametrize("make_net", [tiny_mlp, tiny_cnn])
@pytest.mark.parametrize("name", ["kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm"])
def test_device_resident_trajectory_equals_numpy_and_copies_only_scalars(make_net, name):
    net = make_net()
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((8, *net.input_shape)), rng.integers(0, net.n_classes, 8)
    settings = dict(period=3, step_size=0.05, kl_clip=1e-3, rms_clip=0.05, inner_steps=3)
    host_opt = optim.make(name, net, platform="kfac", preset="paper", backend="numpy", **settings)
    gpu_opt = optim.make(name, net, platform="kfac", preset="paper", backend="cuda", **settings)
    backend = gpu_opt.network.backend
    theta = net.init(0)
    state = host_opt.init(theta)
    g_theta = backend.asarray(theta)
    g_state = gpu_opt.init(g_theta)
    g_X, g_y = backend.asarray(X), backend.asarray(y)
    dropout_bytes = {8 * int(np.prod(net.shapes[i])) * 8 for i, layer in enumerate(net.layers) if isinstance(layer, Dropout)}
    for k in range(7):  # refreshes at 0, 3, 6; QE's inner solve once its wake is full
        theta, state, info = host_opt.step(theta, state, X, y)
        with counting_transfers() as copies:
            g_theta, g_state, g_info = gpu_opt.step(g_theta, g_state, g_X, g_y)
        assert type(g_theta).__module__.startswith("cupy")
        np.testing.assert_allclose(to_numpy(g_theta), theta, rtol=1e-10, atol=1e-10, err_msg=f"step {k}")
        assert g_info["loss"] == pytest.approx(info["loss"], rel=1e-10)
        if not info["refreshed"]:
            large = [c for c in copies if c[1] > SCALAR_BYTES and c[1] not in dropout_bytes]
            assert large == [], f"step {k} (no refresh) copied {large}"
            reads = [c for c in copies if c[0] == "to host"]
            assert len(reads) == 2, f"step {k} (no refresh) read the device {len(reads)} times: {reads}"  # docs/gpu.md
