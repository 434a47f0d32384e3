"""The robustness study (``kldwrm robustness``; docs/protocol.md §9).

Does a KLD-WRM method train well on a larger part of the step size x damping plane than its
baseline (K-FAC; EA-CM in the exact family)?

- A **sweep** (e.g. ``experiments/robustness-paper.json``) is the tuning stage of a protocol of
  :mod:`kldwrm_ref.experiments.tune` (experiment, validation split, grid, ``tune`` epochs and
  seeds) plus ``baseline``, the success ``threshold`` (final validation accuracy) and a
  ``secondary_threshold``, the earlier protocol folders whose identical finished runs it
  ``reuse``\\ s, and the ``fresh_seeds`` (those no reused run has).  Its runs live under
  ``OUT/<sweep>/tune/...`` like a protocol's tuning runs.
- A **study** (``experiments/robustness.json``) lists the sweeps in the order they run, the Holm
  families (lists of sweep names), and the bootstrap's resamples and seed.

Per run: success = finished every epoch with a finite final validation loss and a final
validation accuracy >= the threshold; a diverged run fails.  Per method: the region fraction
F (succeeding runs / runs) and the width of the step-size interval that trains well (more than
half the seeds succeed) at each damping.  Per method against the baseline, paired by grid point
and seed: the exact McNemar test on the success indicators (b: only the method succeeds, c: only
the baseline), a paired bootstrap interval of F_method - F_baseline stratified by grid point,
Holm over each family, and the decision rule of :func:`decide`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from kldwrm_ref.experiments import tune
from kldwrm_ref.experiments.config import RunSpec, read_config
from kldwrm_ref.experiments.run_folder import CHECKPOINT, EXPORTS
from kldwrm_ref.experiments.runner import IDENTITY, run_tasks
from kldwrm_ref.storage import read_json, write_json
from kldwrm_ref.validation import check_positive_int

SWEEP_FIELDS = dict(baseline=str, threshold=float, secondary_threshold=float, reuse=list, fresh_seeds=list)
STUDY_FIELDS = dict(name=str, description=str, sweeps=list, holm_families=list, bootstrap=dict)
STAGES = ("run",)
ALPHA = 0.05
DECISIONS = ("more robust", "less robust", "no difference shown")


# ----------------------------------------------------------------------------- configuration
def validate_sweep(cfg: dict) -> dict:
    """Check a sweep configuration; errors name the field.  The grid part is checked as the
    tuning stage of a :mod:`tune` protocol (which needs a final stage; a sweep never runs one)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"a sweep configuration must be a JSON object, got {type(cfg).__name__}")
    missing = {"baseline", "threshold"} - set(cfg)
    if missing:
        raise ValueError(f"sweep configuration: missing {sorted(missing)}")
    own = {key: cfg[key] for key in SWEEP_FIELDS if key in cfg}
    for field, value in own.items():
        if not isinstance(value, SWEEP_FIELDS[field]) or isinstance(value, bool):
            raise ValueError(f"{field} must be a JSON {SWEEP_FIELDS[field].__name__}, got {value!r:.60}")
    for field in ("threshold", "secondary_threshold"):
        if field in own and not 0.0 < own[field] <= 1.0:
            raise ValueError(f"{field} must be a validation accuracy in (0, 1], got {own[field]}")
    rest = {key: value for key, value in cfg.items() if key not in SWEEP_FIELDS}
    if "final" in rest or "confirm" in rest:
        raise ValueError("a sweep has no final or confirm stage (fields: the tuning stage of a protocol and " + ", ".join(SWEEP_FIELDS) + ")")
    protocol = tune.validate_protocol({**rest, "final": {"epochs": 1, "seeds": [0]}})
    del protocol["final"]
    optimizers = protocol["experiment"]["optimizers"]
    if own["baseline"] not in optimizers:
        raise ValueError(f"baseline must be one of the sweep's optimizers ({', '.join(optimizers)}), got {own['baseline']!r}")
    for name in optimizers:
        if "step_size" not in tune.grid_axes(protocol, name):
            raise ValueError(f"grid: every optimiser needs a step_size axis; {name!r} has {sorted(tune.grid_axes(protocol, name))}")
        if tune.grid_points(protocol, name) != tune.grid_points(protocol, own["baseline"]):
            raise ValueError(f"grid: every optimiser must share the baseline's grid (the comparison pairs grid points); {name!r} differs")
    if not all(isinstance(path, str) for path in own.get("reuse", [])):
        raise ValueError(f"reuse must be a list of protocol result folders, got {own['reuse']!r}")
    if not set(own.get("fresh_seeds", [])) <= set(protocol["tune"]["seeds"]):
        raise ValueError(f"fresh_seeds must be seeds of tune.seeds {protocol['tune']['seeds']}, got {own['fresh_seeds']}")
    return {**protocol, **own}


def validate_study(cfg: dict) -> dict:
    """Check a study configuration (fields of STUDY_FIELDS); errors name the field."""
    if not isinstance(cfg, dict):
        raise ValueError(f"a study configuration must be a JSON object, got {type(cfg).__name__}")
    missing, unknown = set(STUDY_FIELDS) - {"description"} - set(cfg), set(cfg) - set(STUDY_FIELDS)
    if missing or unknown:
        raise ValueError(f"study configuration: missing {sorted(missing)}, unknown {sorted(unknown)}; fields: {sorted(STUDY_FIELDS)}")
    for field, value in cfg.items():
        if not isinstance(value, STUDY_FIELDS[field]):
            raise ValueError(f"{field} must be a JSON {STUDY_FIELDS[field].__name__}, got {value!r:.60}")
    if not cfg["sweeps"] or not all(isinstance(path, str) for path in cfg["sweeps"]):
        raise ValueError(f"sweeps must be a non-empty list of sweep configuration files, got {cfg['sweeps']!r}")
    bootstrap = cfg["bootstrap"]
    if set(bootstrap) != {"resamples", "seed"}:
        raise ValueError(f"bootstrap must be an object with exactly 'resamples' and 'seed', got {sorted(bootstrap)}")
    check_positive_int(bootstrap["resamples"], "bootstrap.resamples")
    if isinstance(bootstrap["seed"], bool) or not isinstance(bootstrap["seed"], int) or bootstrap["seed"] < 0:
        raise ValueError(f"bootstrap.seed must be an integer >= 0, got {bootstrap['seed']!r}")
    return cfg


def read_study(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """The study of ``path`` and its sweeps (validated), in run order; the Holm families must
    partition the sweeps' names."""
    study = validate_study(read_config(path))
    sweeps = [validate_sweep(read_config(sweep)) for sweep in study["sweeps"]]
    names = [sweep["name"] for sweep in sweeps]
    grouped = [name for family in study["holm_families"] for name in family] if all(isinstance(f, list) for f in study["holm_families"]) else None
    if grouped is None or sorted(grouped) != sorted(names) or len(set(names)) != len(names):
        raise ValueError(f"holm_families must be lists of sweep names that together name each sweep ({', '.join(names)}) once, got {study['holm_families']!r}")
    return study, sweeps


# ------------------------------------------------------------------------------------ runs
def _priority(sweep: dict, point: dict) -> tuple[int, int]:
    """Most informative first: damping's rank (smallest first) plus step size's rank (largest
    first), ties to the smaller damping (docs/protocol.md §9.5)."""
    axes = tune.grid_axes(sweep, sweep["baseline"])
    steps = sorted(axes["step_size"], reverse=True)
    dampings = sorted(axes.get("damping", [None]), key=lambda d: -np.inf if d is None else d)
    d_rank = dampings.index(point.get("damping"))
    return steps.index(point["step_size"]) + d_rank, d_rank


def sweep_runs(sweep: dict, root: Path) -> list[tuple[RunSpec, Path, str, dict]]:
    """(spec, folder, architecture label, point) of every run of the sweep, in run order: grid
    points by :func:`_priority`, then seeds, then optimisers (every started point is paired)."""
    runs = tune.tuning_runs(sweep, root)
    seeds, names = sweep["tune"]["seeds"], sweep["experiment"]["optimizers"]
    return sorted(runs, key=lambda r: (_priority(sweep, r[3]), seeds.index(r[0].seed), names.index(r[0].optimizer)))


def _same_run(config: dict, spec: RunSpec) -> bool:
    """Whether a run folder's ``config.json`` holds the run of ``spec``: the runner's identity
    fields and the epochs."""
    wanted = dict(spec._asdict(), architecture=spec.architecture if isinstance(spec.architecture, str) else list(spec.architecture))
    run = config.get("run", {})
    return all(run.get(key) == wanted[key] for key in (*IDENTITY, "epochs"))


def reuse_runs(sweep: dict, root: Path, log=print) -> int:
    """Copy into the sweep every finished or diverged run of its ``reuse`` folders that is the run
    of the sweep's same folder (:func:`_same_run`), files unchanged; returns how many were copied.
    A run already present in the sweep is left alone."""
    copied = 0
    for spec, run_dir, _, _ in sweep_runs(sweep, root):
        if run_dir.exists():
            continue
        for source_root in sweep.get("reuse", []):
            source = Path(source_root) / run_dir.relative_to(root)
            if not (source / "status.json").exists() or (source / CHECKPOINT).exists() or not (source / "config.json").exists():
                continue
            status = read_json(source / "status.json")
            finished = status["state"] == "finished" and status["epochs_completed"] == spec.epochs
            if not (finished or status["state"] == "diverged") or not _same_run(read_json(source / "config.json"), spec):
                continue
            partial = run_dir.with_name(run_dir.name + ".reuse-partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            for name in EXPORTS:
                if (source / name).exists():
                    shutil.copy2(source / name, partial / name)
            os.replace(partial, run_dir)  # the run appears whole or not at all
            copied += 1
            break
    log(f"{sweep['name']}: {copied} finished runs reused from {', '.join(sweep.get('reuse', [])) or 'nowhere'}")
    return copied


def run_sweep(sweep: dict, out: str | Path, progress: bool = True, log=print, jobs: int = 1) -> None:
    """Reuse, then run (or resume, or skip) every run of ``sweep`` under ``out/<name>``."""
    root = Path(out) / sweep["name"]
    write_json(root / "sweep.json", sweep)
    reuse_runs(sweep, root, log)
    run_tasks([(spec, run_dir) for spec, run_dir, _, _ in sweep_runs(sweep, root)], progress, log, jobs)


def run_study(study: dict, sweeps: list[dict], out: str | Path, stage: str = "run", progress: bool = True, log=print, jobs: int = 1) -> Path:
    """``run``: every sweep in order (reuse, then train).  Returns ``out/<study name>``."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    check_positive_int(jobs, "jobs")
    for sweep in sweeps:
        run_sweep(sweep, out, progress, log, jobs)
    return Path(out) / study["name"]
