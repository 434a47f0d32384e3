"""The trajectory format on disk: a directory with ``manifest.json`` and one ``step-NNNNN.npz`` per
step (docs/trajectory-format.md).

In memory a :class:`Trajectory` is the manifest (plain JSON values) and, per step, a flat mapping
of quantity name -> numeric array, exactly what the step's ``.npz`` holds.  :func:`save` writes
a complete directory beside the target and then moves it into place (compressed ``.npz`` files);
:func:`load` reads with ``allow_pickle=False`` and refuses anything but numeric arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kldwrm_ref.storage import atomic_write, read_json, write_json
from kldwrm_ref.validation import check_output_dir

FORMAT = "kldwrm-trajectory-1"
MANIFEST = "manifest.json"
# Every quantity's family (the first dotted part of its name) in pipeline order: the order of the
# comparison, so that the first failure is the earliest computation that differs.
QUANTITIES = (
    "X", "y", "dropout", "theta", "alpha", "loss", "g", "refreshed", "mc_uniforms", "current", "averaged", "damping", "pi", "eigen",
    "ghat", "d", "v_unclipped", "rms_clip_factors", "kl_clip_factor", "v", "s_q", "inner_steps", "s",
)
REQUIRED_STEP = ("theta", "loss", "g", "s")  # what every trajectory holds at every step
REQUIRED_MANIFEST = ("format", "steps", "theta_layout")
NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats
_TRAJECTORY_ENTRY = re.compile(r"^(manifest\.json|step-\d{5,}\.npz|\..*\.tmp)$")  # what a saved or interrupted trajectory holds


class TrajectoryError(ValueError):
    """A trajectory directory or file is missing a part, is damaged, or breaks the format."""


def family(key: str) -> str:
    """The first dotted part of a quantity's name (``averaged.0.A`` -> ``averaged``)."""
    return key.split(".", 1)[0]


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
    layout = manifest["theta_layout"]
    if not isinstance(layout, list) or not all(isinstance(t, dict) and isinstance(t.get("shape"), list) and isinstance(t.get("offset"), int) for t in layout):
        raise TrajectoryError(f"{where}: theta_layout must be a list of objects, each with a 'shape' (a list of integers) and an 'offset' (an integer)")
    for k, step in enumerate(trajectory.steps):
        missing = [key for key in REQUIRED_STEP if key not in step]
        if missing:
            raise TrajectoryError(f"{where}: step {k} lacks {missing}; every step must hold {list(REQUIRED_STEP)}")
        for key, value in step.items():
            if not isinstance(value, np.ndarray) or value.dtype.kind not in NUMERIC_KINDS:
                raise TrajectoryError(f"{where}: step {k} quantity {key!r} must be a numeric (bool, integer or float) array, got {getattr(value, 'dtype', type(value).__name__)}")
    return trajectory


def check_destination(directory: str | os.PathLike, name: str = "directory", probe: bool = False) -> Path:
    """``directory`` if a trajectory can be saved there: new, empty, or holding a trajectory (which
    :func:`save` replaces); anything else in it is refused, so that no other file is overwritten.
    ``probe``: also create its parent and a staging directory there (removed again), so that a
    place that cannot be written is refused before a long run rather than after it."""
    folder = Path(os.path.abspath(check_output_dir(directory, name)))  # "." too has a parent to stage in
    if folder.is_dir():
        foreign = sorted(entry.name for entry in folder.iterdir() if not _TRAJECTORY_ENTRY.match(entry.name))
        if foreign:
            raise TrajectoryError(f"{name} {str(directory)!r} holds files that are not part of a trajectory ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose a new or empty directory")
    if probe:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            os.rmdir(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".staging"))
        except OSError as error:
            raise TrajectoryError(f"{name} {str(directory)!r} cannot be written ({error.strerror or error})") from None
    return folder


def save(trajectory: Trajectory, directory: str | os.PathLike) -> Path:
    """Write ``trajectory`` to ``directory`` and return it: the files are written into a staging
    directory beside it, which then replaces ``directory`` (new, empty, or an older trajectory,
    :func:`check_destination`), so no step file of an older trajectory survives beside the new ones.
    Each step is a compressed ``.npz`` written without pickle."""
    folder = check_destination(directory)
    check_trajectory(trajectory)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".staging"))
    try:
        for k, step in enumerate(trajectory.steps):
            atomic_write(staging / step_file(k), functools.partial(_write_npz, arrays=step))
        write_json(staging / MANIFEST, trajectory.manifest)
        _replace_directory(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _replace_directory(new: Path, folder: Path) -> None:
    """Move ``new`` to ``folder``: one rename when ``folder`` is absent or empty; otherwise the old
    one is first renamed aside (``.NAME.<pid>.old``) and removed after, so an interrupt leaves the
    old trajectory (in ``folder``, or aside) or the new one, never a mix."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    if not folder.exists():
        os.replace(new, folder)
        return
    aside = folder.with_name(f".{folder.name}.{os.getpid()}.old")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, aside)
    os.replace(new, folder)
    shutil.rmtree(aside, ignore_errors=True)


def _write_npz(fh: io.BufferedWriter, arrays: Mapping[str, np.ndarray]) -> None:
    np.savez_compressed(fh, allow_pickle=False, **arrays)


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """The size of ``arrays`` saved as one step file (compressed, as :func:`save` writes it)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, allow_pickle=False, **arrays)
    return buffer.getbuffer().nbytes


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
    except (OSError, EOFError, NotImplementedError, zipfile.BadZipFile) as error:  # NotImplementedError: a damaged header naming an unknown compression
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
