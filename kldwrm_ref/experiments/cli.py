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
from kldwrm_ref.validation import CommandParser, check_output_dir


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


JOBS_HELP = (
    "run up to N runs at a time, in min(N, number of runs) local worker processes; N in [1, {cores}] (the CPU cores here; "
    "default 1: serially, in this process); needs the 'parallel' extra"
)
SCHEDULER_HELP = (
    "run the runs on the Dask distributed cluster whose scheduler is at ADDRESS, [tcp://]HOST:PORT (e.g. tcp://10.0.0.5:8786); "
    f"it must answer within {parallel.CONNECT_TIMEOUT_S} s, before anything is written; needs the 'parallel' extra"
)


def _check_parallel(parser: argparse.ArgumentParser, jobs: int, scheduler: str | None) -> None:
    """--jobs and --scheduler: in range, not both, the address well formed, the extra installed (else one line, exit 2)."""
    try:
        parallel.check_jobs(jobs)
        if scheduler is not None:
            parallel.check_address(scheduler)
            if jobs > 1:
                raise ValueError("--jobs and --scheduler exclude each other: the cluster's workers set how many runs run at a time")
        if jobs > 1 or scheduler is not None:
            parallel.require(scheduler)
    except (ValueError, ImportError) as error:
        parser.error(str(error))


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(
        prog="kldwrm mnist",
        description="Resumable multi-seed MNIST experiments; prints and saves a summary table and plots. "
        "Options override the configuration (--config, else the quick comparison: " + ", ".join(f"{key} {QUICK[key]}" for key in ("epochs", "seeds", "batch")) + ").",
    )
    parser.add_argument("--config", help="experiment JSON (e.g. experiments/paper.json); without it the quick K-FAC vs KLD-WRM comparison")
    parser.add_argument("--name", help=f"experiment name: the plain folder name of its results under --out (default: the configuration's; quick: {QUICK['name']})")
    parser.add_argument("--optimizers", nargs="+", choices=optim.NAMES, metavar="NAME", help=f"distinct optimisers, of {', '.join(optim.NAMES)} (default: the configuration's)")
    parser.add_argument("--architectures", nargs="+", type=_parse_architecture, metavar="SIZES", help="distinct networks, e.g. 784-256-10 784-32-10 paper-cnn (default: the configuration's; quick: 784-256-10)")
    parser.add_argument("--activation", choices=ACTIVATIONS, help=f"MLP hidden activation (default: the configuration's; quick: {QUICK['activation']})")
    parser.add_argument("--epochs", type=int, metavar="N", help=f"epochs per run, >= 1 (default: the configuration's; quick: {QUICK['epochs']})")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help=f"distinct seeds >= 0, one run per optimiser and architecture each (default: the configuration's; quick: {' '.join(map(str, QUICK['seeds']))})")
    parser.add_argument("--batch", type=int, metavar="N", help=f"batch size, in [1, training examples] (default: the configuration's; quick: {QUICK['batch']})")
    parser.add_argument("--platform", choices=optim.PLATFORMS, help=f"curvature platform (default: the configuration's; quick: {QUICK['platform']})")
    parser.add_argument("--preset", choices=optim.PRESETS, help=f"hyperparameter preset (default: the configuration's; quick: {QUICK['preset']})")
    parser.add_argument("--backend", choices=BACKENDS, help=f"array backend (default: the configuration's; quick: {QUICK['backend']})")
    parser.add_argument("--dtype", choices=DTYPES, help=f"floating-point type (default: the configuration's; quick: {QUICK['dtype']})")
    parser.add_argument("--pool", type=int, metavar="K", help="MNIST only: average-pool the images by K, which must divide 28 (4: 7x7 inputs; default: the configuration's; quick: 1)")
    parser.add_argument("--subset", type=int, metavar="N", help="MNIST only: train on N random training images, N in [1, 60000] (default: all)")
    parser.add_argument("--synthetic", action="store_true", help="the synthetic problem (2000 training, 500 test examples) instead of MNIST (no download)")
    parser.add_argument("--hyper", action="append", default=[], metavar="[OPT.]KEY=VALUE", help="hyperparameter override, repeatable (default: none)")
    parser.add_argument("--out", default="runs", help="output folder; the results go to OUT/NAME (default: runs)")
    parser.add_argument("--summary-only", action="store_true", help="rebuild the summary and plots from the runs already in OUT/NAME (which must hold an experiment)")
    parser.add_argument("--no-progress", action="store_true", help="one line per finished epoch instead of progress bars")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help=JOBS_HELP.format(cores=parallel.max_jobs()))
    parser.add_argument("--scheduler", metavar="ADDRESS", help=SCHEDULER_HELP)
    args = parser.parse_args(argv)
    _check_parallel(parser, args.jobs, args.scheduler)
    try:
        cfg = validate_config(config_from_args(args))
        check_output_dir(args.out, "--out")
        root = Path(args.out) / cfg["name"]
        if args.summary_only and not (root / "experiment.json").is_file():
            raise ValueError(f"--summary-only: {root} holds no experiment (no experiment.json); run the experiment first, or give its --out and --name")
    except (ValueError, OSError) as error:
        parser.error(str(error))
    if args.summary_only:
        print(write_summary(root, cfg))
        return 0
    run_experiment(cfg, args.out, progress=not args.no_progress, jobs=args.jobs, scheduler=args.scheduler)
    return 0


STAGE_HELP = (
    "tune: the grid only; confirm: rerun each optimiser's top grid points at the confirm budget (protocols with a confirm stage); "
    "final: the final seeds from the selection; all: every stage (default); summary: rebuild tables and plots only"
)


def tune_main(argv: Sequence[str] | None = None) -> int:
    """``kldwrm tune --config experiments/tune-paper.json``: the tuned comparison protocol (docs/protocol.md)."""
    parser = CommandParser(prog="kldwrm tune", description="Tune every optimiser on a validation split with the same grid budget, select, then run the selected settings with many seeds (docs/protocol.md).")
    parser.add_argument("--config", required=True, help="protocol JSON (e.g. experiments/tune-paper.json)")
    parser.add_argument("--out", default="runs", help="output folder (default: runs)")
    parser.add_argument("--stage", choices=tune.STAGES, default="all", help=STAGE_HELP)
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help=JOBS_HELP.format(cores=parallel.max_jobs()))
    parser.add_argument("--scheduler", metavar="ADDRESS", help=SCHEDULER_HELP)
    parser.add_argument("--no-progress", action="store_true", help="one line per finished epoch instead of progress bars")
    args = parser.parse_args(argv)
    _check_parallel(parser, args.jobs, args.scheduler)
    try:
        cfg = tune.validate_protocol(read_config(args.config))
        check_output_dir(args.out, "--out")
        root = Path(args.out) / cfg["name"]
        if args.stage == "summary" and not (root / "protocol.json").is_file():
            raise ValueError(f"--stage summary: {root} holds no protocol run (no protocol.json); run a stage first, or give its --out")
    except ValueError as error:
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    tune.run_protocol(cfg, args.out, args.stage, progress=not args.no_progress, jobs=args.jobs, scheduler=args.scheduler)
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    """``kldwrm train``: one seed, a few epochs, the optimisers side by side (784-H-10 MLP)."""
    parser = CommandParser(prog="kldwrm train", description="Short single-seed MNIST comparison of optimisers (784-H-10 MLP, K-FAC platform); runs under OUT/train.")
    default_optimizers = ["kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm"]
    parser.add_argument(
        "--optimizers", nargs="+", default=default_optimizers, choices=optim.NAMES, metavar="NAME",
        help=f"distinct optimisers, of {', '.join(optim.NAMES)} (default: {' '.join(default_optimizers)})",
    )
    parser.add_argument("--epochs", type=int, default=2, metavar="N", help="epochs, >= 1 (default: 2)")
    parser.add_argument("--batch", type=int, default=512, metavar="N", help="batch size, in [1, training examples] (default: 512)")
    parser.add_argument("--hidden", type=int, default=256, metavar="H", help="hidden width, >= 1 (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed, >= 0 (default: 0)")
    parser.add_argument("--platform", choices=optim.PLATFORMS, default="kfac", help="curvature platform (default: kfac)")
    parser.add_argument("--preset", choices=optim.PRESETS, default="paper", help="hyperparameter preset (default: paper)")
    parser.add_argument("--synthetic", action="store_true", help="the synthetic problem (2000 training examples) instead of MNIST (no download)")
    parser.add_argument("--out", default="runs", help="output folder; the runs go to OUT/train (default: runs)")
    args = parser.parse_args(argv)
    cfg = dict(
        name="train", description=f"single-seed comparison, MLP 784-{args.hidden}-10", optimizers=args.optimizers,
        architectures=[[784, args.hidden, 10]], epochs=args.epochs, seeds=[args.seed], batch=args.batch,
        platform=args.platform, preset=args.preset, data=dict(source="synthetic" if args.synthetic else "mnist"),
    )
    try:
        if args.hidden < 1:
            raise ValueError(f"--hidden must be an integer >= 1, got {args.hidden}")
        if args.seed < 0:
            raise ValueError(f"--seed must be an integer >= 0, got {args.seed}")
        cfg = validate_config(cfg)
        check_output_dir(args.out, "--out")
    except ValueError as error:
        parser.error(str(error))
    run_experiment(cfg, args.out, progress=True)
    return 0


def robustness_main(argv: Sequence[str] | None = None) -> int:
    """``kldwrm robustness --config experiments/robustness.json``: the robustness study (docs/protocol.md §9)."""
    from kldwrm_ref.experiments import robustness

    parser = CommandParser(prog="kldwrm robustness", description="Run the robustness sweeps (reusing identical earlier runs) and rebuild the study's summary and heat maps from the files (docs/protocol.md §9).")
    parser.add_argument("--config", required=True, help="study JSON (e.g. experiments/robustness.json)")
    parser.add_argument("--out", default="runs", help="output folder (default: runs)")
    parser.add_argument("--stage", choices=robustness.STAGES, default="summary", help="run: reuse identical earlier runs, train the sweeps in order, then summarise; summary: only rebuild the summary and heat maps from the files (default)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help=JOBS_HELP.format(cores=parallel.max_jobs()))
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    _check_parallel(parser, args.jobs, None)
    try:
        study, sweeps = robustness.read_study(args.config)
        check_output_dir(args.out, "--out")
    except ValueError as error:
        parser.error(str(error))
    robustness.run_study(study, sweeps, args.out, args.stage, progress=not args.no_progress, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
