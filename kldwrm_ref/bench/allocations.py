"""An allocation census: every NumPy array allocation a block of code makes, counted by size.

``with counting_allocations() as census: ...`` then ``census.count`` (allocations of at least
``census.min_bytes``), ``census.total_bytes``, ``census.largest`` and ``census.sizes`` (the first
:data:`SIZES_KEPT`, in order), filled when the block ends.  It answers what tracemalloc cannot:
tracemalloc keeps live blocks and a high-water mark, so a temporary allocated and freed inside a
step shows in neither; the census sees each allocation as it happens.

How: since NumPy 1.22 (NEP 49) every buffer NumPy allocates for array data (and for some scratch
space, such as sorting's) comes from a *memory handler*, a C struct of malloc / calloc / realloc /
free functions and a context pointer, chosen per context variable: a handler installed here
serves the calling context (its thread, and the asyncio tasks it starts meanwhile, which copy the
context) and no other.  Each census installs a handler of its own whose allocating functions are
compiled C (Numba ``cfunc``s, so no Python code, signal handler or exception runs inside an
allocation): they call NumPy's default function and, when it succeeds, add the size to the
census's record (the context pointer) and to the records of the censuses it is nested in.  The
free function *is* NumPy's default free.  Handlers and records live in C memory that is never
freed, so an array made under a census may outlive it, down to interpreter exit.  A census's
record is reused only once nothing refers to its handler any more (no array made under it, no
context that inherited it), and a closed census is unlinked from the one it was nested in, so
whatever allocates later under an old handler (an ``ndarray.resize`` of an array made under it)
counts in that closed census and nowhere else.  Close a census in the context it opened in, as a
``with`` block does.  The handler is installed through NumPy's C-API table
(``PyDataMem_SetHandler``) and checked by name; where that fails, :class:`CensusUnavailable` is
raised.

Not counted: memory NumPy does not allocate through its handler (BLAS's and LAPACK's work
buffers, Python objects and array headers, the bytes an unpickled array keeps its data in) and
buffers Numba-compiled code allocates for itself (the project's kernels write into arrays their
NumPy wrappers allocate, so their outputs are counted).  A realloc counts its new size.

On a GPU, :func:`counting_pool_allocations` is the same census over CuPy arrays: every array CuPy
allocates is one request to its memory pool (served from the pool's free blocks or from the
device), and a CuPy memory hook (``cupy.cuda.MemoryHook``) is called after each request with the
requested size.  Hooks are per thread, so it counts the calling thread's requests.  Not counted
there: cuBLAS's and cuSOLVER's workspaces, and numba-cuda's own allocations (the project's
numba-cuda kernels write into CuPy arrays their wrappers allocate).
"""

from __future__ import annotations

import contextvars
import ctypes
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from numba import cfunc, njit, types

from kldwrm_ref.memory import Allocator, Handler, numpy_handlers

__all__ = ["MIN_BYTES", "SIZES_KEPT", "Census", "CensusUnavailable", "counting_allocations", "counting_pool_allocations"]

MIN_BYTES = 4096  # the default threshold: "a few kilobytes"
SIZES_KEPT = 64  # sizes listed per census (all are counted)
BLOCK = 64  # records and handlers are made this many at a time


class CensusUnavailable(RuntimeError):
    """This NumPy (or Numba) cannot host the census's memory handler."""


@dataclass
class Census:
    """Allocations of at least ``min_bytes`` made in the block: how many, their bytes in all, the
    largest, and the first :data:`SIZES_KEPT` sizes in order (filled when the block ends)."""

    min_bytes: int = MIN_BYTES
    count: int = 0
    total_bytes: int = 0
    largest: int = 0
    sizes: list[int] = field(default_factory=list)

    def note(self, nbytes: int) -> None:
        """Count one allocation of ``nbytes`` (when at least :attr:`min_bytes`)."""
        if nbytes >= self.min_bytes:
            self.count += 1
            self.total_bytes += nbytes
            self.largest = max(self.largest, nbytes)
            if len(self.sizes) < SIZES_KEPT:
                self.sizes.append(nbytes)


def _checked_min_bytes(min_bytes) -> int:
    if isinstance(min_bytes, bool) or not isinstance(min_bytes, int | np.integer) or not 0 <= min_bytes < 2**63:
        raise ValueError(f"min_bytes must be an integer in [0, 2**63), got {min_bytes!r}")
    return int(min_bytes)


# ----------------------------------------------------------------- a census's record (int64 words)
_COUNT, _TOTAL, _LARGEST, _MIN, _KEPT, _PARENT, _SIZES = range(7)
_RECORD = _SIZES + SIZES_KEPT  # words per record; _PARENT: offset in words to the enclosing census's record, 0 if none
_WORD = 8
_LONGEST_CHAIN = 1 << 16  # a safety net: nesting is never this deep


@njit
def _note(record, nbytes):
    """Add one allocation to ``record`` and every record it is nested in."""
    at = 0
    for _ in range(_LONGEST_CHAIN):
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


_HANDLER_NAME = "kldwrm_ref allocation census"


class _Slot:
    """One census's record and handler (C memory never freed) and the capsule that names the
    handler to NumPy; ``refs`` is the capsule's reference count when only the slot holds it."""

    def __init__(self, record: int, handler: int, capsule) -> None:
        self.record, self.handler, self.capsule = record, handler, capsule
        self.words = (ctypes.c_int64 * _RECORD).from_address(record)
        self.open = False
        self.refs = 0  # set once the slot is the capsule's only holder (Engine.new_block)

    def reusable(self) -> bool:
        """Closed, and nothing else refers to its handler (an array made under it, a context)."""
        return not self.open and sys.getrefcount(self.capsule) <= self.refs


class _Engine:
    """Built once per process: the compiled allocating functions, and slots made in blocks."""

    def __init__(self) -> None:
        handlers = numpy_handlers()  # NumPy's memory-handler C API (shared with kldwrm_ref.memory)
        self.handlers, self.handler_name, self.set_handler = handlers, handlers.handler_name, handlers.set_handler
        self.api, self.libc, self.default = handlers.api, handlers.libc, handlers.default
        ctx = self.default.ctx or 0
        # NumPy's own functions, their context passed as an integer constant of the compiled code;
        # pointers travel as uintp (the same register as a pointer in the C calling convention)
        size_t = ctypes.c_size_t
        d_malloc = ctypes.CFUNCTYPE(size_t, size_t, size_t)(self.default.malloc)
        d_calloc = ctypes.CFUNCTYPE(size_t, size_t, size_t, size_t)(self.default.calloc)
        d_realloc = ctypes.CFUNCTYPE(size_t, size_t, size_t, size_t)(self.default.realloc)
        record, uintp = types.CPointer(types.int64), types.uintp

        @cfunc(uintp(record, uintp), nopython=True)
        def census_malloc(words, size):
            pointer = d_malloc(ctx, size)
            if pointer != 0:
                _note(words, size)
            return pointer

        @cfunc(uintp(record, uintp, uintp), nopython=True)
        def census_calloc(words, nelem, elsize):
            pointer = d_calloc(ctx, nelem, elsize)
            if pointer != 0:
                _note(words, nelem * elsize)
            return pointer

        @cfunc(uintp(record, uintp, uintp), nopython=True)
        def census_realloc(words, old, new_size):
            pointer = d_realloc(ctx, old, new_size)
            if pointer != 0:
                _note(words, new_size)
            return pointer

        self.compiled = (census_malloc, census_calloc, census_realloc)  # kept for the process's life
        self.slots: list[_Slot] = []

    def new_block(self) -> None:
        records, handlers = self.libc.calloc(BLOCK * _RECORD, _WORD), self.libc.calloc(BLOCK, ctypes.sizeof(Handler))
        if not (records and handlers):
            raise CensusUnavailable("no memory for the allocation census's records")
        malloc, calloc, realloc = (f.address for f in self.compiled)
        for i in range(BLOCK):
            record, handler = records + i * _RECORD * _WORD, handlers + i * ctypes.sizeof(Handler)
            struct = Handler.from_address(handler)
            struct.name, struct.version = _HANDLER_NAME.encode(), 1
            struct.allocator = Allocator(record, malloc, calloc, realloc, self.default.free)
            self.slots.append(_Slot(record, handler, self.handlers.capsule(handler)))
            self.slots[-1].refs = sys.getrefcount(self.slots[-1].capsule)

    def take_slot(self) -> _Slot:
        """A reusable slot, marked open (a new block when none is free)."""
        slot = next((slot for slot in self.slots if slot.reusable()), None)
        if slot is None:
            self.new_block()
            slot = self.slots[-1]
        slot.open = True
        return slot


_engine: _Engine | None = None
_lock = threading.Lock()  # the engine's build and its slots
# per open census, innermost last: (its slot, its capsule, the handler before it); a context that
# holds the stack (a task started inside a census copies it) keeps each capsule, so each slot, from reuse
_open: contextvars.ContextVar[tuple] = contextvars.ContextVar("kldwrm_ref_open_censuses", default=())


def _get_engine() -> _Engine:
    global _engine
    if _engine is None:
        try:
            _engine = _Engine()
        except Exception as error:  # NumPy's C API or Numba's cfuncs out of reach
            raise CensusUnavailable(f"the allocation census cannot run with NumPy {np.__version__}: {type(error).__name__}: {error}") from error
    return _engine


@contextmanager
def counting_allocations(min_bytes: int = MIN_BYTES) -> Iterator[Census]:
    """Within the block, count the calling context's NumPy allocations of at least ``min_bytes``
    (module docstring); censuses nest, each counting everything inside it."""
    min_bytes = _checked_min_bytes(min_bytes)
    with _lock:
        engine = _get_engine()
        slot = engine.take_slot()
    try:
        stack = _open.get()
        ctypes.memset(slot.record, 0, _RECORD * _WORD)
        slot.words[_MIN] = int(min_bytes)
        if stack:
            slot.words[_PARENT] = (stack[-1][0].record - slot.record) // _WORD
        previous = engine.set_handler(slot.capsule)
        if engine.handler_name() != _HANDLER_NAME:
            engine.set_handler(previous)
            raise CensusUnavailable(f"NumPy {np.__version__} did not accept the allocation census's memory handler")
    except BaseException:
        slot.open = False
        raise
    _open.set((*stack, (slot, slot.capsule, previous)))
    census = Census(int(min_bytes))
    try:
        yield census
    finally:
        _close(engine, slot, census)


def _close(engine: _Engine, slot: _Slot, census: Census) -> None:
    """Read the census's record and take it off its context's stack: reinstall the handler from
    before it when it was innermost, else relink the census opened inside it to its parent."""
    words = slot.words
    census.count, census.total_bytes, census.largest = words[_COUNT], words[_TOTAL], words[_LARGEST]
    census.sizes = list(words[_SIZES : _SIZES + words[_KEPT]])
    stack = _open.get()
    at = next((i for i, entry in enumerate(stack) if entry[0] is slot), None)
    if at is None:
        raise RuntimeError("an allocation census must close in the context (thread, task) it opened in")
    previous = stack[at][2]
    if at == len(stack) - 1:
        engine.set_handler(previous)
    else:  # closed before a census opened inside it: that one now nests in this one's parent
        above = stack[at + 1][0]
        above.words[_PARENT] = (slot.record + words[_PARENT] * _WORD - above.record) // _WORD if words[_PARENT] else 0
        stack = (*stack[: at + 1], (above, above.capsule, previous), *stack[at + 2 :])
    _open.set(stack[:at] + stack[at + 1 :])
    words[_PARENT] = 0  # what still allocates under its handler counts here alone: the parent's record may be reused
    slot.open = False


@contextmanager
def counting_pool_allocations(min_bytes: int = MIN_BYTES) -> Iterator[Census]:
    """Within the block, count the calling thread's requests to CuPy's memory pool of at least
    ``min_bytes`` (the requested sizes: one per CuPy array; module docstring); censuses nest, each
    counting everything inside it.  Needs CuPy."""
    census = Census(_checked_min_bytes(min_bytes))
    from cupy.cuda import MemoryHook  # GPU only: imported when a census opens

    class PoolCensus(MemoryHook):
        """Notes the requested size after each pool request that succeeded (CuPy passes the
        hook's arguments by name; a failed request has a null ``mem_ptr`` and a null ``pmem_id``,
        a request of 0 bytes a null ``mem_ptr`` only)."""

        def __init__(self) -> None:
            self.name = f"kldwrm-pool-census-{id(self):x}"  # CuPy keys a thread's hooks by name

        def malloc_postprocess(self, **kwargs) -> None:
            if kwargs.get("mem_ptr", 1) or kwargs.get("pmem_id", 1):
                census.note(int(kwargs["size"]))

    with PoolCensus():
        yield census
