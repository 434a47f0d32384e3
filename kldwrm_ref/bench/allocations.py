"""An allocation census: every NumPy array allocation a block of code makes, counted by size.

``with counting_allocations() as census: ...`` then ``census.count`` (allocations of at least
``census.min_bytes``), ``census.total_bytes``, ``census.largest`` and ``census.sizes`` (the first
:data:`SIZES_KEPT`, in order).  It answers what tracemalloc cannot: tracemalloc keeps live blocks
and a high-water mark, so a temporary allocated and freed inside a step shows in neither; the
census sees each allocation as it happens.

How: since NumPy 1.22 (NEP 49) every array's data buffer comes from a *memory handler*, a C struct
of malloc / calloc / realloc / free functions and a context pointer, chosen per context (a
context variable), so a handler installed here sees only the calling thread's allocations.  Each
open census installs a handler of its own whose allocating functions are compiled C (Numba
``cfunc``s, so no Python code, signal handler or exception can run inside an allocation): they
add the size to the census's record (the context pointer) and to the records of the censuses it
is nested in, then call NumPy's default functions.  The free function *is* NumPy's default free.
Handlers, their records and their names live in C memory that is never freed, so an array made
under a census can outlive it, down to interpreter exit; records are reused by later censuses, so
a realloc of an old census's array (``ndarray.resize``) counts in whichever census holds its
record then.  The handler is installed through NumPy's C-API table (``PyDataMem_SetHandler``) and
checked by name; where that fails, :class:`CensusUnavailable` is raised.

Not counted: memory that is not an array's data (BLAS's and LAPACK's work buffers, Python objects,
array headers, the bytes an unpickled array keeps its data in) and buffers Numba-compiled code
allocates for itself (the project's kernels write into arrays their NumPy wrappers allocate, so
their outputs are counted).  A realloc counts its new size.  A GPU's arrays come from CuPy's
memory pool; :func:`kldwrm_ref.bench.step.step_memory` reports the pool's growth there instead.
"""

from __future__ import annotations

import contextvars
import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from numba import cfunc, types

__all__ = ["MIN_BYTES", "SIZES_KEPT", "Census", "CensusUnavailable", "counting_allocations"]

MIN_BYTES = 4096  # the default threshold: "a few kilobytes"
SIZES_KEPT = 64  # sizes listed per census (all are counted)
MAX_OPEN = 256  # censuses open at once, over every thread


class CensusUnavailable(RuntimeError):
    """This NumPy does not accept the census's memory handler."""


@dataclass
class Census:
    """Allocations of at least ``min_bytes`` made in the block: how many, their bytes in all, the
    largest, and the first :data:`SIZES_KEPT` sizes in order (filled when the block ends)."""

    min_bytes: int = MIN_BYTES
    count: int = 0
    total_bytes: int = 0
    largest: int = 0
    sizes: list[int] = field(default_factory=list)


# ----------------------------------------------------------------- a census's record (int64 words)
_COUNT, _TOTAL, _LARGEST, _MIN, _KEPT, _PARENT, _SIZES = range(7)
_RECORD = _SIZES + SIZES_KEPT  # words per record; _PARENT: offset in words to the enclosing census's record, 0 if none


def _note(record, nbytes):
    """Add one allocation to ``record`` and every record it is nested in (compiled into the cfuncs)."""
    at = 0
    while True:
        if nbytes >= record[at + _MIN]:
            record[at + _COUNT] += 1
            record[at + _TOTAL] += nbytes
            if nbytes > record[at + _LARGEST]:
                record[at + _LARGEST] = nbytes
            kept = record[at + _KEPT]
            if kept < SIZES_KEPT:
                record[at + _SIZES + kept] = nbytes
                record[at + _KEPT] = kept + 1
        step = record[at + _PARENT]
        if step == 0:
            return
        at += step


# ----------------------------------------------------------------- NumPy's C structs (NEP 49)
class _Allocator(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_void_p), ("malloc", ctypes.c_void_p), ("calloc", ctypes.c_void_p), ("realloc", ctypes.c_void_p), ("free", ctypes.c_void_p)]


class _Handler(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * 127), ("version", ctypes.c_uint8), ("allocator", _Allocator)]


_HANDLER_NAME = "kldwrm_ref allocation census"
_SET_HANDLER, _DEFAULT_HANDLER = 304, 306  # NumPy's C-API table: PyDataMem_SetHandler, &PyDataMem_DefaultHandler (since 1.22)


class _Engine:
    """Built once per process: the compiled allocating functions, MAX_OPEN records and handlers in
    C memory never freed, and the capsules that name them to NumPy."""

    def __init__(self) -> None:
        try:
            from numpy._core import multiarray
        except ImportError:  # NumPy 1.x
            from numpy.core import multiarray  # type: ignore[no-redef]
        self.handler_name = multiarray.get_handler_name
        api, libc = ctypes.pythonapi, ctypes.CDLL(None)
        api.PyCapsule_GetPointer.restype, api.PyCapsule_GetPointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        api.PyCapsule_New.restype, api.PyCapsule_New.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        libc.calloc.restype, libc.calloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]
        table = ctypes.cast(api.PyCapsule_GetPointer(multiarray._ARRAY_API, None), ctypes.POINTER(ctypes.c_void_p))
        self.set_handler = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)(table[_SET_HANDLER])
        default_capsule = ctypes.cast(table[_DEFAULT_HANDLER], ctypes.POINTER(ctypes.py_object)).contents.value
        default = _Handler.from_address(api.PyCapsule_GetPointer(default_capsule, b"mem_handler")).allocator
        ctx = default.ctx or 0
        # NumPy's own functions, their context passed as an integer (a constant of the compiled code)
        d_malloc = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t)(default.malloc)
        d_calloc = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t)(default.calloc)
        d_realloc = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t)(default.realloc)
        note = _compiled_note()
        record_ptr = types.CPointer(types.int64)

        @cfunc(types.voidptr(record_ptr, types.uintp), nopython=True)
        def census_malloc(record, size):
            note(record, size)
            return d_malloc(ctx, size)

        @cfunc(types.voidptr(record_ptr, types.uintp, types.uintp), nopython=True)
        def census_calloc(record, nelem, elsize):
            note(record, nelem * elsize)
            return d_calloc(ctx, nelem, elsize)

        @cfunc(types.voidptr(record_ptr, types.voidptr, types.uintp), nopython=True)
        def census_realloc(record, ptr, new_size):
            note(record, new_size)
            return d_realloc(ctx, ptr, new_size)

        self.compiled = (census_malloc, census_calloc, census_realloc)  # kept for the process's life
        words = 8  # bytes per record word
        self.records = libc.calloc(MAX_OPEN * _RECORD, words)
        self.record_array = np.ctypeslib.as_array((ctypes.c_int64 * (MAX_OPEN * _RECORD)).from_address(self.records)).reshape(MAX_OPEN, _RECORD)
        name = libc.calloc(len(b"mem_handler") + 1, 1)  # the capsule's name, which NumPy checks on every use
        ctypes.memmove(name, b"mem_handler", len(b"mem_handler"))
        handlers = libc.calloc(MAX_OPEN, ctypes.sizeof(_Handler))
        if not (self.records and name and handlers):
            raise CensusUnavailable("no memory for the allocation census's records")
        self.capsules = []
        for slot in range(MAX_OPEN):
            handler = _Handler.from_address(handlers + slot * ctypes.sizeof(_Handler))
            handler.name, handler.version = _HANDLER_NAME.encode(), 1
            handler.allocator = _Allocator(self.records + slot * _RECORD * words, census_malloc.address, census_calloc.address, census_realloc.address, default.free)
            self.capsules.append(api.PyCapsule_New(ctypes.addressof(handler), ctypes.cast(name, ctypes.c_char_p), None))
        self.free_slots = list(range(MAX_OPEN - 1, -1, -1))


def _compiled_note():
    from numba import njit

    return njit(_note)


_engine: _Engine | None = None
_open: contextvars.ContextVar[tuple] = contextvars.ContextVar("kldwrm_ref_open_censuses", default=())  # (slot, handler before it) per open census, innermost last


def _get_engine() -> _Engine:
    global _engine
    if _engine is None:
        try:
            _engine = _Engine()
        except (AttributeError, ValueError, OSError, TypeError) as error:
            raise CensusUnavailable(f"NumPy {np.__version__}'s C API is not reachable for the allocation census: {error}") from error
    return _engine


@contextmanager
def counting_allocations(min_bytes: int = MIN_BYTES) -> Iterator[Census]:
    """Within the block, count the calling context's NumPy array allocations of at least
    ``min_bytes`` (module docstring); censuses nest, each counting everything inside it."""
    engine = _get_engine()
    if not engine.free_slots:
        raise CensusUnavailable(f"more than {MAX_OPEN} allocation censuses are open at once")
    slot = engine.free_slots.pop()
    record, stack = engine.record_array[slot], _open.get()
    record[:] = 0
    record[_MIN] = int(min_bytes)
    if stack:
        record[_PARENT] = (stack[-1][0] - slot) * _RECORD
    previous = engine.set_handler(engine.capsules[slot])
    if engine.handler_name() != _HANDLER_NAME:
        engine.set_handler(previous)
        engine.free_slots.append(slot)
        raise CensusUnavailable(f"NumPy {np.__version__} did not accept the allocation census's memory handler")
    _open.set((*stack, (slot, previous)))
    census = Census(int(min_bytes))
    try:
        yield census
    finally:
        _close(engine, slot, census)


def _close(engine: _Engine, slot: int, census: Census) -> None:
    """Read the census's record, take it off its context's stack (reinstalling the handler below
    it when it was innermost; relinking the one above when not) and free its slot."""
    record = engine.record_array[slot]
    census.count, census.total_bytes, census.largest = int(record[_COUNT]), int(record[_TOTAL]), int(record[_LARGEST])
    census.sizes = [int(s) for s in record[_SIZES : _SIZES + record[_KEPT]]]
    stack = _open.get()
    opened_here = [i for i, (s, _) in enumerate(stack) if s == slot]
    if not opened_here:
        raise RuntimeError("an allocation census must close in the context (thread) it opened in")
    at = opened_here[0]
    previous = stack[at][1]
    if at == len(stack) - 1:
        engine.set_handler(previous)
    else:  # closed before a census opened inside it: that one now nests in this one's parent
        above_slot = stack[at + 1][0]
        parent = slot + record[_PARENT] // _RECORD if record[_PARENT] else None
        engine.record_array[above_slot, _PARENT] = 0 if parent is None else (parent - above_slot) * _RECORD
        stack = (*stack[: at + 1], (above_slot, previous), *stack[at + 2 :])
    _open.set(stack[:at] + stack[at + 1 :])
    engine.free_slots.append(slot)
