"""Checkpoints without pickle: theta and the optimiser state as one ``.npz`` of plain arrays.

The state is a tree of NamedTuples (:class:`~kldwrm_ref.optim.state.OptState` and what it holds),
tuples, arrays and scalars.  :func:`save_checkpoint` stores every array under its path in the tree
(``state.ea.average.0.A``) and the tree's shape as JSON in the entry ``__tree__``;
:func:`load_checkpoint` reads it back with ``allow_pickle=False`` and rebuilds only the NamedTuple
types of :data:`TYPES`.  The cached curvature inverse is not stored: the step rebuilds it from the
stored averaged factors (``inverse=None``), which gives the same numbers on the same machine.
"""

from __future__ import annotations

import json
import numbers
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from kldwrm_ref.curvature.averaging import EAState
from kldwrm_ref.curvature.kfac import KFACFactors
from kldwrm_ref.model.conv import ConvFactors
from kldwrm_ref.optim.state import OptState, Previous
from kldwrm_ref.storage import atomic_write

FORMAT = "kldwrm-checkpoint-1"
TYPES = {cls.__name__: cls for cls in (OptState, EAState, Previous, KFACFactors, ConvFactors)}


class CheckpointError(ValueError):
    """A checkpoint file is missing a part, is damaged, or is not a kldwrm checkpoint."""


def _encode(obj: Any, arrays: dict[str, np.ndarray], path: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, np.ndarray):
        arrays[path] = obj
        return {"array": path}
    if isinstance(obj, (bool, np.bool_)):
        return {"bool": bool(obj)}
    if isinstance(obj, numbers.Integral):
        return {"int": int(obj)}
    if isinstance(obj, numbers.Real):
        return {"float": float(obj)}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        name = type(obj).__name__
        if TYPES.get(name) is not type(obj):
            raise TypeError(f"{path}: cannot store a {name} in a checkpoint")
        return {"type": name, "fields": {f: _encode(getattr(obj, f), arrays, f"{path}.{f}") for f in obj._fields}}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v, arrays, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        return {"dict": {k: _encode(v, arrays, f"{path}.{k}") for k, v in obj.items()}}
    raise TypeError(f"{path}: cannot store a {type(obj).__name__} in a checkpoint")


def _decode(node: Any, arrays, where: str) -> Any:
    if node is None:
        return None
    if not isinstance(node, dict) or len(node) not in (1, 2):
        raise CheckpointError(f"{where}: malformed tree entry {node!r:.80}")
    if "array" in node:
        if node["array"] not in arrays:
            raise CheckpointError(f"{where}: the array {node['array']!r} is missing")
        return arrays[node["array"]]
    for kind, cast in (("bool", bool), ("int", int), ("float", float)):
        if kind in node:
            return cast(node[kind])
    if "type" in node:
        if node["type"] not in TYPES:
            raise CheckpointError(f"{where}: unknown type {node['type']!r}")
        cls = TYPES[node["type"]]
        return cls(**{f: _decode(v, arrays, where) for f, v in node["fields"].items()})
    if "tuple" in node:
        return tuple(_decode(v, arrays, where) for v in node["tuple"])
    if "dict" in node:
        return {k: _decode(v, arrays, where) for k, v in node["dict"].items()}
    raise CheckpointError(f"{where}: malformed tree entry {node!r:.80}")


def save_checkpoint(path: str | os.PathLike, theta: np.ndarray, state: OptState, **scalars: Any) -> Path:
    """Write theta, the optimiser state (without its cached inverse) and ``scalars`` (numbers, arrays, dicts of them) atomically."""
    arrays: dict[str, np.ndarray] = {}
    tree = {"format": FORMAT, "theta": _encode(theta, arrays, "theta"), "state": _encode(state._replace(inverse=None), arrays, "state"), "scalars": _encode(scalars, arrays, "scalars")}
    entries = {**arrays, "__tree__": np.array(json.dumps(tree))}
    return atomic_write(path, lambda fh: np.savez(fh, allow_pickle=False, **entries))


def load_checkpoint(path: str | os.PathLike) -> tuple[np.ndarray, OptState, dict]:
    """(theta, state, scalars) from a checkpoint written by :func:`save_checkpoint`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, NotImplementedError, zipfile.BadZipFile) as error:  # NotImplementedError: a damaged header naming an unknown compression
        raise CheckpointError(f"{path}: not a readable checkpoint ({error})") from None
    try:
        tree = json.loads(str(arrays.pop("__tree__")))
    except (KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: no valid tree entry ({error})") from None
    if not isinstance(tree, dict) or tree.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    theta, state, scalars = (_decode(tree.get(part), arrays, f"{path}: {part}") for part in ("theta", "state", "scalars"))
    if not isinstance(theta, np.ndarray) or not isinstance(state, OptState) or not isinstance(scalars, dict):
        raise CheckpointError(f"{path}: theta, state or scalars is missing")
    return theta, state, scalars
