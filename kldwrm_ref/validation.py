"""Argument checks shared by every module: each error names the argument and the accepted range."""

from __future__ import annotations

import argparse
import numbers
import os
import tempfile
from pathlib import Path
from typing import NoReturn

import numpy as np


def check_finite(name: str, array: np.ndarray) -> None:
    """Raise ValueError if ``array`` holds a NaN or an infinity."""
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"{name} must be finite; it has {bad} non-finite entries")


def check_rho(rho: float, name: str = "rho") -> float:
    """The EA decay must lie in [0, 1): rho = 1 never forgets and the wake weights degenerate."""
    if not isinstance(rho, numbers.Real) or not (0.0 <= float(rho) < 1.0):
        raise ValueError(f"{name} must be a real number in [0, 1), got {rho!r}")
    return float(rho)


def check_positive(value: float, name: str) -> float:
    """A strictly positive finite real number (step sizes, lambda, kappa)."""
    if not isinstance(value, numbers.Real) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite real number > 0, got {value!r}")
    return float(value)


def check_nonnegative(value: float, name: str) -> float:
    """A finite real number >= 0 (damping, weight decay, momentum)."""
    if not isinstance(value, numbers.Real) or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite real number >= 0, got {value!r}")
    return float(value)


def check_positive_int(value: int, name: str) -> int:
    """An integer >= 1 (refresh periods, wake capacity, sample counts)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_nonnegative_int(value: int, name: str) -> int:
    """An integer >= 0 (padding)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    """One of a fixed set of strings."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_folder_name(value: str, name: str) -> str:
    """A plain folder name: non-empty, no path separator, not ``.`` or ``..`` (so it stays inside ``--out``)."""
    if not isinstance(value, str) or value in ("", ".", "..") or any(c in value for c in "/\\\0") or value != value.strip():
        raise ValueError(f"{name} must be a plain folder name (non-empty, no '/', '\\', '.' or '..', no leading or trailing spaces), got {value!r}")
    return value


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr, ``PROG: error: MESSAGE``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _probe_directory(folder: Path, path, name: str) -> None:
    """Create and remove an empty folder in ``folder``: the only sure test that files can be written there."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".kldwrm-probe-", dir=folder))
    except OSError as error:
        raise ValueError(f"{name} {str(path)!r}: cannot write in {str(folder)!r} ({error.strerror or error})") from None


def check_output_file(path: str | os.PathLike, name: str) -> Path:
    """A file path that can be written: not a directory, in an existing writable directory."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a directory; give the path of a file to write")
    folder = target.parent
    if not folder.exists():
        raise ValueError(f"{name} {str(path)!r}: the directory {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{name} {str(path)!r}: {str(folder)!r} is not a directory")
    _probe_directory(folder, path, name)
    return target


def check_output_dir(path: str | os.PathLike, name: str) -> Path:
    """A directory that exists and is writable, or can be created below a writable directory.

    Writability is tried (an empty folder is created and removed), so a read-only or virtual file
    system (``/proc``) is refused here, before any work, and nothing is left behind."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{name} {str(path)!r} exists and is not a directory")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{name} {str(path)!r}: {str(existing)!r} is not a directory")
    _probe_directory(existing, path, name)
    return target
