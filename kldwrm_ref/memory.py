"""Memory an optimiser step reuses across steps: a NumPy memory handler (NEP 49) scoped to the step.

Why: a paper-CNN step allocates and frees some 34 MiB of temporaries (conv1's output and its
cotangent are 5.9 MB each).  In a loop of steps alone glibc serves them from what the previous
step freed, but when other code in the process allocates and frees multi-megabyte arrays
between steps, glibc hands the step's memory back to the kernel and each step page-faults it in
again: about 10% of a CNN step (docs/performance.md, "Allocation is not a cost on the CPU").

What: while :func:`reusing_memory` is open in a context (``Optimizer.step`` opens it), NumPy
allocates that context's array data through this module's handler.  Freed blocks of at least
:data:`MIN_BYTES` go into a cache of at most :data:`SLOTS` blocks and :data:`CACHE_BYTES`, and
requests of that size are served from it (a cached block serves a request at most a quarter plus
a page smaller than it); when it is full, the blocks cached longest ago are freed to make room.
Everything else comes from, and goes back to, the C library (calloc where NumPy asks for zeros,
so large zeroed arrays stay lazily mapped).  No memory is shared: a block is reused only after
NumPy has freed the array that held it, so a step stays a pure function.  Arrays made inside are
ordinary arrays and outlive the block as any array does, but their memory stays this handler's:
freeing them (anywhere, in any thread) gives their blocks to the cache, and resizing them goes
through it.  Tasks and generators started inside the block inherit its context variables, so
they allocate through the handler too.  The cache holds its blocks until the process ends or
:func:`release_cached_memory` empties it.

How: NEP 49 lets a handler (a C struct of malloc / calloc / realloc / free and a context pointer)
serve one context variable's allocations.  Its functions here are compiled C (Numba ``cfunc``s):
each block, large or small, carries a 64-byte header (a magic word, its capacity), and the cache
is a table of (capacity, address, when cached) triples in C memory.  The table changes only
while the calling thread holds the GIL, tested as "this thread's own thread state is the one
attached" (``PyGILState_Check`` answers yes in every thread once a subinterpreter has existed),
which serialises every change; :func:`release_cached_memory` and :func:`cache_stats` read it in
one compiled call.  A call without the GIL (NumPy makes them only while parsing text with
``fromstring`` / ``fromfile``) never touches the table: it allocates and frees with the C
library, which is thread-safe, and shrinks in place.  Where another handler is current (the
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
# the cache's record, int64 words: settings, counters, a clock, then SLOTS (capacity, address, when cached)
_MIN, _LIMIT, _CACHED, _HITS, _MISSES, _TICK, _SLOT0, _WIDTH = 0, 1, 2, 3, 4, 5, 8, 3
_RECORD = _SLOT0 + _WIDTH * SLOTS
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

        api, libc, size_t = handlers.api, handlers.libc, ctypes.c_size_t

        def address(function: Any) -> int:
            return int(ctypes.cast(function, ctypes.c_void_p).value or 0)

        # the C library's functions (thread-safe, unlike NumPy's small-block cache, which needs the GIL)
        c_malloc = ctypes.CFUNCTYPE(size_t, size_t)(address(libc.malloc))
        c_calloc = ctypes.CFUNCTYPE(size_t, size_t, size_t)(address(libc.calloc))
        c_free = ctypes.CFUNCTYPE(None, size_t)(address(libc.free))
        memset = ctypes.CFUNCTYPE(size_t, size_t, ctypes.c_int, size_t)(address(libc.memset))
        memcpy = ctypes.CFUNCTYPE(size_t, size_t, size_t, size_t)(address(libc.memcpy))
        words_at = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_int64), size_t, size_t, size_t)(address(libc.memmove))  # memmove(p, p, 0) returns p, typed
        # whether this thread holds the GIL: its own thread state is the one attached (PyGILState_Check
        # answers 1 from every thread once a subinterpreter has existed); errs only towards "no"
        current = ctypes.CFUNCTYPE(size_t)(address(getattr(api, "PyThreadState_GetUnchecked", None) or api._PyThreadState_UncheckedGet))
        own = ctypes.CFUNCTYPE(size_t)(address(api.PyGILState_GetThisThreadState))

        @njit
        def gil_held():
            state = current()
            return state != 0 and state == own()

        @njit
        def header_of(data):
            return carray(words_at(data - _HEADER, data - _HEADER, 0), 3)

        @njit
        def take(words, size, zeroed):
            """The data of a block of at least ``size`` bytes after its header (zeroed when asked): a
            cached block when one fits (only with the GIL), else a new one from the C library."""
            n = np.int64(size)
            big = n >= words[_MIN]
            if big and gil_held():
                best, best_capacity = -1, np.int64(0)
                for i in range(SLOTS):
                    capacity = words[_SLOT0 + _WIDTH * i]
                    if capacity >= n and capacity - n <= n // 4 + _PAGE and (best < 0 or capacity < best_capacity):
                        best, best_capacity = i, capacity
                if best >= 0:
                    data = words[_SLOT0 + _WIDTH * best + 1]
                    words[_SLOT0 + _WIDTH * best] = 0
                    words[_SLOT0 + _WIDTH * best + 1] = 0
                    words[_CACHED] -= best_capacity
                    words[_HITS] += 1
                    if zeroed:
                        memset(data, 0, n)
                    return data
                words[_MISSES] += 1
            grain = _GRAIN if n >= 16 * _GRAIN else _PAGE
            capacity = (n + grain - 1) // grain * grain if big else n
            base = c_calloc(1, capacity + _HEADER) if zeroed else c_malloc(capacity + _HEADER)
            if base == 0:
                return 0
            header = carray(words_at(base, base, 0), 3)
            header[0], header[1], header[2] = _MAGIC, capacity, 0
            return base + _HEADER

        @njit
        def evict(words, i):
            """Free the block of slot ``i`` to the C library and empty the slot."""
            capacity, data = words[_SLOT0 + _WIDTH * i], words[_SLOT0 + _WIDTH * i + 1]
            words[_SLOT0 + _WIDTH * i] = 0
            words[_SLOT0 + _WIDTH * i + 1] = 0
            words[_CACHED] -= capacity
            header_of(data)[0] = 0
            c_free(data - _HEADER)

        @njit
        def give(words, data):
            """Take back a block: into the cache when it is large and the GIL held (making room by
            evicting the blocks cached longest ago), else to the C library.  A block whose header
            is not this cache's (freed twice) is left alone."""
            header = header_of(data)
            if header[0] != _MAGIC:
                return
            capacity = header[1]
            if capacity >= words[_MIN] and capacity <= words[_LIMIT] and gil_held():
                words[_TICK] += 1
                while True:
                    free_slot, oldest = -1, -1
                    for i in range(SLOTS):
                        if words[_SLOT0 + _WIDTH * i] == 0:
                            if free_slot < 0:
                                free_slot = i
                        elif oldest < 0 or words[_SLOT0 + _WIDTH * i + 2] < words[_SLOT0 + _WIDTH * oldest + 2]:
                            oldest = i
                    if free_slot >= 0 and words[_CACHED] + capacity <= words[_LIMIT]:
                        words[_SLOT0 + _WIDTH * free_slot] = capacity
                        words[_SLOT0 + _WIDTH * free_slot + 1] = data
                        words[_SLOT0 + _WIDTH * free_slot + 2] = words[_TICK]
                        words[_CACHED] += capacity
                        return
                    if oldest < 0:
                        break
                    evict(words, oldest)
            header[0] = 0
            c_free(data - _HEADER)

        @njit
        def release(words):
            """Free every cached block (called with the GIL held, so in one piece)."""
            released = np.int64(0)
            for i in range(SLOTS):
                if words[_SLOT0 + _WIDTH * i] != 0:
                    released += words[_SLOT0 + _WIDTH * i]
                    evict(words, i)
            return released

        @njit
        def snapshot(words):
            blocks = 0
            for i in range(SLOTS):
                if words[_SLOT0 + _WIDTH * i] != 0:
                    blocks += 1
            return words[_CACHED], blocks, words[_HITS], words[_MISSES]

        record, uintp = types.CPointer(types.int64), types.uintp

        @cfunc(uintp(record, uintp), nopython=True)
        def cache_malloc(words, size):
            return take(words, size, False)

        @cfunc(uintp(record, uintp, uintp), nopython=True)
        def cache_calloc(words, count, item):
            if item != 0 and count > (1 << 62) // item:
                return 0
            return take(words, count * item, True)

        @cfunc(uintp(record, uintp, uintp), nopython=True)
        def cache_realloc(words, data, size):
            if data == 0:
                return take(words, size, False)
            n, capacity = np.int64(size), header_of(data)[1]
            if n <= capacity and (capacity < words[_MIN] or n >= capacity // 2 or not gil_held()):
                return data  # kept in place (always without the GIL)
            moved = take(words, n, False)
            if moved != 0:
                memcpy(moved, data, min(capacity, n))
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
        self.words = np.ctypeslib.as_array((ctypes.c_int64 * _RECORD).from_address(self.record))
        self.words[_MIN], self.words[_LIMIT] = MIN_BYTES, CACHE_BYTES
        self.release, self.snapshot = release, snapshot  # called from Python with the GIL held: each one piece
        struct = Handler.from_address(self.handler)
        struct.name, struct.version = HANDLER_NAME.encode(), 1
        struct.allocator = Allocator(self.record, *(f.address for f in self.compiled))
        self.capsule = handlers.capsule(self.handler)


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
        if handlers.handler_name() != HANDLER_NAME:  # a handler opened inside is still open
            raise RuntimeError("reusing_memory must close after every memory handler opened inside it (it left NumPy's handler as it found it)")
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
    return CacheStats(*(int(v) for v in _cache.snapshot(_cache.words)))


def release_cached_memory() -> int:
    """Give every cached block back to the C library; returns the bytes released.  Arrays in use
    are untouched."""
    return 0 if _cache is None else int(_cache.release(_cache.words))


def _is_cached_array(array: np.ndarray) -> bool:
    """Whether NumPy allocated ``array``'s data through the cache's handler (for tests)."""
    return numpy_handlers().handler_name(array) == HANDLER_NAME
