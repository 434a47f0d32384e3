"""The experiment runner: the one training loop of the project (``kldwrm mnist``, ``kldwrm train``).

Runs come from :func:`kldwrm_ref.experiments.config.expand`.  Every run of a seed
starts from the same initialisation ``net.init(seed)`` and sees the same batches (epoch e shuffles
with ``default_rng([seed, e])``), so differences between optimisers are paired by seed.

Per run, in ``OUT/<name>/<architecture>/<optimiser>/seed-<s>/``:

- ``config.json``: the resolved configuration (every hyperparameter), package version, git commit;
- ``metrics.csv``: one row per epoch (full-train-set and test loss and accuracy, mean batch loss,
  cumulative training wall time, steps, clip activations);
- ``checkpoint.npz``: theta and optimiser state after the last finished epoch (plain arrays and a
  JSON tree, no pickle: :mod:`kldwrm_ref.experiments.checkpoint`);
- ``test_correct.npz``: which test examples the parameters of the last finished epoch classify
  correctly (bit-packed, with that ``epoch``), for the McNemar tests of the summary;
- ``status.json``: ``running``, ``finished`` or ``diverged`` (with the step and quantity).

Every file is written atomically.  Rerunning the same command skips finished and diverged runs
and continues interrupted ones from their checkpoint (a resumed run reproduces the uninterrupted
one exactly); raising ``epochs`` extends finished runs.  The summary (:mod:`kldwrm_ref.experiments.report`)
is rebuilt from the files at the end.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

import kldwrm_ref
from kldwrm_ref import optim
from kldwrm_ref.data import load_mnist, raw_mnist, synthetic_classification
from kldwrm_ref.experiments.checkpoint import CheckpointError
from kldwrm_ref.experiments.config import SYNTHETIC_SIZES, RunSpec, build_network, expand, input_size, validate_config
from kldwrm_ref.experiments.lock import LockHeld, acquire_run_lock
from kldwrm_ref.experiments.report import write_summary
from kldwrm_ref.experiments.run_folder import CHECKPOINT, EXPORTS, METRIC_FIELDS, Record, RunFolderError, read_exports, restore, save_record
from kldwrm_ref.experiments.trainers import Trainer
from kldwrm_ref.storage import read_json, remove_stale_temporaries, write_json
from kldwrm_ref.validation import check_positive_int

__all__ = ["METRIC_FIELDS", "check_ready", "run_experiment", "run_one", "run_task", "run_tasks"]
# Fields whose change makes an existing run a different run (epochs may grow: the run is extended).
IDENTITY = ("optimizer", "architecture", "activation", "seed", "batch", "platform", "preset", "backend", "dtype", "data", "hyper")


class Dataset(NamedTuple):
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    X_val: np.ndarray | None = None  # the held-out validation split (data.validation > 0)
    y_val: np.ndarray | None = None


def load_data(data: dict, n_inputs: int, dtype: str) -> Dataset:
    """MNIST (pooled / subset as configured) or the synthetic problem of ``data``; with
    ``data["validation"] = v > 0`` the last v training examples are held out as the validation split."""
    validation = data.get("validation", 0)
    if data["source"] == "synthetic":
        n_train, n_test = data["n_train"] or SYNTHETIC_SIZES["n_train"], data["n_test"] or SYNTHETIC_SIZES["n_test"]
        X, y = synthetic_classification(n_train + n_test, n_inputs, 10, seed=1234, dtype=dtype)
        if not validation < n_train:
            raise ValueError(f"data.validation must be below the {n_train} synthetic training examples, got {validation}")
        kept = n_train - validation
        held_out = (X[kept:n_train], y[kept:n_train]) if validation else (None, None)
        return Dataset(X[:kept], y[:kept], X[n_train:], y[n_train:], *held_out)
    mnist = load_mnist(pool=data["pool"], subset=data["subset"], validation=validation, dtype=dtype)
    return Dataset(mnist.X_train, mnist.y_train, mnist.X_test, mnist.y_test, mnist.X_val, mnist.y_val)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def resolved_config(spec: RunSpec, opt: optim.Optimizer) -> dict:
    return dict(
        run=dict(spec._asdict(), architecture=spec.architecture if isinstance(spec.architecture, str) else list(spec.architecture)),
        resolved_hyper=opt.describe(),
        kldwrm_ref_version=kldwrm_ref.__version__,
        git_commit=git_commit(),
        numpy_version=np.__version__,
    )


# ------------------------------------------------------------------------------------ runs
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of epoch ``epoch``: a fresh permutation per (seed, epoch); batch i is rows
    [i * batch, (i + 1) * batch) of it, and a trailing partial batch is dropped."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class _EpochLog:
    """Called with every step's info: batch losses, clip activations, the progress bar."""

    def __init__(self, bar) -> None:
        self.bar, self.kl_clipped, self.rms_clipped = bar, 0, 0
        self.losses: list[float] = []

    def __call__(self, info: dict) -> None:
        self.losses.append(info["loss"])
        self.kl_clipped += info.get("kl_clip_factor", 1.0) < 1.0
        self.rms_clipped += info.get("rms_clip_factor", 1.0) < 1.0
        self.bar.update(1)


def _changed(old: dict, config: dict) -> list[str]:
    """The identity fields in which the run of ``old`` differs from that of ``config``."""
    return [key for key in IDENTITY if old.get("run", {}).get(key) != config["run"].get(key)]


def _check_same_run(run_dir: Path, old: dict, config: dict) -> None:
    changed = _changed(old, config)
    if changed:
        raise ValueError(f"{run_dir} holds a run with different {', '.join(changed)}; choose another --out or delete it")


def _published(run_dir: Path, spec: RunSpec, config: dict, log) -> dict | None:
    """The status of a run folder that holds exports but no checkpoint, if it is complete; else None.

    Damaged exports are renamed ``<name>.corrupt`` (reported through ``log``); the run starts from scratch.
    """
    try:
        status, _ = read_exports(run_dir)
    except RunFolderError as error:
        for name in EXPORTS:
            if (run_dir / name).exists():
                os.replace(run_dir / name, run_dir / f"{name}.corrupt")
        log(f"{error}; renamed the run's files *.corrupt, the run starts again from scratch")
        return None
    if status is None or (status["state"] == "running" and status["epochs_completed"] == 0):
        return None  # nothing was trained: a run of another setting is replaced
    if (run_dir / "config.json").exists():
        _check_same_run(run_dir, read_json(run_dir / "config.json"), config)
    if status["state"] == "running":
        return None
    if status["state"] == "finished" and status["epochs_completed"] < spec.epochs:
        raise ValueError(f"{run_dir} holds {status['epochs_completed']} finished epochs but no checkpoint to extend them to {spec.epochs}")
    return status


def run_one(spec: RunSpec, data: Dataset, run_dir: Path, progress: bool = True, log=print) -> dict:
    """Train (or resume, or skip) one run; returns its final status.

    The run folder is locked for the duration (:mod:`kldwrm_ref.experiments.lock`): a run locked by
    another live process is skipped, with state ``locked`` in the returned status.  Without
    ``progress`` each finished epoch is logged as one line.
    """
    run_dir = Path(run_dir)
    if (run_dir / "checkpoint.pkl").exists():
        raise CheckpointError(f"{run_dir / 'checkpoint.pkl'} is a pickle checkpoint of an older kldwrm_ref, which is never unpickled; delete it to restart that run from scratch")
    try:
        lock = acquire_run_lock(run_dir)
    except LockHeld as held:
        return dict(state="locked", epochs_completed=0, message=str(held))
    with lock:
        remove_stale_temporaries(run_dir)
        return _train(spec, data, run_dir, progress, log)


def _train(spec: RunSpec, data: Dataset, run_dir: Path, progress: bool, log) -> dict:
    n = len(data.y_train)
    steps_per_epoch = n // spec.batch
    if steps_per_epoch < 1:  # validate_config refuses such sizes; this guards direct callers, before any file is written
        raise ValueError(f"batch ({spec.batch}) must not exceed the number of training examples ({n})")
    net = build_network(spec.architecture, spec.activation, spec.dtype)
    opt = optim.make(spec.optimizer, net, platform=spec.platform, preset=spec.preset, backend=spec.backend, **{"seed": spec.seed, **spec.hyper})
    config = resolved_config(spec, opt)
    had_checkpoint = (run_dir / CHECKPOINT).exists()
    restored = restore(run_dir, log)
    if not had_checkpoint and (published := _published(run_dir, spec, config, log)) is not None:
        return published
    if restored is not None and restored.epoch == 0 and restored.status["state"] == "running" and _changed(restored.config, config):
        log(f"{run_dir}: replacing a run of different {', '.join(_changed(restored.config, config))} that had not finished an epoch")
        restored = None
    if restored is not None:
        _check_same_run(run_dir, restored.config, config)
        if restored.status["state"] == "diverged" or (restored.status["state"] == "finished" and restored.epoch >= spec.epochs):
            return restored.status
        record = restored._replace(config=config, status=dict(state="running", epochs_completed=restored.epoch))
    else:
        theta = net.init(spec.seed)
        record = Record(theta, opt.init(theta), config, [], None, dict(state="running", epochs_completed=0), 0.0)
    save_record(run_dir, record)
    epoch = record.epoch
    trainer = Trainer(opt, net, spec.batch)
    trainer.start(record.theta, record.state, data.X_train, data.y_train)

    def diverged(step: int, quantity: str, message: str) -> dict:
        status = dict(state="diverged", epochs_completed=record.epoch, step=step, quantity=quantity, message=message)
        save_record(run_dir, record._replace(status=status))  # the last good epoch's parameters, with the verdict
        return status

    bar = tqdm(total=spec.epochs * steps_per_epoch, initial=epoch * steps_per_epoch, desc=spec.label, disable=not progress, leave=False, dynamic_ncols=True)
    try:
        while epoch < spec.epochs:
            epoch += 1
            steps, start = _EpochLog(bar), time.perf_counter()
            try:
                trainer.run_epoch(epoch_order(n, spec.seed, epoch), steps)
            except optim.DivergenceError as error:
                return diverged(error.step, error.quantity, str(error))
            epoch_time = time.perf_counter() - start
            theta, state = trainer.snapshot()
            train_loss, train_accuracy, _ = trainer.evaluate(data.X_train, data.y_train)
            test_loss, test_accuracy, test_correct = trainer.evaluate(data.X_test, data.y_test)
            row = dict(
                epoch=epoch, steps=state.step, train_loss=train_loss, train_accuracy=train_accuracy,
                batch_loss=float(np.mean(steps.losses)), test_loss=test_loss, test_accuracy=test_accuracy,
                wall_time=record.wall_time + epoch_time, epoch_time=epoch_time, kl_clip_active=steps.kl_clipped, rms_clip_active=steps.rms_clipped,
            )
            if data.X_val is not None and data.y_val is not None:
                row["val_loss"], row["val_accuracy"], _ = trainer.evaluate(data.X_val, data.y_val)
            if not all(np.isfinite(row[key]) for key in ("train_loss", "test_loss", "val_loss") if key in row):
                return diverged(state.step, "evaluation loss", f"diverged in epoch {epoch}: the evaluation loss is not finite")
            finished = epoch == spec.epochs
            status = dict(state="finished" if finished else "running", epochs_completed=epoch)
            record = Record(theta, state, config, record.rows + [row], test_correct, status, record.wall_time + epoch_time)
            save_record(run_dir, record)
            bar.set_postfix(epoch=epoch, loss=f"{train_loss:.4f}", acc=f"{100 * row.get('val_accuracy', test_accuracy):.2f}%", time=f"{record.wall_time:.0f}s")
            if not progress:
                held_out = f"validation accuracy {100 * row['val_accuracy']:.2f}%" if "val_accuracy" in row else f"test accuracy {100 * test_accuracy:.2f}%"
                log(f"{spec.label}: epoch {epoch}/{spec.epochs}, train loss {train_loss:.4f}, {held_out}, {epoch_time:.1f} s")
    finally:
        bar.close()
    return record.status


def status_line(label: str, status: dict) -> str:
    """One line of the sweep's log: a run's label and how it ended."""
    line = f"{label:<40} {status['state']} ({status['epochs_completed']} epochs)"
    return line + f": {status['message']}" if "message" in status else line


@functools.lru_cache(maxsize=2)
def _cached_data(data_json: str, n_inputs: int, dtype: str) -> Dataset:
    return load_data(json.loads(data_json), n_inputs, dtype)


def run_task(spec: RunSpec, run_dir: str) -> tuple[str, dict]:
    """One run in a worker process, loading its data itself (cached per process): (its folder, its final status)."""
    data = _cached_data(json.dumps(spec.data, sort_keys=True), input_size(spec.architecture), spec.dtype)
    return run_dir, run_one(spec, data, Path(run_dir), progress=False)


def run_tasks(tasks: list[tuple[RunSpec, Path]], progress: bool = True, log=print, jobs: int = 1, scheduler: str | None = None) -> dict[str, dict]:
    """Run (or resume, or skip) each (spec, run folder) of ``tasks``; returns each folder's final status.

    ``jobs > 1`` runs them in min(jobs, number of runs) local worker processes, a Dask ``scheduler``
    address on that cluster, each as :func:`run_task` (:mod:`kldwrm_ref.experiments.parallel`);
    runs keep all their state in their folders, so they skip, resume and extend as in a serial run.
    """
    check_positive_int(jobs, "jobs")
    statuses = {}
    if scheduler is not None or min(jobs, len(tasks)) > 1:
        from kldwrm_ref.experiments.parallel import parallel_map

        labels = {str(run_dir): spec.label for spec, run_dir in tasks}
        for run_dir, status in parallel_map(run_task, [(spec, str(run_dir)) for spec, run_dir in tasks], min(jobs, len(tasks)), scheduler):
            statuses[run_dir] = status
            log(status_line(labels[run_dir], status))
        return statuses
    for spec, run_dir in tasks:
        data = _cached_data(json.dumps(spec.data, sort_keys=True), input_size(spec.architecture), spec.dtype)
        statuses[str(run_dir)] = status = run_one(spec, data, Path(run_dir), progress, log)
        log(status_line(spec.label, status))
    return statuses


def check_ready(specs: list[RunSpec], jobs: int = 1, scheduler: str | None = None) -> None:
    """Before a sweep writes anything: the Dask ``scheduler`` answers, or else the data of every
    run can be loaded here (MNIST found and verified; a serial sweep keeps it cached for its runs;
    the workers of a cluster read the data of their own machines)."""
    if scheduler is not None:
        from kldwrm_ref.experiments.parallel import check_scheduler

        check_scheduler(scheduler)
    elif min(jobs, len(specs)) <= 1:
        for spec in specs:
            _cached_data(json.dumps(spec.data, sort_keys=True), input_size(spec.architecture), spec.dtype)
    elif any(spec.data["source"] == "mnist" for spec in specs):
        raw_mnist()  # local workers load their own copies


def run_experiment(cfg: dict, out: str | Path, progress: bool = True, log=print, jobs: int = 1, scheduler: str | None = None) -> Path:
    """Run (or resume) every run of ``cfg`` under ``out/<name>`` (:func:`run_tasks`); writes the
    summary; returns that folder.  Nothing is written before the configuration, the data and the
    scheduler have been checked (:func:`check_ready`)."""
    cfg = validate_config(cfg)
    check_positive_int(jobs, "jobs")
    specs = expand(cfg)
    check_ready(specs, jobs, scheduler)
    root = Path(out) / cfg["name"]
    write_json(root / "experiment.json", cfg)
    remove_stale_temporaries(root)
    run_tasks([(spec, root / spec.label) for spec in specs], progress, log, jobs, scheduler)
    log("\n" + write_summary(root, cfg))
    return root
