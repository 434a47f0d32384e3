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

import math
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from kldwrm_ref.experiments import tune
from kldwrm_ref.experiments.config import RunSpec, read_config
from kldwrm_ref.experiments.run_folder import EXPORTS
from kldwrm_ref.experiments.runner import IDENTITY, run_tasks
from kldwrm_ref.experiments.statistics import McNemar, holm, mcnemar
from kldwrm_ref.storage import read_json, write_csv, write_figure, write_json, write_text
from kldwrm_ref.validation import check_positive_int

SWEEP_FIELDS = dict(baseline=str, threshold=float, secondary_threshold=float, reuse=list, fresh_seeds=list)
STUDY_FIELDS = dict(name=str, description=str, sweeps=list, holm_families=list, bootstrap=dict)
STAGES = ("run", "summary")
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
    of the sweep's same folder (:func:`_same_run`): its exports, unchanged (a checkpoint, kept only
    to extend a run, is not copied); returns how many were copied.  A run already present in the
    sweep is left alone."""
    copied = 0
    for spec, run_dir, _, _ in sweep_runs(sweep, root):
        if run_dir.exists():
            continue
        for source_root in sweep.get("reuse", []):
            source = Path(source_root) / run_dir.relative_to(root)
            if not (source / "status.json").exists() or not (source / "config.json").exists():
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



# -------------------------------------------------------------------------------- outcomes
def succeeded(row: dict, threshold: float, epochs: int) -> bool | None:
    """A run's outcome (docs/protocol.md §9.2): True when it finished all ``epochs`` with a finite
    final validation loss and a final validation accuracy >= ``threshold``; False when it did
    not or diverged; None while it is not done."""
    if row["state"] == "diverged":
        return False
    if row["state"] != "finished" or row["epochs"] != epochs:
        return None
    return bool(math.isfinite(row["val_loss"]) and row["val_accuracy"] >= threshold)


class Grid(NamedTuple):
    """The sweep's common grid: its points in grid order, their step sizes and dampings (None
    where the grid has no damping axis), and the sorted axes of the heat map."""

    points: list[dict]
    steps: list[float]
    dampings: list[float | None]


def sweep_grid(sweep: dict) -> Grid:
    points = tune.grid_points(sweep, sweep["baseline"])
    axes = tune.grid_axes(sweep, sweep["baseline"])
    return Grid(points, sorted(axes["step_size"]), sorted(axes["damping"]) if "damping" in axes else [None])


def outcome_matrices(rows: list[dict], sweep: dict, threshold: float) -> dict[str, np.ndarray]:
    """{optimiser: (points x seeds) array of 1 (success), 0 (failure), NaN (not done)}, points in
    grid order, seeds in ``tune.seeds`` order."""
    grid, seeds = sweep_grid(sweep), sweep["tune"]["seeds"]
    labels = [tune.point_label(point) for point in grid.points]
    out = {name: np.full((len(labels), len(seeds)), math.nan) for name in sweep["experiment"]["optimizers"]}
    for row in rows:
        outcome = succeeded(row, threshold, sweep["tune"]["epochs"])
        if outcome is not None and row["point"] in labels:
            out[row["optimizer"]][labels.index(row["point"]), seeds.index(row["seed"])] = float(outcome)
    return out


# ------------------------------------------------------------------------- region measures
def region_fraction(success: np.ndarray) -> float:
    """F: the fraction of the done runs that succeed (NaN when none is done)."""
    done = success[~np.isnan(success)]
    return float(done.mean()) if done.size else math.nan


def success_rates(success: np.ndarray, sweep: dict) -> np.ndarray:
    """(dampings x step sizes) success rate over the done seeds of each grid point (NaN: none done)."""
    grid = sweep_grid(sweep)
    rates = np.full((len(grid.dampings), len(grid.steps)), math.nan)
    for index, point in enumerate(grid.points):
        done = success[index][~np.isnan(success[index])]
        if done.size:
            rates[grid.dampings.index(point.get("damping")), grid.steps.index(point["step_size"])] = done.mean()
    return rates


def trains_well(rates: np.ndarray) -> np.ndarray:
    """The points where more than half the seeds succeed (3 of 5)."""
    return np.nan_to_num(rates, nan=0.0) > 0.5


Width = tuple[int, float | None, float | None]


def widths(rates: np.ndarray, steps: list[float]) -> list[Width]:
    """Per damping (row): the number of grid step sizes in the longest unbroken run of step sizes
    that train well, with that run's smallest and largest step size (None, None when empty);
    of equally long runs, the smaller step sizes."""
    out = []
    for row in trains_well(rates):
        best: Width = (0, None, None)
        start: int | None = None
        for j, good in enumerate([*row, False]):
            if good and start is None:
                start = j
            elif not good and start is not None:
                if j - start > best[0]:
                    best = (j - start, steps[start], steps[j - 1])
                start = None
        out.append(best)
    return out


def region_boundary(region: np.ndarray) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """The outline of a region of cells (rows: y, columns: x; cell (i, j) spans x in j +- 0.5 and
    y in i +- 0.5) as unit segments ((x0, y0), (x1, y1)): every cell side between a cell inside
    and one outside or the edge of the grid."""
    rows, cols = region.shape
    inside = np.pad(region.astype(bool), 1)
    segments = []
    for i in range(rows):
        for j in range(cols):
            if not inside[i + 1, j + 1]:
                continue
            if not inside[i, j + 1]:  # below
                segments.append(((j - 0.5, i - 0.5), (j + 0.5, i - 0.5)))
            if not inside[i + 2, j + 1]:  # above
                segments.append(((j - 0.5, i + 0.5), (j + 0.5, i + 0.5)))
            if not inside[i + 1, j]:  # left
                segments.append(((j - 0.5, i - 0.5), (j - 0.5, i + 0.5)))
            if not inside[i + 1, j + 2]:  # right
                segments.append(((j + 0.5, i - 0.5), (j + 0.5, i + 0.5)))
    return segments


# ------------------------------------------------------------------------------ comparison
class Comparison(NamedTuple):
    """A method against the baseline on the runs done for both, paired by grid point and seed."""

    pairs: int
    test: McNemar  # b: only the method succeeds, c: only the baseline
    difference: float  # F_method - F_baseline on those pairs
    ci_low: float  # percentile bootstrap interval, stratified by grid point
    ci_high: float


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int, seed: int, level: float = 0.95) -> tuple[float, float, float]:
    """F_a - F_b over the pairs done for both (points x seeds arrays), and its percentile
    ``level`` interval from ``resamples`` resamples stratified by grid point: at each point its
    done seeds are drawn with replacement, the same draws for a and b
    (``numpy.random.default_rng(seed)``, points in order).  NaNs when no pair is done."""
    check_positive_int(resamples, "resamples")
    done = ~np.isnan(a) & ~np.isnan(b)
    total = int(done.sum())
    if total == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    sums = np.zeros(resamples)
    for index in range(a.shape[0]):
        d = (a[index] - b[index])[done[index]]
        if d.size:
            sums += d[rng.integers(0, d.size, size=(resamples, d.size))].sum(axis=1)
    low, high = np.quantile(sums / total, [(1 - level) / 2, (1 + level) / 2])
    return float((a - b)[done].mean()), float(low), float(high)


def compare(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> Comparison:
    """Method ``a`` against baseline ``b`` (points x seeds outcome arrays): McNemar on the pairs
    done for both, and the paired bootstrap of the difference in region fraction."""
    done = ~np.isnan(a) & ~np.isnan(b)
    test = mcnemar(a[done] == 1, b[done] == 1)
    return Comparison(int(done.sum()), test, *paired_bootstrap(a, b, resamples, seed))


def decide(p_holm: float, comparison: Comparison, alpha: float = ALPHA) -> str:
    """The decision rule of docs/protocol.md §9.4: more robust when the Holm-adjusted McNemar p is
    below ``alpha``, b > c and the interval lies above 0; less robust when p < alpha, c > b and the
    interval lies below 0; else no difference shown."""
    b, c = comparison.test.b, comparison.test.c
    if not p_holm < alpha:
        return "no difference shown"
    if b > c and comparison.ci_low > 0:
        return "more robust"
    if c > b and comparison.ci_high < 0:
        return "less robust"
    return "no difference shown"


# ----------------------------------------------------------------------------------- plots
def heatmap_figure(sweep: dict, rates: dict[str, np.ndarray]):
    """The success rate of each method on step size x damping (one panel per method, the number
    in each cell), with the baseline's region (points that train well) outlined on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    grid, baseline = sweep_grid(sweep), sweep["baseline"]
    names = list(rates)
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 0.55 * len(grid.dampings) + 2.2), squeeze=False, constrained_layout=True)
    outline = region_boundary(trains_well(rates[baseline]))
    for ax, name in zip(axes[0], names):
        image = ax.imshow(np.ma.masked_invalid(rates[name]), origin="lower", vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(rates[name]):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7, color="black" if value > 0.5 else "white")
        ax.add_collection(LineCollection(outline, colors="red", linewidths=2.0))
        ax.set_xticks(range(len(grid.steps)), [f"{s:g}" for s in grid.steps], rotation=45)
        ax.set_yticks(range(len(grid.dampings)), ["preset" if d is None else f"{d:g}" for d in grid.dampings])
        ax.set_xlabel("step size")
        ax.set_title(name)
    axes[0, 0].set_ylabel("damping")
    fig.colorbar(image, ax=axes[0, -1], label="success rate")
    fig.suptitle(f"{sweep['name']}: success rate (final validation accuracy >= {100 * sweep['threshold']:g}% after {sweep['tune']['epochs']} epochs)\nred outline: {baseline}'s region, the points where more than half its seeds succeed")
    return fig


# ------------------------------------------------------------------------------- summary
def _sweep_rows(sweep: dict, out: Path) -> list[dict]:
    root = out / sweep["name"]
    return tune.tuning_table(sweep, root, sweep_runs(sweep, root))


def _fraction(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def _width_cell(width: Width) -> str:
    return "0" if width[0] == 0 else f"{width[0]} [{width[1]:g}, {width[2]:g}]"


def analyse_sweep(sweep: dict, rows: list[dict], bootstrap: dict) -> dict:
    """Region measures of every method and each method against the baseline (not yet Holm-adjusted)."""
    names, baseline = sweep["experiment"]["optimizers"], sweep["baseline"]
    primary = outcome_matrices(rows, sweep, sweep["threshold"])
    secondary = outcome_matrices(rows, sweep, sweep["secondary_threshold"]) if "secondary_threshold" in sweep else None
    grid, seeds = sweep_grid(sweep), sweep["tune"]["seeds"]
    fresh = [seeds.index(s) for s in sweep.get("fresh_seeds", [])]
    done = sum(int((~np.isnan(m)).sum()) for m in primary.values())
    methods: dict[str, dict[str, Any]] = {}
    for name in names:
        losses = [math.inf if r["state"] == "diverged" else r["val_loss"] for r in rows if r["optimizer"] == name and succeeded(r, 0.0, sweep["tune"]["epochs"]) is not None]
        rates = success_rates(primary[name], sweep)
        methods[name] = dict(
            fraction=region_fraction(primary[name]),
            secondary=region_fraction(secondary[name]) if secondary else math.nan,
            median_loss=float(np.median(losses)) if losses else math.nan,
            rates=rates,
            widths=widths(rates, grid.steps),
        )
    comparisons = {name: compare(primary[name], primary[baseline], bootstrap["resamples"], bootstrap["seed"]) for name in names if name != baseline}
    fresh_comparisons = {name: compare(primary[name][:, fresh], primary[baseline][:, fresh], bootstrap["resamples"], bootstrap["seed"]) for name in comparisons} if fresh and len(fresh) < len(seeds) else {}
    return dict(sweep=sweep, done=done, total=len(names) * len(grid.points) * len(seeds), methods=methods, comparisons=comparisons, fresh=fresh_comparisons)


def point_table(sweep: dict, rows: list[dict]) -> list[dict]:
    """Per method and grid point: runs done, success rate, median final validation loss (diverged: inf)."""
    epochs, table = sweep["tune"]["epochs"], []
    for name in sweep["experiment"]["optimizers"]:
        for point in sweep_grid(sweep).points:
            mine = [r for r in rows if r["optimizer"] == name and r["point"] == tune.point_label(point)]
            outcomes = [succeeded(r, sweep["threshold"], epochs) for r in mine]
            losses = [math.inf if r["state"] == "diverged" else r["val_loss"] for r, o in zip(mine, outcomes) if o is not None]
            rate = float(np.mean([o for o in outcomes if o is not None])) if losses else math.nan
            table.append(dict(optimizer=name, **point, done=len(losses), success_rate=rate, median_val_loss=float(np.median(losses)) if losses else math.nan))
    return table


def holm_decisions(study: dict, analyses: dict[str, dict]) -> dict[tuple[str, str], tuple[float, str]]:
    """{(sweep, method): (Holm-adjusted McNemar p, decision)} over each Holm family; the decision
    is "interim" until every run of the family's sweeps is done."""
    out = {}
    for family in study["holm_families"]:
        keys = [(sweep, name) for sweep in family for name in analyses[sweep]["comparisons"]]
        adjusted = holm([analyses[sweep]["comparisons"][name].test.p for sweep, name in keys]) if keys else np.zeros(0)
        complete = all(analyses[sweep]["done"] == analyses[sweep]["total"] for sweep in family)
        for key, p in zip(keys, adjusted):
            out[key] = (float(p), decide(float(p), analyses[key[0]]["comparisons"][key[1]]) if complete else "interim")
    return out


def _comparison_cell(c: Comparison) -> str:
    return f"{c.difference:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}]" if c.pairs else "-"


def summary_text(study: dict, analyses: dict[str, dict], decisions: dict) -> str:
    parts = [f"# {study['name']}: {study.get('description', '')}".rstrip(": "), ""]
    parts.append(
        "Protocol: docs/protocol.md §9 (pre-registered). Success: the run finished every epoch with a finite final validation loss "
        f"and a final validation accuracy at least the threshold; a diverged run fails. McNemar exact on the success indicators paired by grid point and seed "
        f"(b: only the method succeeds, c: only the baseline), Holm over each family ({'; '.join(' + '.join(f) for f in study['holm_families'])}); "
        f"F = fraction of runs that succeed, difference to the baseline with a percentile 95% paired bootstrap interval stratified by grid point "
        f"({study['bootstrap']['resamples']} resamples, seed {study['bootstrap']['seed']})."
    )
    for name, a in analyses.items():
        sweep, grid = a["sweep"], sweep_grid(a["sweep"])
        state = "complete" if a["done"] == a["total"] else f"INTERIM: {a['done']} of {a['total']} runs done, no verdict"
        parts += ["", f"## {name} ({state})", "", sweep.get("description", ""), ""]
        secondary = "secondary_threshold" in sweep
        head = f"| optimizer | F at {100 * sweep['threshold']:g}% |" + (f" F at {100 * sweep['secondary_threshold']:g}% |" if secondary else "") + " median final val loss |"
        head += "".join(f" width at damping {'preset' if d is None else f'{d:g}'} |" for d in grid.dampings)
        parts += [head, "|---" * (head.count("|") - 1) + "|"]
        for method, m in a["methods"].items():
            cells = [_fraction(m["fraction"])] + ([_fraction(m["secondary"])] if secondary else []) + ["-" if math.isnan(m["median_loss"]) else f"{m['median_loss']:.4g}"] + [_width_cell(w) for w in m["widths"]]
            parts.append(f"| {method} | " + " | ".join(cells) + " |")
        parts += ["", "Width: the number of grid step sizes in the longest unbroken run of step sizes where more than half the seeds succeed, with that run's smallest and largest step size.", ""]
        parts += [f"| optimizer vs {sweep['baseline']} | pairs | b | c | McNemar p | Holm p | F - F_{sweep['baseline']} [95% CI] | decision |", "|---|---|---|---|---|---|---|---|"]
        for method, c in a["comparisons"].items():
            p_holm, decision = decisions[(name, method)]
            parts.append(f"| {method} | {c.pairs} | {c.test.b} | {c.test.c} | {c.test.p:.3g} | {p_holm:.3g} | {_comparison_cell(c)} | {decision} |")
        if a["fresh"]:
            parts += ["", f"Descriptive, on the fresh seeds {sweep['fresh_seeds']} alone (no reused run): " + "; ".join(f"{method} b {c.test.b}, c {c.test.c}, difference {_comparison_cell(c)}" for method, c in a["fresh"].items()) + "."]
        parts += ["", f"![success rate {name}](heatmap-{name}.png)"]
    return "\n".join(parts) + "\n"


def write_study_summary(study: dict, sweeps: list[dict], out: Path, log=print) -> Path:
    """Rebuild ``out/<study>/summary.md``, ``comparisons.csv`` and a heat map per sweep, and each
    sweep's ``outcomes.csv`` (per run) and ``points.csv`` (per method and point), from the run folders."""
    root = out / study["name"]
    analyses, tables = {}, []
    for sweep in sweeps:
        rows = _sweep_rows(sweep, out)
        for row in rows:
            row["success"] = succeeded(row, sweep["threshold"], sweep["tune"]["epochs"])
        axes = list(tune.grid_axes(sweep, sweep["baseline"]))
        write_csv(out / sweep["name"] / "outcomes.csv", rows, ["architecture", "optimizer", "point", *axes, "seed", "state", "epochs", "val_accuracy", "val_loss", "success"])
        write_csv(out / sweep["name"] / "points.csv", point_table(sweep, rows), ["optimizer", *axes, "done", "success_rate", "median_val_loss"])
        analyses[sweep["name"]] = analysis = analyse_sweep(sweep, rows, study["bootstrap"])
        import matplotlib.pyplot as plt

        fig = heatmap_figure(sweep, {name: m["rates"] for name, m in analysis["methods"].items()})
        write_figure(root / f"heatmap-{sweep['name']}.png", fig)
        plt.close(fig)
    decisions = holm_decisions(study, analyses)
    for name, a in analyses.items():
        for method, c in a["comparisons"].items():
            tables.append(dict(sweep=name, optimizer=method, baseline=a["sweep"]["baseline"], runs_done=a["done"], runs=a["total"], fraction=a["methods"][method]["fraction"],
                               baseline_fraction=a["methods"][a["sweep"]["baseline"]]["fraction"], pairs=c.pairs, b=c.test.b, c=c.test.c, mcnemar_p=c.test.p,
                               holm_p=decisions[(name, method)][0], difference=c.difference, ci_low=c.ci_low, ci_high=c.ci_high, decision=decisions[(name, method)][1]))
    write_csv(root / "comparisons.csv", tables, list(tables[0]) if tables else ["sweep"])
    text = summary_text(study, analyses, decisions)
    write_text(root / "summary.md", text)
    log(text)
    return root


def run_study(study: dict, sweeps: list[dict], out: str | Path, stage: str = "summary", progress: bool = True, log=print, jobs: int = 1) -> Path:
    """``run``: every sweep in order (reuse, then train), then the summary; ``summary``: only
    rebuild the summary from the run folders.  Returns ``out/<study name>``."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    check_positive_int(jobs, "jobs")
    if stage == "run":
        for sweep in sweeps:
            run_sweep(sweep, out, progress, log, jobs)
    return write_study_summary(study, sweeps, Path(out), log)
