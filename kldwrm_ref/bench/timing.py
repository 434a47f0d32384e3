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
    """FLOP/s of the device's tiled product (:func:`kldwrm_ref.backends.cuda.matmul_device`) on
    n x n operands resident on the GPU (n = 8 under the simulator, where it means nothing)."""
    from numba import config, cuda

    from kldwrm_ref.backends.cuda import matmul_device

    n = 8 if config.ENABLE_CUDASIM else n
    rng = np.random.default_rng(0)
    a, b = (cuda.to_device(rng.standard_normal((n, n)).astype(dtype)) for _ in range(2))
    out = cuda.device_array((n, n), dtype=dtype)

    def product() -> None:
        matmul_device(a, b, out=out, tiled=True)
        cuda.synchronize()

    return 2.0 * n**3 / median_time(product, repeats)
