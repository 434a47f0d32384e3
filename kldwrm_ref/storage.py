"""Files that must never be left half-written: atomic writes of text, JSON, CSV and bit-packed arrays.

Every write goes to a temporary file in the target's directory and is moved over the target with
``os.replace`` (atomic on POSIX and Windows), so an interrupt leaves either the old or the new
file.  A process killed inside a write (SIGKILL cannot be caught) leaves its temporary file
``.<name>.<pid>.<random>.tmp`` behind; :func:`remove_stale_temporaries` deletes those whose process
is gone.  Boolean arrays are stored bit-packed in ``.npz`` files, read without pickle.  Checkpoints
are in :mod:`kldwrm_ref.experiments.checkpoint`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Test-only hook for the kill campaign (``tests/kill_campaign.py``): seconds to sleep
# between writing a temporary file and moving it into place, so that kills land inside writes.
WRITE_DELAY_VARIABLE = "KLDWRM_TEST_WRITE_DELAY"
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], object]) -> Path:
    """Call ``write(binary file)`` on a temporary sibling of ``path``, then move it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        delay = float(os.environ.get(WRITE_DELAY_VARIABLE, 0))
        if delay > 0:
            time.sleep(delay)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write` in ``folder`` whose writing process is gone."""
    removed = []
    for entry in Path(folder).glob(".*.tmp"):
        match = _TEMPORARY.match(entry.name)
        if match and not process_alive(int(match.group(1))):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_figure(path: str | os.PathLike, figure: Any, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically (a kill mid-save leaves the old plot or none)."""
    return atomic_write(path, lambda fh: figure.savefig(fh, format="png", dpi=dpi))


def json_text(obj: Any) -> str:
    """The text :func:`write_json` writes: indented, keys sorted, a final newline."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json_text(obj))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def csv_text(rows: Sequence[dict], fields: Sequence[str]) -> str:
    """The text :func:`write_csv` writes: a header of ``fields``, then one line per row."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(path: str | os.PathLike, rows: Sequence[dict], fields: Sequence[str]) -> Path:
    return write_text(path, csv_text(rows, fields))


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
