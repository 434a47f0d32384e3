"""``kldwrm mnist``, ``kldwrm tune`` and ``kldwrm train``: command lines over the experiment runner.

``kldwrm mnist`` runs (or resumes) a configuration (``--config`` or the quick comparison) with
command-line overrides, serially or in parallel (``--jobs``, ``--scheduler``); ``kldwrm train``
is the short single-seed comparison, the same runner with a one-seed configuration written under
``runs/train``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kldwrm_ref import optim
from kldwrm_ref.backends import BACKENDS
from kldwrm_ref.experiments import parallel, tune
from kldwrm_ref.experiments.config import DTYPES, NAMED_NETWORKS, QUICK, check_fields, read_config, validate_config
from kldwrm_ref.experiments.report import write_summary
from kldwrm_ref.experiments.runner import run_experiment
from kldwrm_ref.model import ACTIVATIONS
from kldwrm_ref.validation import check_output_dir


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


def _parse_architecture(text: str) -> list[int] | str:
    if text in NAMED_NETWORKS:
        return text
    try:
        return [int(part) for part in text.split("-")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"architecture must look like 784-256-10 or be one of {', '.join(NAMED_NETWORKS)}, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> dict:
    cfg = check_fields(read_config(args.config)) if args.config else {}
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
        base = str(cfg.get("description") or ("" if args.config else QUICK["description"]))
        cfg["description"] = base + " (with command-line overrides)"
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kldwrm mnist", description="Resumable multi-seed MNIST experiments; prints and saves a summary table and plots.")
    parser.add_argument("--config", help="experiment JSON (e.g. experiments/paper.json); without it the quick K-FAC vs KLD-WRM comparison")
    parser.add_argument("--name", help="experiment name (output sub-folder)")
    parser.add_argument("--optimizers", nargs="+", choices=optim.NAMES)
    parser.add_argument("--architectures", nargs="+", type=_parse_architecture, metavar="SIZES", help="e.g. 784-256-10 784-32-10 paper-cnn")
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
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="run N runs at a time in worker processes (default 1: serially); needs the 'parallel' extra")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="run the runs on the Dask distributed cluster at ADDRESS (e.g. tcp://host:8786); needs the 'parallel' extra")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be an integer >= 1, got {args.jobs}")
    if args.scheduler and args.jobs > 1:
        parser.error("--jobs and --scheduler exclude each other: the cluster's workers set how many runs run at a time")
    try:
        check_output_dir(args.out, "--out")
        cfg = validate_config(config_from_args(args))
    except (ValueError, OSError) as error:
        parser.error(str(error))
    if args.summary_only:
        print(write_summary(Path(args.out) / cfg["name"], cfg))
        return 0
    if args.jobs > 1 or args.scheduler:
        try:
            parallel.require(args.scheduler)
        except ImportError as error:
            parser.exit(2, f"kldwrm mnist: error: {error}\n")
    run_experiment(cfg, args.out, progress=not args.no_progress, jobs=args.jobs, scheduler=args.scheduler)
    return 0


STAGE_HELP = (
    "tune: the grid only; confirm: rerun each optimiser's top grid points at the confirm budget (protocols with a confirm stage); "
    "final: the final seeds from the selection; all: every stage (default); summary: rebuild tables and plots only"
)


def tune_main(argv: Sequence[str] | None = None) -> int:
    """``kldwrm tune --config experiments/tune-paper.json``: the tuned comparison protocol (docs/protocol.md)."""
    parser = argparse.ArgumentParser(prog="kldwrm tune", description="Tune every optimiser on a validation split with the same grid budget, select, then run the selected settings with many seeds (docs/protocol.md).")
    parser.add_argument("--config", required=True, help="protocol JSON (e.g. experiments/tune-paper.json)")
    parser.add_argument("--out", default="runs", help="output folder (default: runs)")
    parser.add_argument("--stage", choices=tune.STAGES, default="all", help=STAGE_HELP)
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel on this machine (joblib; needs the 'parallel' extra)")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="run the runs on the Dask distributed cluster at ADDRESS; needs the 'parallel' extra")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.scheduler and args.jobs > 1:
        parser.error("--jobs and --scheduler exclude each other: the cluster's workers set how many runs run at a time")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        cfg = tune.validate_protocol(read_config(args.config))
        check_output_dir(args.out, "--out")
        if args.jobs > 1 or args.scheduler:
            parallel.require(args.scheduler)
    except (ValueError, ImportError) as error:
        print(f"kldwrm tune: {error}", file=sys.stderr)
        return 2
    tune.run_protocol(cfg, args.out, args.stage, progress=not args.no_progress, jobs=args.jobs, scheduler=args.scheduler)
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    """``kldwrm train``: one seed, a few epochs, the optimisers side by side (784-H-10 MLP)."""
    parser = argparse.ArgumentParser(prog="kldwrm train", description="Short single-seed MNIST comparison of optimisers (784-H-10 MLP, K-FAC platform); runs under OUT/train.")
    parser.add_argument("--optimizers", nargs="+", default=["kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm"], choices=optim.NAMES)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--platform", choices=optim.PLATFORMS, default="kfac")
    parser.add_argument("--preset", choices=optim.PRESETS, default="paper")
    parser.add_argument("--synthetic", action="store_true", help="synthetic data instead of MNIST (no download)")
    parser.add_argument("--out", default="runs", help="output folder (default: runs)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch < 1 or args.hidden < 1:
        parser.error("--epochs, --batch and --hidden must be >= 1")
    try:
        check_output_dir(args.out, "--out")
    except ValueError as error:
        parser.error(str(error))
    cfg = dict(
        name="train", description=f"single-seed comparison, MLP 784-{args.hidden}-10", optimizers=args.optimizers,
        architectures=[[784, args.hidden, 10]], epochs=args.epochs, seeds=[args.seed], batch=args.batch,
        platform=args.platform, preset=args.preset, data=dict(source="synthetic" if args.synthetic else "mnist"),
    )
    try:
        cfg = validate_config(cfg)
    except ValueError as error:
        parser.error(str(error))
    run_experiment(cfg, args.out, progress=True)
    return 0


def robustness_main(argv: Sequence[str] | None = None) -> int:
    """``kldwrm robustness --config experiments/robustness.json``: the robustness study (docs/protocol.md §9)."""
    from kldwrm_ref.experiments import robustness

    parser = argparse.ArgumentParser(prog="kldwrm robustness", description="Run the robustness sweeps (reusing identical earlier runs) and rebuild the study's summary and heat maps from the files (docs/protocol.md §9).")
    parser.add_argument("--config", required=True, help="study JSON (e.g. experiments/robustness.json)")
    parser.add_argument("--out", default="runs", help="output folder (default: runs)")
    parser.add_argument("--stage", choices=robustness.STAGES, default="summary", help="run: reuse identical earlier runs, train the sweeps in order, then summarise; summary: only rebuild the summary and heat maps from the files (default)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel on this machine (joblib; needs the 'parallel' extra)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.jobs < 1:
            raise ValueError(f"--jobs must be an integer >= 1, got {args.jobs}")
        study, sweeps = robustness.read_study(args.config)
        check_output_dir(args.out, "--out")
        if args.jobs > 1:
            parallel.require(None)
    except (ValueError, ImportError) as error:
        print(f"kldwrm robustness: {error}", file=sys.stderr)
        return 2
    robustness.run_study(study, sweeps, args.out, args.stage, progress=not args.no_progress, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
