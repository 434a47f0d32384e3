"""An operation census: how many array operations a block issues, each one GPU kernel launch or more.

On a GPU a step between refreshes is bound by dispatch, not arithmetic: CuPy spent some 16 us of
host time on an elementwise operation (docs/gpu.md, measured on an H200), so a step's operation
count times the dispatch time of one is about the least its step can take.  The engine is
written once against the array API, so the count does not depend on the device; it is taken
here, on any machine, by running the code on array-api-strict arrays (a test dependency) with
:func:`counting_backend`'s kernels.

``with counting_operations() as census: ...`` then ``census.count`` and ``census.by_name`` (a
Counter).  Counted:

- each call of a function of ``array_api_strict`` or ``array_api_strict.linalg`` that computes
  (an elementwise function, a reduction, a product, a creation such as ``zeros``, ``eigh``),
  under its name;
- each arithmetic, comparison, bitwise or in-place operator of an array (``__add__``, ...), an
  assignment into an array (``__setitem__``) and an indexing with an array (a gather);
- each call of a kernel of :func:`counting_backend` (``kernel:<name>``, the product included).

Not counted: views and metadata (:data:`NOT_LAUNCHES`: ``reshape``, ``permute_dims``, ``flip``,
``.T``, basic slicing, ``finfo``, ...; ``astype`` with ``copy=False`` to the array's own dtype,
``real`` of a real array), ``empty`` (an allocation), ``asarray`` (a transfer, counted by
:func:`kldwrm_ref.arrays.counting_transfers`, or nothing), and whatever runs inside a counted
call.  A count is a lower bound on kernel launches: on a GPU a product or a reduction may launch
several kernels and ``eigh`` many, and CuPy's ``reshape`` copies a non-contiguous array.  A
call that raises still counts.  One census at a time, in one thread: it replaces the
library's functions and the array type's operators while it is open.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NOT_LAUNCHES", "OperationCensus", "counting_backend", "counting_operations"]

NOT_LAUNCHES = frozenset(
    {
        # views and shapes
        "reshape", "permute_dims", "matrix_transpose", "expand_dims", "squeeze", "broadcast_to", "broadcast_arrays", "moveaxis", "unstack",
        "flip", "diagonal",
        # metadata and flags
        "finfo", "iinfo", "result_type", "can_cast", "isdtype", "broadcast_shapes",
        "get_array_api_strict_flags", "set_array_api_strict_flags", "reset_array_api_strict_flags",
        # allocation without a kernel, and transfers
        "empty", "empty_like", "asarray", "from_dlpack",
    }
)  # fmt: skip
_OPERATORS = (
    "__abs__", "__add__", "__and__", "__eq__", "__floordiv__", "__ge__", "__gt__", "__iadd__", "__iand__", "__ifloordiv__",
    "__ilshift__", "__imatmul__", "__imod__", "__imul__", "__invert__", "__ior__", "__ipow__", "__irshift__", "__isub__",
    "__itruediv__", "__ixor__", "__le__", "__lshift__", "__lt__", "__matmul__", "__mod__", "__mul__", "__ne__", "__neg__",
    "__or__", "__pos__", "__pow__", "__radd__", "__rand__", "__rfloordiv__", "__rlshift__", "__rmatmul__", "__rmod__",
    "__rmul__", "__ror__", "__rpow__", "__rrshift__", "__rshift__", "__rsub__", "__rtruediv__", "__rxor__", "__setitem__",
    "__sub__", "__truediv__", "__xor__",
)  # fmt: skip


@dataclass
class OperationCensus:
    """The operations counted in the block: how many, and how many of each name."""

    count: int = 0
    by_name: Counter = field(default_factory=Counter)


class _State(threading.local):
    census: OperationCensus | None = None
    depth = 0


_state = _State()
_lock = threading.Lock()


def _counted(name: str, function: Callable, counts: Callable[..., bool] | None = None) -> Callable:
    """``function`` noting ``name`` in the open census when called outside a counted call (and
    when ``counts(*args, **kwargs)``)."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        census = _state.census
        if census is not None and _state.depth == 0 and (counts is None or counts(*args, **kwargs)):
            census.count += 1
            census.by_name[name] += 1
        _state.depth += 1
        try:
            return function(*args, **kwargs)
        finally:
            _state.depth -= 1

    return call


def _gathers(array: Any, key: Any) -> bool:
    """Whether indexing with ``key`` reads through an index array (basic slicing is a view)."""
    return any(hasattr(k, "shape") for k in (key if isinstance(key, tuple) else (key,)))


def _converts(x: Any, dtype: Any, /, *, copy: bool = True, **_: Any) -> bool:
    """Whether ``astype`` makes an array (not with copy=False to x's own dtype: x itself)."""
    return copy or x.dtype != dtype


def _complex(x: Any) -> bool:
    """Whether ``real`` / ``imag`` compute (of a real array ``real`` is a view)."""
    return "complex" in str(x.dtype)


_WHEN: dict[str, Callable[..., bool]] = {"astype": _converts, "real": _complex}  # functions that launch only on some arguments


@contextmanager
def counting_operations() -> Iterator[OperationCensus]:
    """Within the block, count the array operations on array-api-strict arrays (module docstring)."""
    import array_api_strict as strict

    array_type = type(strict.asarray(0.0))
    if not _lock.acquire(blocking=False):
        raise RuntimeError("an operation census is already open: one at a time")
    replaced: list[tuple[Any, str, Any]] = []

    def replace(owner: Any, name: str, new: Any) -> None:
        replaced.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, new)

    try:
        for module, prefix in ((strict, ""), (strict.linalg, "linalg.")):
            for name, value in list(vars(module).items()):
                if not name.startswith("_") and callable(value) and not isinstance(value, type) and name not in NOT_LAUNCHES:
                    replace(module, name, _counted(prefix + name, value, _WHEN.get(name)))
        for name in _OPERATORS:
            if name in vars(array_type):
                replace(array_type, name, _counted(name, vars(array_type)[name]))
        replace(array_type, "__getitem__", _counted("__getitem__[array]", vars(array_type)["__getitem__"], _gathers))
        census = OperationCensus()
        _state.census, _state.depth = census, 0
        yield census
    finally:
        _state.census = None
        for owner, name, original in reversed(replaced):
            setattr(owner, name, original)
        _lock.release()


def counting_backend():
    """The :func:`~kldwrm_ref.backends.host_hop_backend` of array-api-strict, each of its kernels
    (the product included) counted as one operation in an open census."""
    import array_api_strict as strict

    from kldwrm_ref.arrays import array_namespace
    from kldwrm_ref.backends import OPERATIONS, host_hop_backend

    backend = host_hop_backend(array_namespace(strict.asarray(0.0)))
    return backend._replace(**{op: _counted(f"kernel:{op}", getattr(backend, op)) for op in OPERATIONS})
