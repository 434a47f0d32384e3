"""``kldwrm mnist``: resumable multi-seed MNIST experiments.

An experiment is a configuration (a JSON file in ``experiments/`` or the built-in quick
comparison) expanded into runs, one per (architecture, optimiser, seed).  Every run of a seed
starts from the same initialisation ``mlp.init(seed)`` and sees the same batches (epoch e shuffles
with ``default_rng([seed, e])``), so differences between optimisers are paired by seed.

Per run, in ``OUT/<name>/<architecture>/<optimiser>/seed-<s>/``:

- ``config.json``: the resolved configuration (every hyperparameter), package version, git commit;
- ``metrics.csv``: one row per epoch (full-train-set and test loss and accuracy, mean batch loss,
  cumulative training wall time, steps, clip activations);
- ``checkpoint.pkl``: theta and optimiser state after the last finished epoch;
- ``status.json``: ``running``, ``finished`` or ``diverged`` (with the step and quantity).

Every file is written atomically.  Rerunning the same command skips finished and diverged runs
and continues interrupted ones from their checkpoint (a resumed run reproduces the uninterrupted
one exactly); raising ``epochs`` extends finished runs.  The summary (:mod:`kldwrm_ref.report`)
is rebuilt from the files at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

import kldwrm_ref
from kldwrm_ref import optim
from kldwrm_ref.backend import BACKENDS
from kldwrm_ref.data import load_mnist, synthetic_classification
from kldwrm_ref.mlp import ACTIVATIONS, MLP
from kldwrm_ref.storage import load_checkpoint, read_csv, read_json, save_checkpoint, write_csv, write_json
from kldwrm_ref.validation import check_choice, check_positive_int

DTYPES = ("float32", "float64")
DATA_SOURCES = ("mnist", "synthetic")
METRIC_FIELDS = (
    "epoch", "steps", "train_loss", "train_accuracy", "batch_loss", "test_loss", "test_accuracy",
    "wall_time", "epoch_time", "kl_clip_active", "rms_clip_active",
)
# The README's main job: K-FAC against the three KLD-WRM methods, paper preset, 2 seeds, 5 epochs.
QUICK = dict(
    name="quick",
    description="K-FAC vs SO-, Q-, QE-KLD-WRM on MNIST, 784-256-10, authors' hyperparameters, 5 epochs, 2 seeds",
    optimizers=["kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm"],
    architectures=[[784, 256, 10]],
    activation="relu",
    epochs=5,
    seeds=[0, 1],
    batch=512,
    platform="kfac",
    preset="paper",
    backend="auto",
    dtype="float32",
    data=dict(source="mnist", pool=1, subset=None, n_train=None, n_test=None),
    hyper={},
)
# Fields whose change makes an existing run a different run (epochs may grow: the run is extended).
IDENTITY = ("optimizer", "architecture", "activation", "seed", "batch", "platform", "preset", "backend", "dtype", "data", "hyper")


class RunSpec(NamedTuple):
    """One run: an optimiser, an architecture and a seed, with everything they are trained under."""

    optimizer: str
    architecture: tuple[int, ...]
    activation: str
    seed: int
    epochs: int
    batch: int
    platform: str
    preset: str
    backend: str
    dtype: str
    data: dict
    hyper: dict  # overrides of the preset for this optimiser

    @property
    def label(self) -> str:
        return f"{arch_label(self.architecture)}/{self.optimizer}/seed-{self.seed}"


class Dataset(NamedTuple):
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def arch_label(sizes: Sequence[int]) -> str:
    return "-".join(str(int(s)) for s in sizes)


# --------------------------------------------------------------------------------- config
def validate_config(config: dict) -> dict:
    """Fill defaults from :data:`QUICK` and check every field; errors name the field."""
    unknown = set(config) - set(QUICK)
    if unknown:
        raise ValueError(f"unknown configuration field(s) {sorted(unknown)}; accepted: {sorted(QUICK)}")
    cfg = {**copy.deepcopy(QUICK), **copy.deepcopy(config)}
    cfg["data"] = {**QUICK["data"], **cfg["data"]}
    if not cfg["optimizers"]:
        raise ValueError("optimizers must name at least one of " + ", ".join(optim.NAMES))
    for name in cfg["optimizers"]:
        check_choice(name, "optimizers", optim.NAMES)
    check_choice(cfg["activation"], "activation", ACTIVATIONS)
    check_choice(cfg["platform"], "platform", optim.PLATFORMS)
    check_choice(cfg["preset"], "preset", optim.PRESETS)
    check_choice(cfg["backend"], "backend", BACKENDS)
    check_choice(cfg["dtype"], "dtype", DTYPES)
    check_positive_int(cfg["epochs"], "epochs")
    check_positive_int(cfg["batch"], "batch")
    if not cfg["seeds"] or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in cfg["seeds"]):
        raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {cfg['seeds']!r}")
    data = cfg["data"]
    check_choice(data["source"], "data.source", DATA_SOURCES)
    check_positive_int(data["pool"], "data.pool")
    n_inputs = 784 // data["pool"] ** 2 if data["source"] == "mnist" else None
    for sizes in cfg["architectures"]:
        if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"architectures: each must be a list of >= 2 positive layer sizes, got {sizes!r}")
        if n_inputs is not None and sizes[0] != n_inputs:
            raise ValueError(f"architectures: input size {sizes[0]} does not match MNIST pooled by {data['pool']} ({n_inputs} inputs)")
        if sizes[-1] != 10:
            raise ValueError(f"architectures: the output layer must have 10 classes, got {sizes[-1]}")
    for key in cfg["hyper"]:
        if key != "*" and key not in optim.NAMES:
            raise ValueError(f"hyper: keys must be '*' or an optimiser name ({', '.join(optim.NAMES)}), got {key!r}")
    for name in cfg["optimizers"]:  # builds each optimiser once: rejects unknown or out-of-range hyperparameters
        optim.make(name, MLP(cfg["architectures"][0]), platform=cfg["platform"], preset=cfg["preset"], backend="numpy", **_overrides(cfg, name))
    return cfg


def _overrides(cfg: dict, name: str) -> dict:
    return {**cfg["hyper"].get("*", {}), **cfg["hyper"].get(name, {})}


def expand(cfg: dict) -> list[RunSpec]:
    """All runs of a configuration, seed-major so that a partial sweep covers every architecture and optimiser."""
    return [
        RunSpec(name, tuple(sizes), cfg["activation"], seed, cfg["epochs"], cfg["batch"], cfg["platform"], cfg["preset"], cfg["backend"], cfg["dtype"], dict(cfg["data"]), _overrides(cfg, name))
        for seed in cfg["seeds"]
        for sizes in cfg["architectures"]
        for name in cfg["optimizers"]
    ]


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
    hyper = {k: (repr(v) if callable(v) else v) for k, v in opt.hyper.items()}
    return dict(
        run=dict(spec._asdict(), architecture=list(spec.architecture)),
        resolved_hyper=hyper,
        kldwrm_ref_version=kldwrm_ref.__version__,
        git_commit=git_commit(),
        numpy_version=np.__version__,
    )


# ------------------------------------------------------------------------------------ runs
def evaluate(mlp: MLP, theta: np.ndarray, X: np.ndarray, y: np.ndarray, chunk: int = 10000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over all of (X, y), in chunks."""
    loss = correct = 0.0
    for start in range(0, len(y), chunk):
        rows = slice(start, start + chunk)
        loss += mlp.loss(theta, X[rows], y[rows]) * len(y[rows])
        correct += float(np.sum(mlp.predict(theta, X[rows]) == y[rows]))
    return loss / len(y), correct / len(y)


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
    from tqdm import tqdm

    run_dir = Path(run_dir)
    dtype = np.dtype(spec.dtype)
    mlp = MLP(spec.architecture, activation=spec.activation, dtype=dtype)
    opt = optim.make(spec.optimizer, mlp, platform=spec.platform, preset=spec.preset, backend=spec.backend, **spec.hyper)
    config = resolved_config(spec, opt)
    _check_same_run(run_dir, config)
    status = run_status(run_dir)
    if status and (status["state"] == "diverged" or (status["state"] == "finished" and status["epochs_completed"] >= spec.epochs)):
        return status

    checkpoint_path = run_dir / "checkpoint.pkl"
    if checkpoint_path.exists():
        saved = load_checkpoint(checkpoint_path)
        theta, state, epoch, wall_time = saved["theta"], saved["state"], saved["epoch"], saved["wall_time"]
        rows = [r for r in read_csv(run_dir / "metrics.csv") if int(r["epoch"]) <= epoch]
    else:
        theta = mlp.init(spec.seed)
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
            train_loss, train_accuracy = evaluate(mlp, theta, data.X_train, data.y_train)
            test_loss, test_accuracy = evaluate(mlp, theta, data.X_test, data.y_test)
            if not np.isfinite(test_loss) or not np.isfinite(train_loss):
                return _record_divergence(run_dir, epoch - 1, state.step, "evaluation loss", f"diverged in epoch {epoch}: the evaluation loss is not finite")
            rows.append(dict(
                epoch=epoch, steps=state.step, train_loss=train_loss, train_accuracy=train_accuracy,
                batch_loss=float(np.mean(batch_losses)), test_loss=test_loss, test_accuracy=test_accuracy,
                wall_time=wall_time, epoch_time=epoch_time, kl_clip_active=clips["kl"], rms_clip_active=clips["rms"],
            ))
            write_csv(run_dir / "metrics.csv", rows, METRIC_FIELDS)
            save_checkpoint(checkpoint_path, dict(theta=theta, state=state, epoch=epoch, wall_time=wall_time))
            write_json(run_dir / "status.json", dict(state="running", epochs_completed=epoch))
            bar.set_postfix(epoch=epoch, loss=f"{train_loss:.4f}", acc=f"{100 * test_accuracy:.2f}%", time=f"{wall_time:.0f}s")
    finally:
        bar.close()
    status = dict(state="finished", epochs_completed=epoch)
    write_json(run_dir / "status.json", status)
    return status


def run_experiment(cfg: dict, out: str | Path, progress: bool = True, log=print) -> Path:
    """Run (or resume) every run of ``cfg`` under ``out/<name>``; writes the summary; returns that folder."""
    from kldwrm_ref.report import write_summary

    cfg = validate_config(cfg)
    root = Path(out) / cfg["name"]
    write_json(root / "experiment.json", cfg)
    datasets: dict[int, Dataset] = {}
    for spec in expand(cfg):
        n_inputs = spec.architecture[0]
        if n_inputs not in datasets:
            datasets[n_inputs] = load_data(cfg["data"], n_inputs, cfg["dtype"])
        status = run_one(spec, datasets[n_inputs], root / spec.label, progress)
        line = f"{spec.label:<40} {status['state']} ({status['epochs_completed']} epochs)"
        if status["state"] == "diverged":
            line += f": {status['message']}"
        log(line)
    log("\n" + write_summary(root, cfg))
    return root


# ------------------------------------------------------------------------------------- CLI
def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_hyper(items: Sequence[str]) -> dict:
    """``[optimiser.]key=value`` items (values parsed as JSON where they parse) -> config["hyper"]."""
    hyper: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--hyper takes [OPTIMISER.]KEY=VALUE, got {item!r}")
        target, _, name = key.rpartition(".")
        hyper.setdefault(target or "*", {})[name] = _parse_value(value)
    return hyper


def _parse_architecture(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split("-")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"architecture must look like 784-256-10, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> dict:
    cfg = read_json(args.config) if args.config else {}
    overridden = False
    for field in ("name", "optimizers", "architectures", "epochs", "seeds", "batch", "platform", "preset", "backend", "dtype", "activation"):
        value = getattr(args, field)
        if value is not None:
            cfg[field], overridden = value, overridden or field != "name"
    data = dict(cfg.get("data", {}))
    if args.synthetic:
        data["source"], overridden = "synthetic", True
    for field in ("pool", "subset"):
        if getattr(args, field) is not None:
            data[field], overridden = getattr(args, field), True
    cfg["data"] = data
    if args.hyper:
        overridden = True
        merged = dict(cfg.get("hyper", {}))
        for target, values in _parse_hyper(args.hyper).items():
            merged[target] = {**merged.get(target, {}), **values}
        cfg["hyper"] = merged
    if overridden:
        base = cfg.get("description") or ("" if args.config else QUICK["description"])
        cfg["description"] = base + " (with command-line overrides)"
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kldwrm mnist", description="Resumable multi-seed MNIST experiments; prints and saves a summary table and plots.")
    parser.add_argument("--config", help="experiment JSON (e.g. experiments/paper.json); without it the quick K-FAC vs KLD-WRM comparison")
    parser.add_argument("--name", help="experiment name (output sub-folder)")
    parser.add_argument("--optimizers", nargs="+", choices=optim.NAMES)
    parser.add_argument("--architectures", nargs="+", type=_parse_architecture, metavar="SIZES", help="e.g. 784-256-10 784-32-10")
    parser.add_argument("--activation", choices=ACTIVATIONS)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--platform", choices=optim.PLATFORMS)
    parser.add_argument("--preset", choices=optim.PRESETS)
    parser.add_argument("--backend", choices=BACKENDS)
    parser.add_argument("--dtype", choices=DTYPES)
    parser.add_argument("--pool", type=int, help="average-pool MNIST by this factor (4: 7x7 inputs)")
    parser.add_argument("--subset", type=int, help="train on this many random training images")
    parser.add_argument("--synthetic", action="store_true", help="synthetic data instead of MNIST (no download)")
    parser.add_argument("--hyper", action="append", default=[], metavar="[OPT.]KEY=VALUE", help="hyperparameter override, repeatable")
    parser.add_argument("--out", default="runs", help="output folder (default: runs)")
    parser.add_argument("--summary-only", action="store_true", help="rebuild the summary and plots from existing runs")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = validate_config(config_from_args(args))
    except (ValueError, OSError) as error:
        parser.error(str(error))
    if args.summary_only:
        from kldwrm_ref.report import write_summary

        print(write_summary(Path(args.out) / cfg["name"], cfg))
        return 0
    run_experiment(cfg, args.out, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
