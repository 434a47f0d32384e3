"""What ``backend="cuda"`` needs, checked once at first use, each missing piece named in one line.

The GPU backend needs numba-cuda importable beside the installed NumPy (numba-cuda 0.30 fails
with NumPy 2.5), CuPy (the optional ``gpu`` extra) and a CUDA device.  Under
``NUMBA_ENABLE_CUDASIM=1`` (tests) only the first is needed: the kernels run on NumPy arrays.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version


class GPUUnavailableError(RuntimeError):
    """``backend="cuda"`` cannot run here; the message says what is missing or which versions clash."""


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "(not installed)"


def require_gpu_stack() -> None:
    """Raise :class:`GPUUnavailableError` unless numba-cuda imports, and (outside the simulator)
    CuPy imports and sees a CUDA device."""
    try:
        numba_cuda = import_module("numba.cuda")
        config = import_module("numba.core.config")
    except Exception as error:
        raise GPUUnavailableError(
            f"backend 'cuda': numba-cuda {_version('numba-cuda')} cannot be imported beside numpy {_version('numpy')} "
            f"({type(error).__name__}: {error}); install a numpy it supports, e.g. pip install 'numpy<2.5'"
        ) from None
    if config.ENABLE_CUDASIM:
        return
    try:
        cupy = import_module("cupy")
    except Exception as error:
        raise GPUUnavailableError(
            f"backend 'cuda' needs CuPy ({type(error).__name__}: {error}): pip install -e '.[gpu]' "
            "(cupy-cuda12x; with a CUDA 13 driver install cupy-cuda13x instead)"
        ) from None
    try:
        devices = int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        devices = 0
    if devices == 0 or not numba_cuda.is_available():
        raise GPUUnavailableError(
            "backend 'cuda' needs an NVIDIA GPU with a working CUDA driver, and none was found "
            "(NUMBA_ENABLE_CUDASIM=1 runs the kernels on numba's simulator, for tests)"
        )
