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
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

import kldwrm_ref
from kldwrm_ref import optim
from kldwrm_ref.data import load_mnist, synthetic_classification
from kldwrm_ref.experiments.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kldwrm_ref.experiments.config import RunSpec, build_network, expand, input_size, validate_config
from kldwrm_ref.experiments.report import write_summary
from kldwrm_ref.model import Network
from kldwrm_ref.storage import read_csv, read_json, write_bools, write_csv, write_json
from kldwrm_ref.validation import check_positive_int

METRIC_FIELDS = (
    "epoch", "steps", "train_loss", "train_accuracy", "batch_loss", "test_loss", "test_accuracy",
    "wall_time", "epoch_time", "kl_clip_active", "rms_clip_active",
)
# Fields whose change makes an existing run a different run (epochs may grow: the run is extended).
IDENTITY = ("optimizer", "architecture", "activation", "seed", "batch", "platform", "preset", "backend", "dtype", "data", "hyper")


class Dataset(NamedTuple):
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def load_data(data: dict, n_inputs: int, dtype: str) -> Dataset:
    """MNIST (pooled / subset as configured) or the synthetic problem of ``data``."""
    if data["source"] == "synthetic":
        n_train, n_test = data["n_train"] or 2000, data["n_test"] or 500
        X, y = synthetic_classification(n_train + n_test, n_inputs, 10, seed=1234, dtype=dtype)
        return Dataset(X[:n_train], y[:n_train], X[n_train:], y[n_train:])
    mnist = load_mnist(pool=data["pool"], subset=data["subset"], dtype=dtype)
    return Dataset(mnist.X_train, mnist.y_train, mnist.X_test, mnist.y_test)


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
def evaluate(net: Network, theta: np.ndarray, X: np.ndarray, y: np.ndarray, chunk: int = 10000) -> tuple[float, float, np.ndarray]:
    """Mean cross-entropy, accuracy and per-example correctness over all of (X, y), in chunks."""
    loss, correct = 0.0, np.empty(len(y), dtype=bool)
    for start in range(0, len(y), chunk):
        rows = slice(start, start + chunk)
        loss += net.loss(theta, X[rows], y[rows]) * len(y[rows])
        correct[rows] = net.predict(theta, X[rows]) == y[rows]
    return loss / len(y), np.count_nonzero(correct) / len(y), correct


def batches(n: int, batch: int, seed: int, epoch: int):
    """Row indices of each full batch of epoch ``epoch`` (a fresh permutation per (seed, epoch))."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i : i + batch] for i in range(0, n - batch + 1, batch)]


def run_status(run_dir: Path) -> dict | None:
    path = run_dir / "status.json"
    return read_json(path) if path.exists() else None


def _check_same_run(run_dir: Path, config: dict) -> None:
    path = run_dir / "config.json"
    if not path.exists():
        return
    old = read_json(path)["run"]
    new = config["run"]
    changed = [key for key in IDENTITY if old.get(key) != new.get(key)]
    if changed:
        raise ValueError(f"{run_dir} holds a run with different {', '.join(changed)}; choose another --out or delete it")


def _record_divergence(run_dir: Path, epochs_completed: int, step: int, quantity: str, message: str) -> dict:
    status = dict(state="diverged", epochs_completed=epochs_completed, step=step, quantity=quantity, message=message)
    write_json(run_dir / "status.json", status)
    return status


def run_one(spec: RunSpec, data: Dataset, run_dir: Path, progress: bool = True) -> dict:
    """Train (or resume, or skip) one run; returns its final status."""
    run_dir = Path(run_dir)
    net = build_network(spec.architecture, spec.activation, spec.dtype)
    opt = optim.make(spec.optimizer, net, platform=spec.platform, preset=spec.preset, backend=spec.backend, **{"seed": spec.seed, **spec.hyper})
    config = resolved_config(spec, opt)
    _check_same_run(run_dir, config)
    status = run_status(run_dir)
    checkpoint_path = run_dir / "checkpoint.npz"
    if (run_dir / "checkpoint.pkl").exists():
        raise CheckpointError(f"{run_dir / 'checkpoint.pkl'} is a pickle checkpoint of an older kldwrm_ref, which is never unpickled; delete it to restart that run from scratch")
    if status and (status["state"] == "diverged" or (status["state"] == "finished" and status["epochs_completed"] >= spec.epochs)):
        if status["state"] == "finished" and checkpoint_path.exists() and not (run_dir / "test_correct.npz").exists():  # finished before the file existed
            theta, _, scalars = load_checkpoint(checkpoint_path)
            write_bools(run_dir / "test_correct.npz", evaluate(net, theta, data.X_test, data.y_test)[2], epoch=int(scalars["epoch"]))
        return status

    if checkpoint_path.exists():
        theta, state, scalars = load_checkpoint(checkpoint_path)
        epoch, wall_time = int(scalars["epoch"]), float(scalars["wall_time"])
        rows = [r for r in read_csv(run_dir / "metrics.csv") if int(r["epoch"]) <= epoch]
    else:
        theta = net.init(spec.seed)
        state, epoch, wall_time, rows = opt.init(theta), 0, 0.0, []
    write_json(run_dir / "config.json", config)
    write_json(run_dir / "status.json", dict(state="running", epochs_completed=epoch))

    n = len(data.y_train)
    steps_per_epoch = n // spec.batch
    if steps_per_epoch < 1:
        raise ValueError(f"batch ({spec.batch}) must not exceed the number of training examples ({n})")
    bar = tqdm(total=spec.epochs * steps_per_epoch, initial=epoch * steps_per_epoch, desc=spec.label, disable=not progress, leave=False, dynamic_ncols=True)
    try:
        while epoch < spec.epochs:
            epoch += 1
            batch_losses, clips, start = [], dict(kl=0, rms=0), time.perf_counter()
            try:
                for rows_index in batches(n, spec.batch, spec.seed, epoch):
                    theta, state, info = opt.step(theta, state, data.X_train[rows_index], data.y_train[rows_index])
                    batch_losses.append(info["loss"])
                    clips["kl"] += info.get("kl_clip_factor", 1.0) < 1.0
                    clips["rms"] += info.get("rms_clip_factor", 1.0) < 1.0
                    bar.update(1)
            except optim.DivergenceError as error:
                return _record_divergence(run_dir, epoch - 1, error.step, error.quantity, str(error))
            epoch_time = time.perf_counter() - start
            wall_time += epoch_time
            train_loss, train_accuracy, _ = evaluate(net, theta, data.X_train, data.y_train)
            test_loss, test_accuracy, test_correct = evaluate(net, theta, data.X_test, data.y_test)
            if not np.isfinite(test_loss) or not np.isfinite(train_loss):
                return _record_divergence(run_dir, epoch - 1, state.step, "evaluation loss", f"diverged in epoch {epoch}: the evaluation loss is not finite")
            rows.append(dict(
                epoch=epoch, steps=state.step, train_loss=train_loss, train_accuracy=train_accuracy,
                batch_loss=float(np.mean(batch_losses)), test_loss=test_loss, test_accuracy=test_accuracy,
                wall_time=wall_time, epoch_time=epoch_time, kl_clip_active=clips["kl"], rms_clip_active=clips["rms"],
            ))
            write_csv(run_dir / "metrics.csv", rows, METRIC_FIELDS)
            write_bools(run_dir / "test_correct.npz", test_correct, epoch=epoch)
            save_checkpoint(checkpoint_path, theta, state, epoch=epoch, wall_time=wall_time)
            write_json(run_dir / "status.json", dict(state="running", epochs_completed=epoch))
            bar.set_postfix(epoch=epoch, loss=f"{train_loss:.4f}", acc=f"{100 * test_accuracy:.2f}%", time=f"{wall_time:.0f}s")
    finally:
        bar.close()
    status = dict(state="finished", epochs_completed=epoch)
    write_json(run_dir / "status.json", status)
    return status


def status_line(label: str, status: dict) -> str:
    """One line of the sweep's log: a run's label and how it ended."""
    line = f"{label:<40} {status['state']} ({status['epochs_completed']} epochs)"
    return line + f": {status['message']}" if status["state"] == "diverged" else line


@functools.lru_cache(maxsize=2)
def _cached_data(data_json: str, n_inputs: int, dtype: str) -> Dataset:
    return load_data(json.loads(data_json), n_inputs, dtype)


def run_task(spec: RunSpec, run_dir: str) -> tuple[str, dict]:
    """One run in a worker process, loading its data itself (cached per process): (its label, its final status)."""
    data = _cached_data(json.dumps(spec.data, sort_keys=True), input_size(spec.architecture), spec.dtype)
    return spec.label, run_one(spec, data, Path(run_dir), progress=False)


def run_experiment(cfg: dict, out: str | Path, progress: bool = True, log=print, jobs: int = 1, scheduler: str | None = None) -> Path:
    """Run (or resume) every run of ``cfg`` under ``out/<name>``; writes the summary; returns that folder.

    ``jobs > 1`` or a Dask ``scheduler`` address runs the runs in parallel, as :func:`run_task`
    (:mod:`kldwrm_ref.experiments.parallel`); runs keep all their state in their folders, so they
    skip, resume and extend as in a serial sweep.
    """
    cfg = validate_config(cfg)
    check_positive_int(jobs, "jobs")
    root = Path(out) / cfg["name"]
    write_json(root / "experiment.json", cfg)
    if jobs > 1 or scheduler is not None:
        from kldwrm_ref.experiments.parallel import parallel_map

        for label, status in parallel_map(run_task, [(spec, str(root / spec.label)) for spec in expand(cfg)], jobs, scheduler):
            log(status_line(label, status))
    else:
        datasets: dict[int, Dataset] = {}
        for spec in expand(cfg):
            n_inputs = input_size(spec.architecture)
            if n_inputs not in datasets:
                datasets[n_inputs] = load_data(cfg["data"], n_inputs, cfg["dtype"])
            log(status_line(spec.label, run_one(spec, datasets[n_inputs], root / spec.label, progress)))
    log("\n" + write_summary(root, cfg))
    return root
