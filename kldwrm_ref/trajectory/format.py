"""The trajectory format on disk: a directory with ``manifest.json`` and one ``step-NNNNN.npz`` per
step (docs/trajectory-format.md).

In memory a :class:`Trajectory` is the manifest (plain JSON values) and, per step, a flat mapping
of quantity name -> numeric array, exactly what the step's ``.npz`` holds.  :func:`save` writes
every file atomically and the manifest last (an interrupted save leaves no manifest);
:func:`load` reads with ``allow_pickle=False`` and refuses anything but numeric arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kldwrm_ref.storage import atomic_write, read_json, write_json
from kldwrm_ref.validation import check_output_dir

FORMAT = "kldwrm-trajectory-1"
MANIFEST = "manifest.json"
REQUIRED_STEP = ("theta", "loss", "g", "s")  # what every trajectory holds at every step
REQUIRED_MANIFEST = ("format", "steps", "theta_layout")
NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats


class TrajectoryError(ValueError):
    """A trajectory directory or file is missing a part, is damaged, or breaks the format."""


def step_file(k: int) -> str:
    """The file name of step k."""
    return f"step-{k:05d}.npz"


@dataclasses.dataclass(frozen=True, eq=False)
class Trajectory:
    """``manifest`` (JSON values) and ``steps[k]`` = {quantity: array} of step k; ``==`` is exact
    (same manifest, same quantities with the same dtype, shape and bytes)."""

    manifest: dict[str, Any]
    steps: tuple[dict[str, np.ndarray], ...]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trajectory):
            return NotImplemented
        return self.manifest == other.manifest and len(self.steps) == len(other.steps) and all(_identical(a, b) for a, b in zip(self.steps, other.steps))

    __hash__ = None  # type: ignore[assignment]  # mutable contents


def _identical(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[key].dtype == b[key].dtype and a[key].shape == b[key].shape and a[key].tobytes() == b[key].tobytes() for key in a)


def check_trajectory(trajectory: Trajectory, where: str = "trajectory") -> Trajectory:
    """Check the manifest fields and the per-step quantities every trajectory must hold."""
    manifest = trajectory.manifest
    missing = [field for field in REQUIRED_MANIFEST if field not in manifest]
    if missing:
        raise TrajectoryError(f"{where}: the manifest lacks {missing}; it must hold {list(REQUIRED_MANIFEST)}")
    if manifest["format"] != FORMAT:
        raise TrajectoryError(f"{where}: format {manifest['format']!r} is not {FORMAT!r}")
    if manifest["steps"] != len(trajectory.steps):
        raise TrajectoryError(f"{where}: the manifest promises {manifest['steps']} steps, there are {len(trajectory.steps)}")
    for k, step in enumerate(trajectory.steps):
        missing = [key for key in REQUIRED_STEP if key not in step]
        if missing:
            raise TrajectoryError(f"{where}: step {k} lacks {missing}; every step must hold {list(REQUIRED_STEP)}")
        for key, value in step.items():
            if not isinstance(value, np.ndarray) or value.dtype.kind not in NUMERIC_KINDS:
                raise TrajectoryError(f"{where}: step {k} quantity {key!r} must be a numeric (bool, integer or float) array, got {getattr(value, 'dtype', type(value).__name__)}")
    return trajectory


def save(trajectory: Trajectory, directory: str | os.PathLike) -> Path:
    """Write ``trajectory`` to ``directory`` (created if needed); returns the directory."""
    folder = check_output_dir(directory, "directory")
    check_trajectory(trajectory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # until the new manifest is written the directory reads as incomplete
    for k, step in enumerate(trajectory.steps):
        atomic_write(folder / step_file(k), functools.partial(_write_npz, arrays=step))
    write_json(folder / MANIFEST, trajectory.manifest)
    return folder


def _write_npz(fh: io.BufferedWriter, arrays: Mapping[str, np.ndarray]) -> None:
    np.savez(fh, allow_pickle=False, **arrays)


def _read_step(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {}
            for key in npz.files:
                try:
                    arrays[key] = npz[key]
                except ValueError as error:  # an object array needs pickle
                    raise TrajectoryError(f"{path}: entry {key!r} holds Python objects ({error}); a trajectory holds numeric arrays only and is read with allow_pickle=False") from None
            return arrays
    except FileNotFoundError:
        raise TrajectoryError(f"{path} is missing") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise TrajectoryError(f"{path}: not a readable .npz file ({error})") from None


def load(directory: str | os.PathLike) -> Trajectory:
    """Read the trajectory saved in ``directory`` (any implementation's, in this format)."""
    folder = Path(directory)
    if not (folder / MANIFEST).is_file():
        raise TrajectoryError(f"{folder}: no {MANIFEST} (not a trajectory directory, or an interrupted save)")
    try:
        manifest = read_json(folder / MANIFEST)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrajectoryError(f"{folder / MANIFEST}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("steps"), int) or manifest["steps"] < 0:
        raise TrajectoryError(f"{folder / MANIFEST}: must be a JSON object whose 'steps' is an integer >= 0")
    steps = tuple(_read_step(folder / step_file(k)) for k in range(manifest["steps"]))
    return check_trajectory(Trajectory(manifest, steps), str(folder))


def layout_of(trajectory: Trajectory) -> list[tuple[tuple[int, ...], int]]:
    """(shape, offset) of every tensor of theta, in order (names may differ between implementations)."""
    layout: Sequence[Mapping[str, Any]] = trajectory.manifest["theta_layout"]
    return [(tuple(int(d) for d in t["shape"]), int(t["offset"])) for t in layout]
