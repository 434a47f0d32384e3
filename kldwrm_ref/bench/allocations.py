"""An allocation census: every NumPy array allocation a block of code makes, counted by size.

``with counting_allocations() as census: ...`` then ``census.count`` (allocations of at least
``census.min_bytes``), ``census.total_bytes`` and ``census.largest``.  It answers what tracemalloc
cannot: tracemalloc keeps live blocks and a high-water mark, so a temporary that is allocated
and freed inside a step shows in neither; the census sees each allocation as it happens.

How: since NumPy 1.22 (NEP 49) every array's data buffer comes from a *memory handler*, a C
struct of malloc / calloc / realloc / free functions, chosen per context (a context variable), so
a handler installed here sees only the calling thread's allocations.  The census installs one
whose allocating functions are Python callbacks that record the size and then call NumPy's
default functions; its free function *is* NumPy's default free (C code), so arrays made under the
census may outlive it, down to interpreter exit.  The handler is installed through NumPy's C-API
table (``PyDataMem_SetHandler``) with ctypes, and checked by name after every installation:
where that check fails, :func:`counting_allocations` raises :class:`CensusUnavailable`.

Not counted: memory that is not an array's data (BLAS's and LAPACK's work buffers, Python
objects, array headers) and buffers Numba-compiled code allocates for itself (the project's
kernels write into arrays their NumPy wrappers allocate, so their outputs are counted).  A GPU's
arrays come from CuPy's memory pool; :func:`kldwrm_ref.bench.step.step_memory` reports the
pool's growth there instead.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Census", "CensusUnavailable", "counting_allocations"]

MIN_BYTES = 4096  # the census's default threshold: "a few kilobytes"


class CensusUnavailable(RuntimeError):
    """This NumPy does not accept the census's memory handler."""


@dataclass
class Census:
    """Allocations of at least ``min_bytes`` made in the block: how many, their bytes in all, the
    largest, and the sizes in order (``sizes``)."""

    min_bytes: int = MIN_BYTES
    sizes: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.sizes)

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    @property
    def largest(self) -> int:
        return max(self.sizes, default=0)

    def record(self, nbytes: int) -> None:
        if nbytes >= self.min_bytes:
            self.sizes.append(int(nbytes))


_active: list[Census] = []  # the open censuses, innermost last; every one records each allocation


# ----------------------------------------------------------------- NumPy's C structs (NEP 49)
_MALLOC = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)  # (ctx, size) -> ptr
_CALLOC = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t)  # (ctx, nelem, elsize) -> ptr
_REALLOC = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)  # (ctx, ptr, new_size) -> ptr


class _Allocator(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_void_p), ("malloc", ctypes.c_void_p), ("calloc", ctypes.c_void_p), ("realloc", ctypes.c_void_p), ("free", ctypes.c_void_p)]


class _Handler(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * 127), ("version", ctypes.c_uint8), ("allocator", _Allocator)]


_HANDLER_NAME = b"kldwrm_ref allocation census"
_SET_HANDLER, _GET_HANDLER = 304, 305  # PyDataMem_SetHandler / GetHandler in NumPy's C-API table (stable since 1.22)


class _Installer:
    """The census's handler, built once from NumPy's default handler and kept alive for the
    process's life (arrays allocated under it call its free function until they die)."""

    def __init__(self) -> None:
        try:
            from numpy._core import multiarray
        except ImportError:  # NumPy 1.x
            from numpy.core import multiarray  # type: ignore[no-redef]
        self.handler_name = multiarray.get_handler_name
        api = ctypes.pythonapi
        api.PyCapsule_GetPointer.restype, api.PyCapsule_GetPointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        api.PyCapsule_New.restype, api.PyCapsule_New.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        table = ctypes.cast(api.PyCapsule_GetPointer(multiarray._ARRAY_API, None), ctypes.POINTER(ctypes.c_void_p))
        self.set_handler = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)(table[_SET_HANDLER])
        default_capsule = ctypes.PYFUNCTYPE(ctypes.py_object)(table[_GET_HANDLER])()
        default = _Handler.from_address(api.PyCapsule_GetPointer(default_capsule, b"mem_handler")).allocator
        # NumPy's own functions, called without releasing the GIL the callbacks hold
        d_malloc, d_calloc, d_realloc = (ctypes.PYFUNCTYPE(*sig)(ptr) for sig, ptr in ((_MALLOC, default.malloc), (_CALLOC, default.calloc), (_REALLOC, default.realloc)))
        ctx = default.ctx

        def malloc(_, size):
            _record(size)
            return d_malloc(ctx, size)

        def calloc(_, nelem, elsize):
            _record(nelem * elsize)
            return d_calloc(ctx, nelem, elsize)

        def realloc(_, ptr, new_size):
            _record(new_size)
            return d_realloc(ctx, ptr, new_size)

        self.callbacks = [ctypes.CFUNCTYPE(*sig)(f) for sig, f in ((_MALLOC, malloc), (_CALLOC, calloc), (_REALLOC, realloc))]
        addresses = [ctypes.cast(c, ctypes.c_void_p).value for c in self.callbacks]
        self.default_capsule = default_capsule
        self.struct = _Handler(_HANDLER_NAME, 1, _Allocator(ctx, *addresses, default.free))
        self.capsule = api.PyCapsule_New(ctypes.addressof(self.struct), b"mem_handler", None)

    def install(self):
        """Install the census handler in this context; returns the handler it replaced."""
        previous = self.set_handler(self.capsule)
        if self.handler_name() != _HANDLER_NAME.decode():
            self.set_handler(previous)
            raise CensusUnavailable(f"NumPy {np.__version__} did not accept the allocation census's memory handler")
        return previous


def _record(nbytes: int) -> None:
    for census in _active:
        census.record(nbytes)


_installer: _Installer | None = None


@contextmanager
def counting_allocations(min_bytes: int = MIN_BYTES) -> Iterator[Census]:
    """Within the block, count the calling context's NumPy array allocations of at least
    ``min_bytes`` (module docstring); nests, each census counting everything inside it."""
    global _installer
    if _installer is None:
        try:
            _installer = _Installer()
        except (AttributeError, ValueError, OSError) as error:
            raise CensusUnavailable(f"NumPy {np.__version__}'s C API is not reachable for the allocation census: {error}") from error
    census = Census(int(min_bytes))
    previous = _installer.install()
    _active.append(census)
    try:
        yield census
    finally:
        _active.remove(census)
        _installer.set_handler(previous)
