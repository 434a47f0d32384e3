"""``kldwrm bench interleave``: two versions of the code timed side by side, with a paired interval.

On a shared machine a step's time drifts between modes (docs/performance.md, "Timing noise"), so a
before/after claim compares runs made one right after the other.  For each repetition and
optimiser, one fresh process per source tree runs :func:`~kldwrm_ref.bench.step.time_steps`, the
two in turn, alternating which goes first; a first, untimed pair per optimiser fills each tree's
Numba cache.  Each pair gives a ratio after / before per quantity (the median step between
refreshes, the mean refresh step, the amortised mean); the summary is the ratios' geometric mean
with the t interval of the mean log ratio (``scipy.stats.ttest_1samp``).  An even number of pairs
balances which checkout runs first.

A source tree is a checkout of this project (a ``git worktree`` of an older commit) whose
``time_steps`` takes (name, platform, preset, dtype, backend, architecture, batch); each child
process reports which ``kldwrm_ref`` it imported, and a run from the wrong tree is refused.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from scipy import stats

from kldwrm_ref import optim
from kldwrm_ref.bench.step import _architecture
from kldwrm_ref.storage import write_json
from kldwrm_ref.validation import CommandParser, check_output_file

QUANTITIES = ("median_non_refresh_s", "refresh_s", "mean_s")
TREES = ("before", "after")

# The child: time one optimiser in a fresh process and print what time_steps measured, as JSON.
CHILD = """
import json, sys
import numpy as np
import kldwrm_ref
from kldwrm_ref.bench.step import time_steps
job = json.loads(sys.argv[1])
arch = job["architecture"] if isinstance(job["architecture"], str) else tuple(job["architecture"])
result = time_steps(job["name"], "kfac", job["preset"], np.dtype(job["dtype"]), job["backend"], arch, job["batch"])
print(json.dumps({"source": kldwrm_ref.__file__, **{key: result[key] for key in json.loads(sys.argv[2])}}))
"""


class Job(NamedTuple):
    """What one child process times (the K-FAC platform, as the comparisons with the authors)."""

    name: str
    architecture: Any  # MLP sizes or a named network
    preset: str = "paper"
    dtype: str = "float32"
    backend: str = "auto"
    batch: int = 512


def check_tree(path: str | os.PathLike, name: str) -> Path:
    """A checkout of this project: a folder holding ``kldwrm_ref/bench/step.py``."""
    tree = Path(path).resolve()
    if not (tree / "kldwrm_ref" / "bench" / "step.py").is_file():
        raise ValueError(f"{name} {str(path)!r} is not a checkout of kldwrm_ref (no kldwrm_ref/bench/step.py in it)")
    return tree


def run_in_tree(tree: Path, job: Job, timeout_s: float = 1800.0) -> dict[str, float]:
    """Time ``job`` in a fresh Python process that imports ``kldwrm_ref`` from ``tree``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])]))
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job._asdict()), json.dumps(QUANTITIES)], cwd=tree, env=env, capture_output=True, text=True, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"timing {job.name} in {tree} took more than {timeout_s:g} s") from error
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        errors = [line for line in lines if "Error" in line]
        raise RuntimeError(f"timing {job.name} in {tree} failed (exit {done.returncode}): {(errors or lines or ['no message'])[-1]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    source = Path(report.pop("source")).resolve()
    if source.parent.parent != tree:
        raise RuntimeError(f"the child meant for {tree} imported kldwrm_ref from {source.parent}")
    return report


def interleave(trees: dict[str, Path], jobs: Sequence[Job], reps: int, run: Callable[[Path, Job], dict[str, float]] = run_in_tree, progress: Callable[[str], None] | None = None, records: list[dict] | None = None) -> list[dict]:
    """Records {rep, name, tree, times} of ``reps`` timed pairs per job after one untimed pair;
    in pair r the "before" tree runs first when r is odd, the "after" tree when r is even.  Each
    record is appended to ``records`` (when given) as soon as it is measured."""
    records = [] if records is None else records
    for rep in range(reps + 1):
        for job in jobs:
            order = TREES if rep % 2 == 1 else TREES[::-1]
            for which in order:
                times = run(trees[which], job)
                if rep:
                    records.append(dict(rep=rep, name=job.name, tree=which, times=times))
                    if progress:
                        progress(f"{rep}/{reps} {job.name:11s} {which:6s} " + " ".join(f"{key} {1e3 * times[key]:.2f} ms" for key in QUANTITIES))
    return records


class Ratio(NamedTuple):
    """after / before over n pairs: the geometric mean of the pairs' ratios and its interval."""

    n: int
    ratio: float
    ci_low: float
    ci_high: float
    before_median_s: float
    after_median_s: float


def summarise(records: Sequence[dict], alpha: float = 0.05) -> dict[str, dict[str, Ratio]]:
    """Per optimiser and quantity, the paired after / before ratio (pairs with a NaN, such as the
    refresh step of SGD, left out)."""
    pairs: dict[str, dict[int, dict[str, dict[str, float]]]] = {}
    for record in records:
        pairs.setdefault(record["name"], {}).setdefault(record["rep"], {})[record["tree"]] = record["times"]
    summary: dict[str, dict[str, Ratio]] = {}
    for name, by_rep in pairs.items():
        summary[name] = {}
        for key in QUANTITIES:
            both = [(p["before"][key], p["after"][key]) for p in by_rep.values() if len(p) == 2 and all(math.isfinite(t[key]) and t[key] > 0 for t in p.values())]
            if not both:
                continue
            logs = [math.log(a / b) for b, a in both]
            low = high = math.nan
            if len(logs) >= 2 and max(logs) > min(logs):
                interval = stats.ttest_1samp(logs, 0.0).confidence_interval(1.0 - alpha)
                low, high = math.exp(interval.low), math.exp(interval.high)
            elif len(logs) >= 2:
                low = high = math.exp(logs[0])
            summary[name][key] = Ratio(len(both), math.exp(statistics.fmean(logs)), low, high, statistics.median(b for b, _ in both), statistics.median(a for _, a in both))
    return summary


def format_summary(summary: dict[str, dict[str, Ratio]]) -> str:
    lines = [f"{'optimiser':11s} {'quantity':21s} {'n':>3s} {'before ms':>10s} {'after ms':>9s}  after/before [95% CI]"]
    for name, ratios in summary.items():
        for key, r in ratios.items():
            lines.append(f"{name:11s} {key:21s} {r.n:3d} {1e3 * r.before_median_s:10.2f} {1e3 * r.after_median_s:9.2f}  {r.ratio:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="kldwrm bench interleave", description="Time two checkouts of this project side by side (fresh processes, alternating) and report the paired after/before ratios with 95% intervals.")
    parser.add_argument("before", help="the older checkout (a folder holding kldwrm_ref/, e.g. a git worktree of an older commit)")
    parser.add_argument("after", nargs="?", default=str(Path(__file__).resolve().parents[2]), help="the newer checkout (default: this one)")
    parser.add_argument("--optimizers", nargs="+", choices=[n for n in optim.NAMES if n != "ea-cm"], default=["kfac", "so-kld-wrm", "q-kld-wrm"], help="optimisers to time (default: kfac so-kld-wrm q-kld-wrm)")
    parser.add_argument("--architecture", type=_architecture, default="paper-cnn", metavar="ARCH", help="MLP sizes like 784-256-10 or a named network (default: paper-cnn)")
    parser.add_argument("--preset", choices=optim.PRESETS, default="paper", help="hyperparameter preset (default: paper)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="floating-point type (default: float32)")
    parser.add_argument("--batch", type=int, default=512, help="batch size, >= 1 (default: 512)")
    parser.add_argument("--reps", type=int, default=8, help="timed pairs per optimiser, >= 2; an even count balances which checkout runs first (default: 8)")
    parser.add_argument("--json", metavar="PATH", help="also write every pair and the summary to PATH (default: none)")
    args = parser.parse_args(argv)
    try:
        trees = {"before": check_tree(args.before, "before"), "after": check_tree(args.after, "after")}
        if args.reps < 2:
            raise ValueError(f"--reps must be an integer >= 2 (an interval needs two pairs), got {args.reps}")
        if args.batch < 1:
            raise ValueError(f"--batch must be an integer >= 1, got {args.batch}")
        if args.json:
            check_output_file(args.json, "--json")
    except ValueError as error:
        parser.error(str(error))
    jobs = [Job(name, args.architecture, args.preset, args.dtype, "auto", args.batch) for name in args.optimizers]
    print(f"before {trees['before']}\nafter  {trees['after']}\n{args.reps} timed pairs per optimiser after one untimed pair; each run a fresh process")
    records: list[dict] = []
    try:
        interleave(trees, jobs, args.reps, run=run_in_tree, progress=print, records=records)
    except RuntimeError as error:
        failure: str | None = str(error)
    else:
        failure = None
    finally:  # the pairs measured so far are kept if a child fails or the run is interrupted
        summary = summarise(records)
        if args.json:
            report = dict(complete=len(records) == 2 * args.reps * len(jobs), trees={k: str(v) for k, v in trees.items()}, jobs=[j._asdict() for j in jobs], records=records)
            write_json(args.json, dict(report, summary={name: {key: r._asdict() for key, r in ratios.items()} for name, ratios in summary.items()}))
    print("\n" + format_summary(summary))
    if failure:
        raise SystemExit(f"kldwrm bench interleave: {failure} (the pairs measured before it are summarised above)")
    return 0
