"""Files that must never be left half-written: atomic writes of text, JSON, CSV and bit-packed arrays.

Every write goes to a temporary file in the target's directory and is moved over the target with
``os.replace`` (atomic on POSIX and Windows), so an interrupt leaves either the old or the new
file.  Boolean arrays are stored bit-packed in ``.npz`` files, read without pickle.  Checkpoints
are in :mod:`kldwrm_ref.experiments.checkpoint`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], object]) -> Path:
    """Call ``write(binary file)`` on a temporary sibling of ``path``, then move it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: str | os.PathLike, rows: Sequence[dict], fields: Sequence[str]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def read_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_bools(path: str | os.PathLike, values: np.ndarray, **scalars: int) -> Path:
    """Save a 1-D boolean array bit-packed, with named integers, as a compressed ``.npz``."""
    values = np.asarray(values)
    if values.ndim != 1 or values.dtype != bool:
        raise ValueError(f"values must be a 1-D boolean array, got dtype {values.dtype} and shape {values.shape}")
    if {"bits", "size"} & set(scalars):
        raise ValueError("scalars must not be named 'bits' or 'size'")
    arrays: dict[str, Any] = dict(bits=np.packbits(values), size=len(values), **scalars)
    return atomic_write(path, lambda fh: np.savez_compressed(fh, allow_pickle=False, **arrays))


def read_bools(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, int]]:
    """The boolean array and the named integers saved by :func:`write_bools`."""
    with np.load(path, allow_pickle=False) as saved:
        values = np.unpackbits(saved["bits"], count=int(saved["size"])).astype(bool)
        return values, {key: int(saved[key]) for key in saved.files if key not in ("bits", "size")}
