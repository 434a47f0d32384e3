"""The benchmarks run and their bookkeeping is right.

Timings are asserted only through delays planted in one phase: a sleep of DELAY seconds is a
lower bound that holds on a loaded machine, and a tiny network's other phases stay far below it.
"""

import time

import numpy as np
import pytest
from devices import cuda_reason

from kldwrm_ref import MLP
from kldwrm_ref.backends import OPERATIONS
from kldwrm_ref.bench import cli as bench
from kldwrm_ref.bench import step as step_bench
from kldwrm_ref.curvature.estimators import KFACEstimator
from kldwrm_ref.optim import curvature_method

DELAY = 0.05  # seconds planted in one phase; a 6-5-3 network's own phases take well under a millisecond


def delayed(function):
    def slow(*args, **kwargs):
        time.sleep(DELAY)
        return function(*args, **kwargs)

    return slow


def test_growth_exponent_recovers_a_power_law():
    x = np.array([64, 128, 256, 512])
    assert abs(step_bench.growth_exponent(x, 3e-6 * x**2.0) - 2.0) < 1e-12


@pytest.mark.parametrize("phase, module, name", [("precondition", curvature_method, "clip_factors"), ("inverse", curvature_method, "_refreshed_inverse")])
def test_a_delay_planted_in_one_phase_shows_in_that_phase_only(phase, module, name, monkeypatch):
    """Every step sleeps DELAY inside ``phase``: its mean time is at least DELAY, and the delay is
    not counted in any other phase nor in the rest (each far below DELAY)."""
    monkeypatch.setattr(module, name, delayed(getattr(module, name)))
    result = step_bench.time_steps("kfac", "kfac", "paper", np.float64, "numpy", (6, 5, 3), 8, period=2)
    phases = result["phases_s"]
    assert phases[phase] >= DELAY and result["median_s"] >= DELAY, phases
    for other in set(phases) - {phase}:
        assert phases[other] < DELAY / 2, (other, phases)


def test_qe_inner_phase_is_timed_and_flops_grow_with_inner_steps():
    result = step_bench.time_steps("qe-kld-wrm", "kfac", "paper", np.float64, "numpy", (6, 5, 3), 8, period=2, inner_steps=1)
    assert result["phases_s"]["inner"] > 0
    mlp = MLP([6, 5, 3])
    hyper = dict(result, period=2, platform="kfac", fisher_type="empirical", bias="separate", damping_style="eigen", m=3)
    one, two = (step_bench.step_flops("qe-kld-wrm", mlp, 8, dict(hyper, inner_steps=k)) for k in (1, 2))
    forward = 2 * 8 * (6 * 5 + 5 * 3)
    assert two - one > 2 * forward  # each inner step costs at least a forward and a backward


PLANTED_BYTES = 8 * 2**20


def allocating(function):
    """``function`` after allocating and filling a PLANTED_BYTES array that is freed at once."""

    def wasteful(*args, **kwargs):
        np.ones(PLANTED_BYTES // 8).sum()
        return function(*args, **kwargs)

    return wasteful


def test_the_memory_pass_sees_an_array_planted_in_the_step_and_only_on_the_steps_that_make_it(monkeypatch):
    """A 6-5-3 step works in far less than a megabyte; an 8 MiB temporary planted in the
    preconditioning phase (every step) or in the curvature refresh (refresh steps only) shows as
    at least 8 MiB in exactly those steps' working memory."""
    clean = step_bench.step_memory("kfac", "kfac", "paper", np.float64, "numpy", (6, 5, 3), 8, period=2)
    assert clean["step_bytes"] < 2**20 and clean["refresh_step_bytes"] < 2**20 and clean["host_transfers"] == 0
    monkeypatch.setattr(KFACEstimator, "compute", allocating(KFACEstimator.compute))
    refresh_only = step_bench.step_memory("kfac", "kfac", "paper", np.float64, "numpy", (6, 5, 3), 8, period=2)
    assert refresh_only["refresh_step_bytes"] >= PLANTED_BYTES and refresh_only["step_bytes"] < 2**20
    monkeypatch.setattr(curvature_method, "clip_factors", allocating(curvature_method.clip_factors))
    every = step_bench.step_memory("kfac", "kfac", "paper", np.float64, "numpy", (6, 5, 3), 8, period=2)
    assert every["step_bytes"] >= PLANTED_BYTES
    # the allocation census of a step between refreshes: the planted array once more, and the largest
    assert clean["largest_allocation_bytes"] < 2**20 and refresh_only["largest_allocation_bytes"] < 2**20
    assert (every["allocations"], every["largest_allocation_bytes"]) == (clean["allocations"] + 1, PLANTED_BYTES)
    assert every["allocated_bytes"] == clean["allocated_bytes"] + PLANTED_BYTES


def planting_operations(function):
    """``function`` after two array operations of its own (``ones`` and ``sum``, on array-api-strict)."""
    import array_api_strict

    def busy(*args, **kwargs):
        array_api_strict.sum(array_api_strict.ones(3))
        return function(*args, **kwargs)

    return busy


def test_the_operation_pass_sees_operations_planted_in_the_step_and_only_on_the_steps_that_make_them(monkeypatch):
    """Two operations planted in the preconditioning phase (every step) or in the curvature refresh
    (refresh steps only) add exactly two to those steps' counts; the dense platform has none."""
    pytest.importorskip("array_api_strict")
    clean = step_bench.step_operations("kfac", "kfac", "paper", np.float64, (6, 5, 3), 8, period=2)
    assert 0 < clean["operations"] < clean["refresh_operations"], clean
    monkeypatch.setattr(KFACEstimator, "compute", planting_operations(KFACEstimator.compute))
    refresh_only = step_bench.step_operations("kfac", "kfac", "paper", np.float64, (6, 5, 3), 8, period=2)
    assert refresh_only == dict(operations=clean["operations"], refresh_operations=clean["refresh_operations"] + 2)
    monkeypatch.setattr(curvature_method, "clip_factors", planting_operations(curvature_method.clip_factors))
    every = step_bench.step_operations("kfac", "kfac", "paper", np.float64, (6, 5, 3), 8, period=2)
    assert every == dict(operations=clean["operations"] + 2, refresh_operations=clean["refresh_operations"] + 4)
    assert step_bench.step_operations("ea-cm", "dense", "paper", np.float64, (6, 5, 3), 8) == dict(operations=None, refresh_operations=None)


@pytest.mark.parametrize(("name", "architecture", "bound"), [("kfac", (784, 256, 10), 80), ("kfac", "paper-cnn", 128), ("q-kld-wrm", "paper-cnn", 162)])
def test_a_step_between_refreshes_issues_few_operations(name, architecture, bound):
    """Dispatch bounds a GPU step (docs/performance.md, "Operations per step"): a K-FAC step between
    refreshes issues 77 array operations on 784-256-10 and 124 on the paper CNN (81 and 132 when the
    bias blocks' 1 x 1 eigenbases were still applied), a Q step 158 on the paper CNN (179 when the
    RMS clip took four operations per tensor)."""
    pytest.importorskip("array_api_strict")
    counts = step_bench.step_operations(name, "kfac", "paper", np.float32, architecture, 512, period=4)  # Q rebuilds its inverse on the step after a refresh: period 4 leaves two typical steps in three
    assert counts["operations"] <= bound, counts


def test_a_paper_cnn_step_never_holds_a_batch_of_patches():
    """Memory discipline at the paper's sizes (batch 512, float32, default backend): a step between
    refreshes works in under 20 MiB and a refresh step in under 40 MiB, though conv1's patches
    alone would be 29.5 MB and conv2's 16.4 MB (they are recomputed per chunk, model/conv.py).
    The step's own activations and cotangents (conv1's output and its cotangent are 5.9 MB each)
    are what remains.  The allocation census: no array above conv1's output (5.9 MB), and since
    conv1 and conv2's gradients need no patches (generated kernels) and conv2's chunks reuse one
    buffer of patches and one of patch cotangents, under 30 MiB allocated in all (25.9 MiB; 33.7
    MiB with conv1's chunked patches, 134 MiB when each chunk had its own) in under 70 arrays of
    4 KiB or more (53; 78 and 135 then)."""
    memory = step_bench.step_memory("kfac", "kfac", "paper", np.float32, "auto", "paper-cnn", 512, period=2)
    assert memory["step_bytes"] < 20 * 2**20 and memory["refresh_step_bytes"] < 40 * 2**20, memory
    assert memory["largest_allocation_bytes"] <= 512 * 5 * 24 * 24 * 4 and memory["allocated_bytes"] < 30 * 2**20 and memory["allocations"] < 70, memory


def test_kernel_bench_times_every_operation_on_each_cpu_backend(capsys):
    assert bench.main(["kernels", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for op in OPERATIONS:
        assert f"\n{op} " in out
    assert "numba/numpy" in out


def test_step_bench_times_the_paper_cnn(capsys):
    """``kldwrm bench step --architectures paper-cnn`` (the phases of CNN steps; FLOPs are not counted)."""
    result = step_bench.time_steps("kfac", "kfac", "paper", np.float32, "numpy", "paper-cnn", 16, period=2)
    assert result["architecture"] == "paper-cnn" and result["median_s"] > 0 and np.isnan(result["flops"])
    assert result["phases_s"]["forward_backward"] > 0 and result["phases_s"]["curvature"] > 0
    print(step_bench.format_breakdown([result], {"float32": 1e11}))
    assert "paper-cnn" in capsys.readouterr().out


def test_step_bench_separates_refresh_steps_from_the_others(monkeypatch):
    """With period 3 over the 10 timed steps (k = 3..12, refreshes at k = 3, 6, 9, 12), a delay
    planted in the factor statistics of refresh steps shows in the refresh step and its curvature
    phase, in a third or more of the mean curvature phase, and not in the other steps."""
    monkeypatch.setattr(KFACEstimator, "compute", delayed(KFACEstimator.compute))
    result = step_bench.time_steps("kfac", "kfac", "theory", np.float64, "numpy", (6, 5, 3), 8, period=3)
    assert result["period"] == 3
    assert result["refresh_s"] >= DELAY and result["refresh_phases_s"]["curvature"] >= DELAY
    assert result["phases_s"]["curvature"] >= DELAY * 4 / 10
    assert result["median_non_refresh_s"] < DELAY / 2


@pytest.mark.skipif(cuda_reason() is not None, reason=f"neither the CUDA simulator nor a GPU: {cuda_reason()}")
def test_step_bench_times_the_cuda_backend(capsys):
    """``kldwrm bench step --backends cuda`` times the step with every array on the device (simulator here: the
    numbers mean nothing, the bookkeeping is what is checked) against the device's GEMM rate."""
    from kldwrm_ref.bench.timing import device_gemm_throughput

    result = step_bench.time_steps("q-kld-wrm", "kfac", "paper", np.float64, "cuda", (4, 3, 3), 4, period=2)
    assert result["backend"] == "cuda" and result["refresh_s"] > 0 and result["median_non_refresh_s"] > 0
    assert result["phases_s"]["inverse"] > 0
    peak = device_gemm_throughput(np.float64, repeats=1)
    print(step_bench.format_breakdown([result], {"cuda-float64": peak}))
    assert "cuda" in capsys.readouterr().out


def test_the_dense_ea_cm_row_runs_once_whatever_the_architectures(monkeypatch):
    """EA-CM on the dense platform always times a 49-32-10 MLP, so a breakdown over two
    architectures runs it once and every K-FAC-platform optimiser once per architecture."""
    calls = []
    monkeypatch.setattr(step_bench, "time_steps", lambda name, platform, preset, dtype, backend, arch, batch, **_: calls.append((name, platform, arch)) or {})
    monkeypatch.setattr(step_bench, "step_memory", lambda *args, **kwargs: {})
    monkeypatch.setattr(step_bench, "step_operations", lambda *args, **kwargs: {})
    step_bench.breakdown(["paper"], [np.float32], ["numpy"], [(6, 5, 3), (4, 3, 2)])
    assert [c for c in calls if c[1] == "dense"] == [("ea-cm", "dense", (49, 32, 10))]
    assert sorted(c for c in calls if c[1] == "kfac") == sorted((name, "kfac", arch) for arch in ((6, 5, 3), (4, 3, 2)) for name, platform in step_bench.BREAKDOWN_OPTIMIZERS if platform == "kfac")


def test_the_operation_pass_runs_once_per_optimiser_and_can_be_skipped(monkeypatch):
    """The counts do not depend on the backend: two backends share one operation pass per
    optimiser, and ``count_operations=False`` (``--no-operations``) runs none."""
    passes = []
    monkeypatch.setattr(step_bench, "time_steps", lambda *args, **kwargs: {})
    monkeypatch.setattr(step_bench, "step_memory", lambda *args, **kwargs: {})
    monkeypatch.setattr(step_bench, "step_operations", lambda name, platform, *args, **kwargs: passes.append((name, platform)) or {"operations": 1})
    rows = step_bench.breakdown(["paper"], [np.float32], ["numpy", "numba"], [(6, 5, 3)])
    assert sorted(passes) == sorted(step_bench.BREAKDOWN_OPTIMIZERS) and all(row["operations"] == 1 for row in rows) and len(rows) == 2 * len(passes)
    passes.clear()
    rows = step_bench.breakdown(["paper"], [np.float32], ["numpy"], [(6, 5, 3)], count_operations=False)
    assert passes == [] and all("operations" not in row for row in rows)
