"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def gemm_throughput(dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matrix product (NumPy's BLAS, all cores)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)
    return 2.0 * n**3 / median_time(lambda: a @ b, repeats)


def device_gemm_throughput(dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the cuda backend's product (cuBLAS through CuPy) on n x n operands resident on
    the GPU, synchronised (n = 8 under the simulator, where it means nothing)."""
    from numba import config

    from kldwrm_ref.arrays import is_cupy_namespace
    from kldwrm_ref.backends import get_backend

    backend = get_backend("cuda")
    n = 8 if config.ENABLE_CUDASIM else n
    rng = np.random.default_rng(0)
    a, b = (backend.asarray(rng.standard_normal((n, n)).astype(dtype)) for _ in range(2))
    if is_cupy_namespace(backend.xp):
        import cupy

        wait = cupy.cuda.get_current_stream().synchronize
    else:
        wait = lambda: None  # noqa: E731

    def product() -> None:
        backend.matmul(a, b)
        wait()

    return 2.0 * n**3 / median_time(product, repeats)
