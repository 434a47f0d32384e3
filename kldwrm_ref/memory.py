"""Memory an optimiser step reuses across steps: a NumPy memory handler (NEP 49) scoped to the step.

Why: a paper-CNN step allocates and frees some 34 MiB of temporaries (conv1's output and its
cotangent are 5.9 MB each).  In a loop of steps alone glibc serves them from what the previous
step freed, but when other code in the process allocates and frees multi-megabyte arrays
between steps, glibc hands the step's memory back to the kernel and each step page-faults it in
again: about 10% of a CNN step (docs/performance.md, "Allocation is not a cost on the CPU").

What: while :func:`reusing_memory` is open in a context (``Optimizer.step`` opens it), NumPy
allocates that context's array data through this module's handler.  Blocks of at least
:data:`MIN_BYTES` are taken from, and when freed given back to, a cache of at most
:data:`CACHE_BYTES` holding blocks freed earlier (a cached block serves a request at most a
quarter plus a page smaller than it); smaller blocks, and every block the full cache cannot
take, go to NumPy's own functions.  No memory is shared: a block is reused only after NumPy has
freed the array that held it, so a step stays a pure function.  Arrays made inside outlive the
block as any array does; when they are freed (anywhere, in any thread) their blocks come back
to the cache.  :func:`release_cached_memory` empties it.

How: NEP 49 lets a handler (a C struct of malloc / calloc / realloc / free and a context pointer)
serve one context variable's allocations.  Its functions here are compiled C (Numba ``cfunc``s):
each block carries a 64-byte header (a magic word, its capacity, the bytes NumPy's malloc gave),
and the cache is a table of :data:`SLOTS` (capacity, address) pairs in C memory.  The table
changes only while the calling thread holds the GIL (each call checks), which serialises every
change; a call without the GIL bypasses the cache.  Where another handler is current (the
allocation census of :mod:`kldwrm_ref.bench.allocations`, a user's own), :func:`reusing_memory`
leaves it in place; where NumPy's C API is out of reach, or on a free-threaded Python, it does
nothing.  The NEP 49 plumbing (:func:`numpy_handlers`) is shared with the census.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np

__all__ = ["CACHE_BYTES", "MIN_BYTES", "SLOTS", "CacheStats", "cache_stats", "numpy_handlers", "release_cached_memory", "reuses_memory", "reusing_memory"]

MIN_BYTES = 64 * 1024  # blocks this large or larger are cached
CACHE_BYTES = 256 * 2**20  # the most the cache holds
SLOTS = 256  # the most blocks it holds
HANDLER_NAME = "kldwrm_ref step memory"
_HEADER = 64  # bytes before each block's data (keeps malloc's 16-byte alignment)
_MAGIC = 0x6B6C6477726D6D65
_GRAIN, _PAGE = 64 * 1024, 4096  # capacities are rounded to pages, above 1 MiB to 64 KiB
# the cache's record, int64 words: settings, counters, then SLOTS (capacity, address) pairs
_MIN, _LIMIT, _CACHED, _HITS, _MISSES, _SLOT0 = 0, 1, 2, 3, 4, 8
_RECORD = _SLOT0 + 2 * SLOTS
_SET_HANDLER, _DEFAULT_HANDLER = 304, 306  # NumPy's C-API table: PyDataMem_SetHandler, &PyDataMem_DefaultHandler (since 1.22)


class CacheStats(NamedTuple):
    """The cache's state: bytes and blocks held, and requests of at least MIN_BYTES it served
    (hits) or passed to NumPy's malloc (misses) since the process began."""

    cached_bytes: int
    blocks: int
    hits: int
    misses: int


# ----------------------------------------------------------------- NumPy's C structs (NEP 49)
class Allocator(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_void_p), ("malloc", ctypes.c_void_p), ("calloc", ctypes.c_void_p), ("realloc", ctypes.c_void_p), ("free", ctypes.c_void_p)]


class Handler(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * 127), ("version", ctypes.c_uint8), ("allocator", Allocator)]


class NumpyHandlers:
    """NumPy's memory-handler C API, reached once per process: ``set_handler(capsule)`` (returns
    the previous capsule), ``handler_name()``, NumPy's ``default`` allocator struct, ``capsule(address)``
    (a capsule naming a :class:`Handler` in C memory), and ``api`` / ``libc``."""

    def __init__(self) -> None:
        try:
            from numpy._core import multiarray
        except ImportError:  # NumPy 1.x
            from numpy.core import multiarray  # type: ignore[no-redef]
        self.handler_name = multiarray.get_handler_name
        self.api, self.libc = ctypes.pythonapi, ctypes.CDLL(None)
        api, libc = self.api, self.libc
        api.PyCapsule_GetPointer.restype, api.PyCapsule_GetPointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        api.PyCapsule_New.restype, api.PyCapsule_New.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        libc.calloc.restype, libc.calloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]
        table = ctypes.cast(api.PyCapsule_GetPointer(multiarray._ARRAY_API, None), ctypes.POINTER(ctypes.c_void_p))
        self.set_handler = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)(table[_SET_HANDLER])
        default_capsule = ctypes.cast(table[_DEFAULT_HANDLER], ctypes.POINTER(ctypes.py_object)).contents.value
        default = Handler.from_address(api.PyCapsule_GetPointer(default_capsule, b"mem_handler"))
        self.default, self.default_name = default.allocator, default.name.decode()
        self._name = libc.calloc(len(b"mem_handler") + 1, 1)  # the capsules' name, which NumPy checks on every use
        if not self._name:
            raise MemoryError("no memory for a memory handler's name")
        ctypes.memmove(self._name, b"mem_handler", len(b"mem_handler"))

    def capsule(self, handler: int) -> Any:
        return self.api.PyCapsule_New(handler, ctypes.cast(self._name, ctypes.c_char_p), None)


_handlers: NumpyHandlers | None = None
_lock = threading.Lock()


def numpy_handlers() -> NumpyHandlers:
    """The process's :class:`NumpyHandlers` (built on first use; raises where NumPy's C API differs)."""
    global _handlers
    with _lock:
        if _handlers is None:
            _handlers = NumpyHandlers()
        return _handlers


# ----------------------------------------------------------------- the cache
class _Cache:
    """The compiled functions, the record and the handler's capsule (C memory, never freed)."""

    def __init__(self, handlers: NumpyHandlers) -> None:
        from numba import carray, cfunc, njit, types

        libc, default = handlers.libc, handlers.default
        ctx, size_t = default.ctx or 0, ctypes.c_size_t
        d_malloc = ctypes.CFUNCTYPE(size_t, size_t, size_t)(default.malloc)
        d_free = ctypes.CFUNCTYPE(None, size_t, size_t, size_t)(default.free)

        def address(function: Any) -> int:
            return int(ctypes.cast(function, ctypes.c_void_p).value or 0)

        words_at = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_int64), size_t, size_t, size_t)(address(libc.memmove))  # memmove(p, p, 0) returns p, typed
        memset = ctypes.CFUNCTYPE(size_t, size_t, ctypes.c_int, size_t)(address(libc.memset))
        memcpy = ctypes.CFUNCTYPE(size_t, size_t, size_t, size_t)(address(libc.memcpy))
        gil_held = ctypes.CFUNCTYPE(ctypes.c_int)(address(handlers.api.PyGILState_Check))

        @njit
        def take(words, size):
            """Data of at least ``size`` bytes after a header: a cached block, or a new one."""
            big = size >= words[_MIN]
            if big and gil_held() == 1:
                best, best_capacity = -1, 0
                for i in range(SLOTS):
                    capacity = words[_SLOT0 + 2 * i]
                    if capacity >= size and capacity - size <= size // 4 + _PAGE and (best < 0 or capacity < best_capacity):
                        best, best_capacity = i, capacity
                if best >= 0:
                    data = words[_SLOT0 + 2 * best + 1]
                    words[_SLOT0 + 2 * best] = 0
                    words[_SLOT0 + 2 * best + 1] = 0
                    words[_CACHED] -= best_capacity
                    words[_HITS] += 1
                    return data
                words[_MISSES] += 1
            grain = _GRAIN if size >= 16 * _GRAIN else _PAGE
            capacity = (size + grain - 1) // grain * grain if big else size
            base = d_malloc(ctx, capacity + _HEADER)
            if base == 0:
                return 0
            header = carray(words_at(base, base, 0), 3)
            header[0], header[1], header[2] = _MAGIC, capacity, capacity + _HEADER
            return base + _HEADER

        @njit
        def give(words, data):
            """Return a block: to the cache when it is large, the GIL held and there is room."""
            header = carray(words_at(data - _HEADER, data - _HEADER, 0), 3)
            capacity = header[1]
            if capacity >= words[_MIN] and gil_held() == 1 and words[_CACHED] + capacity <= words[_LIMIT]:
                for i in range(SLOTS):
                    if words[_SLOT0 + 2 * i] == 0:
                        words[_SLOT0 + 2 * i] = capacity
                        words[_SLOT0 + 2 * i + 1] = data
                        words[_CACHED] += capacity
                        return
            header[0] = 0
            d_free(ctx, data - _HEADER, header[2])

        record, uintp = types.CPointer(types.int64), types.uintp

        @cfunc(uintp(record, uintp), nopython=True)
        def cache_malloc(words, size):
            return take(words, size)

        @cfunc(uintp(record, uintp, uintp), nopython=True)
        def cache_calloc(words, count, item):
            if item != 0 and count > (1 << 62) // item:
                return 0
            data = take(words, count * item)
            if data != 0:
                memset(data, 0, count * item)
            return data

        @cfunc(uintp(record, uintp, uintp), nopython=True)
        def cache_realloc(words, data, size):
            if data == 0:
                return take(words, size)
            capacity = carray(words_at(data - _HEADER, data - _HEADER, 0), 3)[1]
            if size <= capacity and (capacity < words[_MIN] or size >= capacity // 2):
                return data
            moved = take(words, size)
            if moved != 0:
                memcpy(moved, data, min(capacity, size))
                give(words, data)
            return moved

        @cfunc(types.void(record, uintp, uintp), nopython=True)
        def cache_free(words, data, size):
            if data != 0:
                give(words, data)

        self.compiled = (cache_malloc, cache_calloc, cache_realloc, cache_free)  # kept for the process's life
        self.record = libc.calloc(_RECORD, 8)
        self.handler = libc.calloc(1, ctypes.sizeof(Handler))
        if not (self.record and self.handler):
            raise MemoryError("no memory for the step's memory handler")
        self.words = (ctypes.c_int64 * _RECORD).from_address(self.record)
        self.words[_MIN], self.words[_LIMIT] = MIN_BYTES, CACHE_BYTES
        struct = Handler.from_address(self.handler)
        struct.name, struct.version = HANDLER_NAME.encode(), 1
        struct.allocator = Allocator(self.record, *(f.address for f in self.compiled))
        self.capsule = handlers.capsule(self.handler)
        self.free_block = d_free
        self.ctx = ctx


_cache: _Cache | None = None
_unavailable = False


def _get_cache() -> _Cache | None:
    """The cache, built on first use; None where it cannot run here (module docstring)."""
    global _cache, _unavailable
    if _cache is None and not _unavailable:
        if not getattr(sys, "_is_gil_enabled", lambda: True)():
            _unavailable = True
            return None
        try:
            handlers = numpy_handlers()
            cache = _Cache(handlers)
        except Exception:  # NumPy's C API or Numba's cfuncs out of reach: steps run without the cache
            _unavailable = True
            return None
        with _lock:
            if _cache is None:
                _cache = cache
                ctypes.pythonapi.Py_IncRef(ctypes.py_object(cache))  # never freed, not even at exit: arrays may outlive the module
    return _cache


@contextmanager
def reusing_memory() -> Iterator[bool]:
    """Within the block, the calling context's NumPy arrays take their memory from the cache
    (module docstring).  Yields whether the cache is in use: False where another handler than
    NumPy's default is current, or where the cache cannot run."""
    cache = _get_cache()
    handlers = _handlers
    if cache is None or handlers is None or handlers.handler_name() != handlers.default_name:
        yield False
        return
    previous = handlers.set_handler(cache.capsule)
    try:
        yield True
    finally:
        handlers.set_handler(previous)


def reuses_memory(function: Callable) -> Callable:
    """``function`` run inside :func:`reusing_memory` (``optim.make`` wraps every optimiser's step so)."""

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with reusing_memory():
            return function(*args, **kwargs)

    return wrapped


def cache_stats() -> CacheStats:
    """The cache's :class:`CacheStats` (all zero before its first use)."""
    if _cache is None:
        return CacheStats(0, 0, 0, 0)
    words = _cache.words
    with _lock:
        blocks = sum(1 for i in range(SLOTS) if words[_SLOT0 + 2 * i])
        return CacheStats(words[_CACHED], blocks, words[_HITS], words[_MISSES])


def release_cached_memory() -> int:
    """Give every cached block back to NumPy's free (and so to the C library); returns the bytes
    released.  Arrays in use are untouched."""
    if _cache is None:
        return 0
    words, released = _cache.words, 0
    with _lock:  # the GIL is held here too, so no handler call changes the table meanwhile
        for i in range(SLOTS):
            capacity, data = words[_SLOT0 + 2 * i], words[_SLOT0 + 2 * i + 1]
            if capacity:
                words[_SLOT0 + 2 * i] = words[_SLOT0 + 2 * i + 1] = 0
                words[_CACHED] -= capacity
                released += capacity
                _cache.free_block(_cache.ctx, data - _HEADER, capacity + _HEADER)
    return released


def _is_cached_array(array: np.ndarray) -> bool:
    """Whether NumPy allocated ``array``'s data through the cache's handler (for tests)."""
    return numpy_handlers().handler_name(array) == HANDLER_NAME
