"""Where the cuda backend's tests can run: on numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, the
default conftest sets) or on a GPU with CuPy (NUMBA_ENABLE_CUDASIM=0); anywhere else they skip
with the probe's reason (experiments/gpu-check.sh runs them on a GPU)."""

from __future__ import annotations

import os

import pytest

from kldwrm_ref.backends import GPUUnavailableError, probe


def simulated() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "1") != "0"


def gpu_reason() -> str | None:
    """Why the hardware tests cannot run here (None when they can)."""
    if simulated():
        return "NUMBA_ENABLE_CUDASIM is not 0 (run with NUMBA_ENABLE_CUDASIM=0 on a machine with a GPU)"
    try:
        probe.require_gpu_stack()
    except GPUUnavailableError as error:
        return str(error)
    return None


def cuda_reason() -> str | None:
    """Why backend "cuda" cannot run here, on the simulator or a GPU (None when it can)."""
    return None if simulated() else gpu_reason()


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(cuda_reason() is not None, reason=f"neither the CUDA simulator nor a GPU: {cuda_reason()}"))
