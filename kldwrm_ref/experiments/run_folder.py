"""One run's folder: the checkpoint is the record, every other file is an export of it.

``checkpoint.npz`` (:mod:`kldwrm_ref.experiments.checkpoint`; zip members carry CRC-32s, so a
flipped bit or a truncation is detected) holds theta, the optimiser state and the run's record:
its resolved configuration, one array per metric over the finished epochs, which test examples
the last epoch classifies correctly, and its status.  ``config.json``, ``metrics.csv``,
``test_correct.npz`` and ``status.json`` are exports of that record, for people and the summary:
:func:`restore` rewrites any export that is missing or differs from the record (a kill between
two writes, a damaged file) and says so; a damaged checkpoint is renamed ``checkpoint.npz.corrupt``
and the run starts again from scratch.  The checkpoint is written first after each epoch, so a
kill loses at most the epoch in progress.

A folder with exports but no checkpoint holds published results (the committed ``experiments/results``
keep only the exports): :func:`read_exports` checks them and the runner skips the run if it is
complete.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kldwrm_ref.experiments.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kldwrm_ref.optim.state import OptState
from kldwrm_ref.storage import csv_text, json_text, read_bools, write_bools, write_text

METRIC_FIELDS = (
    "epoch", "steps", "train_loss", "train_accuracy", "batch_loss", "test_loss", "test_accuracy",
    "wall_time", "epoch_time", "kl_clip_active", "rms_clip_active",
)
# Runs with a validation split (data.validation > 0) add these columns after METRIC_FIELDS.
VALIDATION_FIELDS = ("val_loss", "val_accuracy")
INTEGER_FIELDS = ("epoch", "steps", "kl_clip_active", "rms_clip_active")
STATES = ("running", "finished", "diverged")
CHECKPOINT = "checkpoint.npz"
EXPORTS = ("config.json", "metrics.csv", "test_correct.npz", "status.json")


class RunFolderError(ValueError):
    """A file of a run folder is damaged or inconsistent."""


class OlderCheckpointError(CheckpointError):
    """A checkpoint without a run record, written by an older kldwrm_ref: refused, not treated as damage."""


class Record(NamedTuple):
    """Everything a run has saved after ``epoch`` finished epochs."""

    theta: np.ndarray
    state: OptState
    config: dict
    rows: list[dict]
    test_correct: np.ndarray | None
    status: dict
    wall_time: float

    @property
    def epoch(self) -> int:
        return len(self.rows)


def metric_fields(validation: bool) -> tuple[str, ...]:
    """The metrics.csv columns of a run without or with a validation split."""
    return METRIC_FIELDS + VALIDATION_FIELDS if validation else METRIC_FIELDS


def _has_validation(record: Record) -> bool:
    return bool(record.config.get("run", {}).get("data", {}).get("validation"))


# ------------------------------------------------------------------------- exports as bytes
def _export_texts(record: Record) -> dict[str, str]:
    fields = metric_fields(_has_validation(record))
    return {"config.json": json_text(record.config), "metrics.csv": csv_text(record.rows, fields), "status.json": json_text(record.status)}


def write_exports(run_dir: Path, record: Record, only: tuple[str, ...] = EXPORTS) -> None:
    for name, text in _export_texts(record).items():
        if name in only:
            write_text(run_dir / name, text)
    if "test_correct.npz" in only and record.test_correct is not None:
        write_bools(run_dir / "test_correct.npz", record.test_correct, epoch=record.epoch)


def save_record(run_dir: Path, record: Record) -> None:
    """Write the checkpoint, then its exports (each atomically)."""
    fields = metric_fields(_has_validation(record))
    history = {field: np.array([row[field] for row in record.rows], dtype=np.int64 if field in INTEGER_FIELDS else np.float64) for field in fields}
    extra: dict = {} if record.test_correct is None else dict(test_correct=np.asarray(record.test_correct, dtype=bool))
    save_checkpoint(
        run_dir / CHECKPOINT, record.theta, record.state, epoch=record.epoch, wall_time=record.wall_time,
        config=np.array(json.dumps(record.config, sort_keys=True)), status=np.array(json.dumps(record.status, sort_keys=True)), history=history, **extra,
    )
    write_exports(run_dir, record)


def load_record(run_dir: Path) -> Record:
    """The record of ``run_dir``'s checkpoint; :class:`CheckpointError` if it is damaged or incomplete."""
    path = run_dir / CHECKPOINT
    theta, state, scalars = load_checkpoint(path)
    missing = {"epoch", "wall_time", "config", "status", "history"} - set(scalars)
    if missing:
        raise OlderCheckpointError(f"{path}: holds no run record ({', '.join(sorted(missing))} missing): written by an older kldwrm_ref, or not by the runner")
    try:
        config, status = json.loads(str(scalars["config"])), json.loads(str(scalars["status"]))
        history = scalars["history"]
        epoch = int(scalars["epoch"])
        fields = metric_fields(bool(config.get("run", {}).get("data", {}).get("validation")))
        rows = [{field: (int if field in INTEGER_FIELDS else float)(history[field][i]) for field in fields} for i in range(epoch)]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: malformed run record ({error!r:.100})") from None
    correct = scalars.get("test_correct")
    if any(len(history[field]) != epoch for field in fields) or (epoch > 0 and correct is None):
        raise CheckpointError(f"{path}: the run record's metrics do not cover its {epoch} epochs")
    _check_status(status, path)
    return Record(theta, state, config, rows, correct, status, float(scalars["wall_time"]))


def _differs(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() != data
    except OSError:
        return True


def restore(run_dir: Path, log) -> Record | None:
    """The record of ``run_dir`` with its exports checked (and rewritten where they differ), or None.

    None: no checkpoint, or a damaged one (renamed ``checkpoint.npz.corrupt``, reported through
    ``log``): the run starts from scratch.
    """
    path = run_dir / CHECKPOINT
    if not path.exists():
        return None
    try:
        record = load_record(run_dir)
    except OlderCheckpointError:
        raise
    except CheckpointError as error:
        os.replace(path, path.with_name(CHECKPOINT + ".corrupt"))
        log(f"{error}; renamed it {CHECKPOINT}.corrupt, the run starts again from scratch")
        return None
    stale = [name for name, text in _export_texts(record).items() if _differs(run_dir / name, text.encode("utf-8"))]
    if record.test_correct is not None and not _bools_match(run_dir / "test_correct.npz", record.test_correct, record.epoch):
        stale.append("test_correct.npz")
    if stale:
        write_exports(run_dir, record, only=tuple(stale))
        log(f"{run_dir}: rewrote {', '.join(stale)} from the checkpoint (missing, damaged, or written before an interruption)")
    return record


def _bools_match(path: Path, values: np.ndarray, epoch: int) -> bool:
    try:
        saved, scalars = read_test_correct(path)
    except RunFolderError:
        return False
    return scalars == dict(epoch=epoch) and np.array_equal(saved, values)


# ------------------------------------------------------------------------- reading exports
def _check_status(status, where) -> None:
    if not isinstance(status, dict) or status.get("state") not in STATES or not isinstance(status.get("epochs_completed"), int) or status["epochs_completed"] < 0:
        raise RunFolderError(f"{where}: not a run status (expected state in {STATES} and a non-negative epochs_completed), got {status!r:.120}")
    if status["state"] == "diverged" and not all(key in status for key in ("step", "quantity", "message")):
        raise RunFolderError(f"{where}: a diverged status needs step, quantity and message")


def read_status(path: Path) -> dict:
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunFolderError(f"{path}: not valid JSON ({error})") from None
    _check_status(status, path)
    return status


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    """The columns of a ``metrics.csv`` (METRIC_FIELDS, then VALIDATION_FIELDS if the run holds out a
    validation split): every field present, numbers finite, epochs 1, 2, ...; else RunFolderError."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RunFolderError(f"{path}: not UTF-8 text ({error})") from None
    reader = csv.DictReader(io.StringIO(text))
    fields = tuple(reader.fieldnames or ())
    if fields not in (metric_fields(False), metric_fields(True)):
        raise RunFolderError(f"{path}: header {reader.fieldnames} is not {list(METRIC_FIELDS)}, optionally followed by {list(VALIDATION_FIELDS)}")
    columns: dict[str, list] = {field: [] for field in fields}
    for line, row in enumerate(reader, start=2):
        if None in row:
            raise RunFolderError(f"{path}, line {line}: more cells than the {len(fields)} of the header")
        for field in fields:
            cell = row.get(field)
            try:
                value = int(cell) if field in INTEGER_FIELDS else float(cell)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise RunFolderError(f"{path}, line {line}: {field} is {cell!r}, not a number") from None
            if not math.isfinite(value):
                raise RunFolderError(f"{path}, line {line}: {field} is {cell}, not finite")
            columns[field].append(value)
    if columns["epoch"] != list(range(1, len(columns["epoch"]) + 1)):
        raise RunFolderError(f"{path}: epochs {columns['epoch'][:10]} are not 1, 2, 3, ...")
    if not text.endswith("\n"):
        raise RunFolderError(f"{path}: the last line is cut off")
    return {field: np.array(values) for field, values in columns.items()}


def read_test_correct(path: Path) -> tuple[np.ndarray, dict[str, int]]:
    """The per-example test correctness of ``test_correct.npz`` and its epoch; RunFolderError if damaged."""
    try:
        return read_bools(path)
    except Exception as error:
        raise RunFolderError(f"{path}: not a readable test_correct file ({type(error).__name__}: {error})") from None


def read_exports(run_dir: Path) -> tuple[dict | None, dict[str, np.ndarray]]:
    """(status or None, metric columns or {}) of a run folder, each checked; RunFolderError if damaged."""
    status = read_status(run_dir / "status.json") if (run_dir / "status.json").exists() else None
    metrics = read_metrics(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else {}
    if status is not None and status["state"] != "running" and len(metrics.get("epoch", ())) != status["epochs_completed"]:
        raise RunFolderError(f"{run_dir}: status.json says {status['epochs_completed']} epochs, metrics.csv holds {len(metrics.get('epoch', ()))}")
    return status, metrics
