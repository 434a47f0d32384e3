"""The tuned comparison protocol (``kldwrm tune``; docs/protocol.md).

1. **Tune.** Every optimiser of the configuration gets the same grid budget: each point of its
   hyperparameter grid (e.g. step size x damping) runs for ``tune.epochs`` epochs with each of the
   ``tune.seeds``, trained on the training set minus a fixed validation split (the last
   ``validation`` training images) and evaluated on that split.  The test set plays no part in
   the selection.
2. **Select.** Per architecture and optimiser, the grid point with the highest mean final-epoch
   validation accuracy over the tuning seeds (ties: the lower mean validation loss); a point whose
   run diverged on any seed scores 0.  The choice is written to ``selected.json`` with flags for
   values on the edge of the grid, the whole grid to ``tuning.csv``, and the step-size
   sensitivity to ``sensitivity-<architecture>.png``.
2b. **Confirm** (optional ``confirm``: top, epochs, seeds, include).  A setting picked after a
   short budget need not be the best at the final one (a larger step wins early and ends lower).
   The grid points of ``confirm.include`` (e.g. the authors' setting) and the ``confirm.top`` best
   other grid points of every optimiser (the same number for each) run again on the validation
   split for ``confirm.epochs`` epochs (the final budget) with each of the ``confirm.seeds``; the selection is then the candidate with the highest mean validation
   accuracy at that budget (same tie and divergence rules).  ``confirm.csv`` holds these runs.
3. **Final.** Per architecture, an ordinary experiment configuration
   ``final-<architecture>.json`` (run by this command, or by ``kldwrm mnist --config``) trains
   each optimiser at its selected setting on the full training set for ``final.epochs`` epochs
   with each of the ``final.seeds``; its summary reports the final-epoch test accuracy with the
   paired statistics against the first optimiser.  ``summary.md`` collects the protocol's
   verdict.

Runs are ordinary run folders (resumable, locked, skipped when finished), under
``OUT/<name>/tune/<architecture>/<optimiser>/<grid point>/seed-<s>/`` (``confirm/`` likewise) and
``OUT/<name>-final-<architecture>/``.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from kldwrm_ref.experiments import report
from kldwrm_ref.experiments.config import RunSpec, check_fields, check_seeds, expand, validate_config
from kldwrm_ref.experiments.run_folder import RunFolderError, read_exports
from kldwrm_ref.experiments.runner import check_ready, run_experiment, run_tasks
from kldwrm_ref.experiments.statistics import holm, paired_comparison
from kldwrm_ref.model.zoo import arch_label
from kldwrm_ref.optim.hyper import FIELDS as HYPER_FIELDS
from kldwrm_ref.storage import read_json, write_csv, write_figure, write_json, write_text
from kldwrm_ref.validation import check_folder_name, check_positive_int

PROTOCOL_FIELDS = dict(name=str, description=str, experiment=dict, validation=int, grid=dict, tune=dict, confirm=dict, final=dict, published=str)
STAGES = ("tune", "confirm", "final", "all", "summary")  # summary: rebuild tables and plots from the run folders only


# ----------------------------------------------------------------------------- configuration
def _stage(cfg: dict, field: str, extra: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> dict:
    stage = cfg[field]
    fields = {"epochs", "seeds", *extra}
    if not fields <= set(stage) <= fields | set(optional):
        allowed = f"{', '.join(repr(f) for f in sorted(fields))}" + (f" (optionally {', '.join(map(repr, optional))})" if optional else "")
        raise ValueError(f"{field} must be an object with exactly {allowed}, got {sorted(stage)}")
    for key in ("epochs", *extra):
        check_positive_int(stage[key], f"{field}.{key}")
    return dict(stage, seeds=check_seeds(stage["seeds"], f"{field}.seeds"))


def validate_protocol(cfg: dict) -> dict:
    """Check a protocol configuration (fields of PROTOCOL_FIELDS); errors name the field."""
    if not isinstance(cfg, dict):
        raise ValueError(f"a protocol configuration must be a JSON object, got {type(cfg).__name__}")
    missing = {"name", "experiment", "validation", "grid", "tune", "final"} - set(cfg)
    unknown = set(cfg) - set(PROTOCOL_FIELDS)
    if missing or unknown:
        raise ValueError(f"protocol configuration: missing {sorted(missing)}, unknown {sorted(unknown)}; fields: {sorted(PROTOCOL_FIELDS)}")
    for field, value in cfg.items():
        if not isinstance(value, PROTOCOL_FIELDS[field]) or isinstance(value, bool):
            raise ValueError(f"{field} must be a JSON {PROTOCOL_FIELDS[field].__name__}, got {value!r:.60}")
    if not 0 < cfg["validation"] < 60000:
        raise ValueError(f"validation must be the number of training images held out for selection, in (0, 60000), got {cfg['validation']}")
    experiment = check_fields(copy.deepcopy(cfg["experiment"]))
    for field in ("name", "epochs", "seeds"):
        if field in experiment:
            raise ValueError(f"experiment.{field}: set by the protocol (name, tune and final), not by the experiment")
    check_folder_name(cfg["name"], "name")
    data = {**experiment.get("data", {}), "validation": cfg["validation"]}  # the tuning runs' training set must hold a batch
    validate_config({**experiment, "data": data, "name": cfg["name"], "epochs": 1, "seeds": [0]})
    experiment = validate_config({**experiment, "name": cfg["name"], "epochs": 1, "seeds": [0]})
    for field in ("name", "epochs", "seeds"):  # the stages set them
        del experiment[field]
    grid = cfg["grid"]
    for key, axes in grid.items():
        if key != "*" and key not in experiment["optimizers"]:
            raise ValueError(f"grid: keys must be '*' or an optimiser of the experiment ({', '.join(experiment['optimizers'])}), got {key!r}")
        if not isinstance(axes, dict) or not axes:
            raise ValueError(f"grid[{key!r}] must map hyperparameter names to non-empty lists of values")
        for name, values in axes.items():
            if name not in HYPER_FIELDS:
                raise ValueError(f"grid[{key!r}]: unknown hyperparameter {name!r}; accepted: {sorted(HYPER_FIELDS)}")
            if not isinstance(values, list) or not values or len(set(map(json.dumps, values))) != len(values):
                raise ValueError(f"grid[{key!r}][{name!r}] must be a non-empty list of distinct values, got {values!r}")
    out = dict(cfg, experiment=experiment, tune=_stage(cfg, "tune"), final=_stage(cfg, "final"))
    if "confirm" in cfg:
        out["confirm"] = confirm = _stage(cfg, "confirm", extra=("top",), optional=("include",))
        if confirm["epochs"] <= out["tune"]["epochs"]:
            raise ValueError(f"confirm.epochs must exceed tune.epochs ({out['tune']['epochs']}): the confirmation measures the candidates at a longer budget, got {confirm['epochs']}")
        confirm["include"] = include = confirm.get("include", [])
        for name in experiment["optimizers"]:
            labels = [point_label(point) for point in grid_points(out, name)]
            if not isinstance(include, list) or any(not isinstance(point, dict) or point_label(point) not in labels for point in include):
                raise ValueError(f"confirm.include must be a list of grid points of every optimiser (as objects, e.g. the authors' setting), got {confirm['include']!r:.120}; {name}'s grid: {', '.join(labels)}")
    for name in experiment["optimizers"]:
        if not grid_axes(out, name):
            raise ValueError(f"grid: no axes for optimiser {name!r}: give it at least one hyperparameter with a list of values, under '*' or {name!r}, got {grid!r:.120}")
        for point in grid_points(out, name):  # every point must make a valid optimiser
            validate_config({**experiment, "name": cfg["name"], "optimizers": [name], "hyper": {name: _point_hyper(out, name, point)}})
    return out


def grid_axes(cfg: dict, name: str) -> dict[str, list]:
    """Optimiser ``name``'s grid axes: the '*' axes and its own (its own win)."""
    return {**cfg["grid"].get("*", {}), **cfg["grid"].get(name, {})}


def grid_points(cfg: dict, name: str) -> list[dict]:
    """The grid of optimiser ``name``: the product of its axes, in order."""
    axes = grid_axes(cfg, name)
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def _point_hyper(cfg: dict, name: str, point: dict) -> dict:
    """The hyperparameter overrides of a run at ``point``: the experiment's, then the point's."""
    hyper = cfg["experiment"]["hyper"]
    return {**hyper.get("*", {}), **hyper.get(name, {}), **point}


def point_label(point: dict) -> str:
    """A grid point as a folder name, keys sorted, e.g. ``damping=0.001,step_size=0.01``."""
    return ",".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}" for key, value in sorted(point.items()))


def _validation_runs(cfg: dict, root: Path, stage: str, points_of) -> list[tuple[RunSpec, Path, str, dict]]:
    """(spec, folder, architecture label, point) of every run of ``stage`` ("tune" or "confirm"):
    ``points_of(arch, name)`` points per architecture and optimiser, each with the stage's seeds
    and epochs, trained on the training set minus the validation split; seed-major (a partial
    sweep covers every method and point with its first seeds)."""
    e = cfg["experiment"]
    data = dict(e["data"], validation=cfg["validation"])
    runs = []
    for seed in cfg[stage]["seeds"]:
        for sizes in e["architectures"]:
            architecture = sizes if isinstance(sizes, str) else tuple(sizes)
            arch = arch_label(architecture)
            for name in e["optimizers"]:
                for point in points_of(arch, name):
                    spec = RunSpec(name, architecture, e["activation"], seed, cfg[stage]["epochs"], e["batch"], e["platform"], e["preset"], e["backend"], e["dtype"], data, _point_hyper(cfg, name, point))
                    runs.append((spec, root / stage / arch / name / point_label(point) / f"seed-{seed}", arch, point))
    return runs


def tuning_runs(cfg: dict, root: Path) -> list[tuple[RunSpec, Path, str, dict]]:
    """(spec, folder, architecture label, grid point) of every tuning run, seed-major."""
    return _validation_runs(cfg, root, "tune", lambda arch, name: grid_points(cfg, name))


def confirm_runs(cfg: dict, root: Path, selected: dict) -> list[tuple[RunSpec, Path, str, dict]]:
    """(spec, folder, architecture label, candidate) of every confirmation run: the candidates of
    each optimiser whose grid is complete (``selected[arch][name]["candidates"]``, see :func:`select`)."""
    if "confirm" not in cfg:
        return []
    return _validation_runs(cfg, root, "confirm", lambda arch, name: selected.get(arch, {}).get(name, {}).get("candidates", []))


# ------------------------------------------------------------------------------ selection
def _final_validation(run_dir: Path) -> tuple[str, int, float, float]:
    """(state, epochs, final validation accuracy, final validation loss) of a run folder with a validation split."""
    try:
        status, metrics = read_exports(run_dir)
    except (RunFolderError, FileNotFoundError):
        return "missing", 0, math.nan, math.nan
    if status is None:
        return "missing", 0, math.nan, math.nan
    if "val_accuracy" not in metrics or len(metrics["epoch"]) == 0:  # no epoch finished yet
        return status["state"], 0, math.nan, math.nan
    return status["state"], int(metrics["epoch"][-1]), float(metrics["val_accuracy"][-1]), float(metrics["val_loss"][-1])


def tuning_table(cfg: dict, root: Path, runs: list[tuple[RunSpec, Path, str, dict]] | None = None) -> list[dict]:
    """One row per run of ``runs`` (default: the tuning runs): architecture, optimiser, the point's
    values, seed, state, final validation accuracy and loss."""
    rows = []
    for spec, run_dir, arch, point in tuning_runs(cfg, root) if runs is None else runs:
        state, epochs, accuracy, loss = _final_validation(run_dir)
        rows.append(dict(architecture=arch, optimizer=spec.optimizer, point=point_label(point), **point, seed=spec.seed, state=state, epochs=epochs, val_accuracy=accuracy, val_loss=loss))
    return rows


class Score(NamedTuple):
    """A point's mean final validation numbers over its seeds (a diverged run: accuracy 0, loss inf)."""

    val_accuracy: float
    val_loss: float
    point: dict
    diverged_seeds: int


def _scores(rows: list[dict], arch: str, name: str, points: list[dict], epochs: int, n_seeds: int) -> list[Score] | None:
    """The Score of each point, in order, once every point has finished ``epochs`` epochs (or
    diverged) on ``n_seeds`` seeds; else None."""
    scores = []
    for point in points:
        runs = [r for r in rows if r["architecture"] == arch and r["optimizer"] == name and r["point"] == point_label(point)]
        done = [r for r in runs if r["state"] == "diverged" or (r["state"] == "finished" and r["epochs"] == epochs)]
        if len(done) < n_seeds:
            return None
        accuracy = [0.0 if r["state"] == "diverged" else r["val_accuracy"] for r in done]
        loss = [math.inf if r["state"] == "diverged" else r["val_loss"] for r in done]
        scores.append(Score(float(np.mean(accuracy)), float(np.mean(loss)), point, sum(r["state"] == "diverged" for r in done)))
    return scores


def _points_done(rows: list[dict], arch: str, name: str, points: list[dict], epochs: int, n_seeds: int) -> int:
    return sum(_scores(rows, arch, name, [point], epochs, n_seeds) is not None for point in points)


def _ranking(scores: list[Score]) -> list[Score]:
    """Best first: higher mean validation accuracy, then lower mean validation loss; full ties keep grid order."""
    return sorted(scores, key=lambda s: (-s.val_accuracy, s.val_loss))


def select(cfg: dict, rows: list[dict], confirm_rows: list[dict] | None = None) -> dict:
    """{architecture: {optimiser: selection}} from the tuning rows and, when the protocol has a
    ``confirm`` stage, the confirmation rows (docs/protocol.md §3).

    A group whose grid (or confirmation) has runs left is reported with ``complete`` false, the
    ``stage`` that is incomplete and how many of its points are done, and no ``hyper``.  With
    ``confirm``, a group whose grid is complete names its ``grid_choice`` and ``candidates`` (the
    ``confirm.include`` points, then the ``confirm.top`` best other grid points) even before they
    are confirmed.
    """
    selected: dict[str, dict[str, Any]] = {}
    tune_stage, confirm = cfg["tune"], cfg.get("confirm")
    for arch in dict.fromkeys(r["architecture"] for r in rows):
        for name in cfg["experiment"]["optimizers"]:
            points, axes = grid_points(cfg, name), grid_axes(cfg, name)
            scores = _scores(rows, arch, name, points, tune_stage["epochs"], len(tune_stage["seeds"]))
            if scores is None:
                done = _points_done(rows, arch, name, points, tune_stage["epochs"], len(tune_stage["seeds"]))
                selected.setdefault(arch, {})[name] = dict(complete=False, stage="tune", points_done=done, points=len(points))
                continue
            ranked = _ranking(scores)
            best, diverged_points = ranked[0], sum(1 for s in scores if s.diverged_seeds)
            seeds, epochs = len(tune_stage["seeds"]), tune_stage["epochs"]
            extra: dict[str, Any] = {}
            if confirm is not None:
                included = [point_label(point) for point in confirm["include"]]
                candidates = [s.point for s in ranked if point_label(s.point) in included] + [s.point for s in ranked if point_label(s.point) not in included][: confirm["top"]]
                extra = dict(grid_choice=dict(hyper=best.point, val_accuracy=best.val_accuracy, val_loss=best.val_loss), candidates=candidates)
                confirmed = _scores(confirm_rows or [], arch, name, candidates, confirm["epochs"], len(confirm["seeds"]))
                if confirmed is None:
                    done = _points_done(confirm_rows or [], arch, name, candidates, confirm["epochs"], len(confirm["seeds"]))
                    selected.setdefault(arch, {})[name] = dict(complete=False, stage="confirm", points_done=done, points=len(candidates), diverged_points=diverged_points, **extra)
                    continue
                grid_accuracy = {point_label(s.point): s.val_accuracy for s in scores}
                extra["confirmation"] = [dict(hyper=c.point, grid_val_accuracy=grid_accuracy[point_label(c.point)], val_accuracy=c.val_accuracy, val_loss=c.val_loss, diverged_seeds=c.diverged_seeds) for c in confirmed]
                best, seeds, epochs = _ranking(confirmed)[0], len(confirm["seeds"]), confirm["epochs"]
            edge = [key for key, value in best.point.items() if len(axes[key]) > 2 and value in (axes[key][0], axes[key][-1])]
            selected.setdefault(arch, {})[name] = dict(
                complete=True, hyper=best.point, val_accuracy=best.val_accuracy, val_loss=best.val_loss, seeds=seeds, epochs=epochs, on_grid_edge=edge, diverged_points=diverged_points, **extra
            )
    return selected


def final_config(cfg: dict, arch: str, choices: dict) -> dict:
    """The experiment of the final stage for one architecture: each optimiser at its selected point,
    on the full training set (no validation split), with the final seeds and epochs."""
    e = cfg["experiment"]
    sizes = next(s for s in e["architectures"] if arch_label(s if isinstance(s, str) else tuple(s)) == arch)
    hyper = {name: _point_hyper(cfg, name, choices[name]["hyper"]) for name in e["optimizers"]}
    return dict(
        e, name=f"{cfg['name']}-final-{arch}", architectures=[sizes], epochs=cfg["final"]["epochs"], seeds=cfg["final"]["seeds"], hyper=hyper, report_best_on_test=False,
        description=f"{cfg['name']} final stage, {arch}: each optimiser at the hyperparameters selected on the validation split (selected.json), full training set",
    )


def stale_final_runs(final: dict, out: Path) -> list[str]:
    """Labels of the final stage's run folders under ``out`` that hold another setting than
    ``final`` gives them: runs of an earlier selection, which must not be reported as this one's."""
    root = out / final["name"]
    stale = []
    for spec in expand(validate_config(final)):
        path = root / spec.label / "config.json"
        if path.exists() and read_json(path).get("run", {}).get("hyper") != spec.hyper:
            stale.append(spec.label)
    return stale


# -------------------------------------------------------------------------------- plots
def sensitivity_plot(cfg: dict, rows: list[dict], arch: str, path: Path, step_key: str = "step_size") -> Path | None:
    """Final validation accuracy against the step size, one panel per optimiser, one line per value
    of the other grid axes (mean over tuning seeds, band: +- one sample std; diverged runs at 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in cfg["experiment"]["optimizers"] if any(r["optimizer"] == n and r["architecture"] == arch and step_key in r and r["state"] in ("finished", "diverged") for r in rows)]
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), sharey=True, constrained_layout=True, squeeze=False)
    best = 0.0
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["optimizer"] == name and r["architecture"] == arch and r["state"] in ("finished", "diverged")]
        other_keys = [key for key in grid_points(cfg, name)[0] if key != step_key]
        others = sorted({tuple((key, r[key]) for key in other_keys) for r in mine}, key=str)
        for index, other in enumerate(others):
            subset = [r for r in mine if all(r[k] == v for k, v in other)]
            steps = sorted({r[step_key] for r in subset})
            values = [[0.0 if r["state"] == "diverged" else 100 * r["val_accuracy"] for r in subset if r[step_key] == s] for s in steps]
            mean = np.array([np.mean(v) for v in values])
            spread = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
            label = ", ".join(f"{k}={v:g}" for k, v in other) or name
            ax.plot(steps, mean, marker="o", color=f"C{index}", label=label)
            ax.fill_between(steps, mean - spread, mean + spread, color=f"C{index}", alpha=0.2, linewidth=0)
            best = max(best, float(np.max(mean)))
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel(step_key.replace("_", " "))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0, 0].set_ylabel(f"validation accuracy after {cfg['tune']['epochs']} epochs (%)")
    axes[0, 0].set_ylim(max(0.0, best - 10.0), min(100.0, best + 1.0))  # the top 10 points; worse settings fall off the bottom
    fig.suptitle(f"{cfg['name']}: {arch}, step-size sensitivity\nline: mean over {len(cfg['tune']['seeds'])} tuning seeds, band: ± 1 sample std; a diverged run counts as 0")
    write_figure(path, fig)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------- summary
def verdict(final_root: Path, final_cfg: dict) -> list[str]:
    """Per method, one sentence against the baseline (the first optimiser) on final-epoch test
    accuracy: wins or loses when the Holm-adjusted paired t p (over the methods of this
    architecture) is below 0.05, else no significant difference."""
    groups = report.collect(final_root, final_cfg)
    baseline = final_cfg["optimizers"][0]
    found = report.comparisons(groups, baseline)
    tests = [paired_comparison([100 * m["metrics"]["test_accuracy"][-1] for m, _ in pairs], [100 * b["metrics"]["test_accuracy"][-1] for _, b in pairs]) for _, _, pairs in found]
    adjusted = holm([t.t_p for t in tests])
    lines = []
    for (_, name, _), test, p in zip(found, tests, adjusted):
        interval = f"{test.mean:+.2f} points [95% CI {test.ci_low:+.2f}, {test.ci_high:+.2f}]" if test.n > 1 else f"{test.mean:+.2f} points"
        if not np.isnan(p) and p < report.ALPHA:
            outcome = "beats" if test.mean > 0 else "is beaten by"
        else:
            outcome = "does not differ significantly from"
        lines.append(f"- {name} {outcome} {baseline}: {interval}, Holm-adjusted paired t p = {report.format_p(p)} over {test.n} seeds.")
    return lines


def _final_accuracy_by_seed(runs: list) -> dict[int, float]:
    """{seed: final-epoch test accuracy in %} of the finished runs."""
    return {r["seed"]: 100 * float(r["metrics"]["test_accuracy"][-1]) for r in report.usable_runs(runs)}


def _paired_cell(tuned: dict[int, float], published: dict[int, float]) -> str:
    """Tuned minus published on their shared seeds: mean [95% t CI], raw paired t p, pairs."""
    seeds = sorted(set(tuned) & set(published))
    if len(seeds) < 2:
        return f"- ({len(seeds)} shared seed{'s' * (len(seeds) != 1)})"
    test = paired_comparison([tuned[s] for s in seeds], [published[s] for s in seeds], report.ALPHA)
    return f"{test.mean:+.2f} [{test.ci_low:+.2f}, {test.ci_high:+.2f}], p {report.format_p(test.t_p)}, n {test.n}"


def published_rows(cfg: dict, arch: str, final_root: Path | None = None) -> list[str]:
    """The untuned "as published" setting's final-epoch test accuracy per optimiser, from the
    results folder ``cfg["published"]`` (an experiment run at the authors' hyperparameters), and,
    when the final stage ``final_root`` exists, each tuned method paired by seed against its own
    as-published runs and against the as-published baseline (the first optimiser)."""
    if "published" not in cfg or not (Path(cfg["published"]) / "experiment.json").exists():
        return []
    root = Path(cfg["published"])
    groups = report.collect(root, read_json(root / "experiment.json"))
    published = {name: _final_accuracy_by_seed(runs) for (group_arch, name), runs in groups.items() if group_arch == arch}
    lines = [f"| {name} (as published) | {len(acc)} | {report._mean_std(list(acc.values()), scale=1.0)} |" for name, acc in published.items() if acc]
    if not lines:
        return []
    parts = ["", f"As published (the authors' hyperparameters, untuned; {root}), final-epoch test accuracy %:", "", "| optimizer | seeds | final test acc % |", "|---|---|---|", *lines]
    if final_root is None or not (final_root / "summary.md").exists():
        return parts
    final_cfg = read_json(final_root / "experiment.json")
    baseline = final_cfg["optimizers"][0]
    tuned = {name: _final_accuracy_by_seed(runs) for (group_arch, name), runs in report.collect(final_root, final_cfg).items() if group_arch == arch}
    parts += [
        "",
        "Tuned (final stage) minus as published, final-epoch test accuracy in points, paired on the seeds where both runs finished: mean [95% t CI], paired t p (not Holm-adjusted), pairs.",
        "",
        f"| tuned optimizer | minus itself as published | minus {baseline} as published |",
        "|---|---|---|",
    ]
    for name, acc in tuned.items():
        parts.append(f"| {name} | {_paired_cell(acc, published.get(name, {}))} | {_paired_cell(acc, published.get(baseline, {}))} |")
    return parts


def write_protocol_summary(cfg: dict, root: Path, finals: dict[str, Path | None], selected: dict, notes: dict[str, str] | None = None) -> str:
    """``root/summary.md``: per architecture the selection, the confirmation, the final stage's
    verdict and the as-published pairing; ``finals[arch]`` is the final stage's folder when it
    holds runs of the current selection (else None: nothing of it is reported), ``notes[arch]``
    a sentence on why not."""
    parts = [f"# {cfg['name']}: {cfg.get('description', '')}".rstrip(": "), ""]
    notes = notes or {}
    confirm = cfg.get("confirm")
    how = f"ranked by the final validation accuracy after {cfg['tune']['epochs']} epochs (mean over tuning seeds {cfg['tune']['seeds']})"
    if confirm is not None:
        also = f" and {', '.join(point_label(point) for point in confirm['include'])}" if confirm["include"] else ""
        how += f"; the top {confirm['top']} of each optimiser{also} rerun for {confirm['epochs']} epochs (seeds {confirm['seeds']}) and the best at that budget selected"
    parts.append(
        f"Protocol (docs/protocol.md): tuned on the training set minus its last {cfg['validation']} images, {how}; "
        f"final runs on the full training set, {cfg['final']['epochs']} epochs, seeds {cfg['final']['seeds']}, reported at the final epoch."
    )
    for arch, choices in selected.items():
        epochs = confirm["epochs"] if confirm is not None else cfg["tune"]["epochs"]
        parts += ["", f"## {arch}", "", f"| optimizer | selected | mean validation acc % after {epochs} epochs | on grid edge | grid points with a diverged seed |", "|---|---|---|---|---|"]
        for name, choice in choices.items():
            if not choice["complete"]:
                what = "tuning" if choice["stage"] == "tune" else "confirmation"
                parts.append(f"| {name} | {what} incomplete ({choice['points_done']}/{choice['points']} points) | - | - | - |")
                continue
            parts.append(f"| {name} | {point_label(choice['hyper'])} | {100 * choice['val_accuracy']:.2f} | {', '.join(choice['on_grid_edge']) or 'no'} | {choice['diverged_points']} |")
        confirmed = [(name, choice) for name, choice in choices.items() if "confirmation" in choice]
        if confirmed and confirm is not None:
            parts += ["", f"Confirmation: each optimiser's candidates (included points, then its top {confirm['top']} others), validation accuracy % after {cfg['tune']['epochs']} epochs (grid) and after {confirm['epochs']} (confirm):", ""]
            parts += ["| optimizer | candidate | grid | confirm | selected |", "|---|---|---|---|---|"]
            for name, choice in confirmed:
                for c in choice["confirmation"]:
                    mark = "yes" if c["hyper"] == choice["hyper"] else ""
                    parts.append(f"| {name} | {point_label(c['hyper'])} | {100 * c['grid_val_accuracy']:.2f} | {100 * c['val_accuracy']:.2f} | {mark} |")
        png = root / f"sensitivity-{arch}.png"
        if png.exists():
            parts += ["", f"![sensitivity {arch}]({png.name})"]
        final_root = finals.get(arch)
        if arch in notes:
            parts += ["", notes[arch]]
        if final_root is not None and (final_root / "summary.md").exists():
            final_cfg = read_json(final_root / "experiment.json")
            parts += ["", f"Final stage ([summary](../{final_root.name}/summary.md)), final-epoch test accuracy against {final_cfg['optimizers'][0]}:", ""]
            parts += verdict(final_root, final_cfg)
        parts += published_rows(cfg, arch, final_root)
    text = "\n".join(parts) + "\n"
    write_text(root / "summary.md", text)
    return text


# -------------------------------------------------------------------------------- driver
def run_protocol(cfg: dict, out: str | Path, stage: str = "all", progress: bool = True, log=print, jobs: int = 1, scheduler: str | None = None) -> Path:
    """Run ``stage`` of protocol ``cfg`` under ``out`` (tune, confirm, final, all of them in turn, or
    summary: none) and rebuild the tables, plots and summary from the run folders; returns ``out/<name>``."""
    cfg = validate_protocol(cfg)
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    out = Path(out)
    root = out / cfg["name"]
    check_ready([spec for spec, _, _, _ in tuning_runs(cfg, root)], jobs, scheduler)  # data and scheduler, before anything is written
    write_json(root / "protocol.json", cfg)
    if stage in ("tune", "all"):
        run_tasks([(spec, run_dir) for spec, run_dir, _, _ in tuning_runs(cfg, root)], progress, log, jobs, scheduler)
    rows = tuning_table(cfg, root)
    selected = select(cfg, rows)
    outcome = ("seed", "state", "epochs", "val_accuracy", "val_loss")
    axes = dict.fromkeys(k for r in rows for k in r if k not in ("architecture", "optimizer", "point", *outcome))
    write_csv(root / "tuning.csv", rows, ["architecture", "optimizer", "point", *axes, *outcome])
    if "confirm" in cfg:
        runs = confirm_runs(cfg, root, selected)
        if stage in ("confirm", "all"):
            run_tasks([(spec, run_dir) for spec, run_dir, _, _ in runs], progress, log, jobs, scheduler)
        confirm_rows = tuning_table(cfg, root, runs)
        write_csv(root / "confirm.csv", confirm_rows, ["architecture", "optimizer", "point", *axes, *outcome])
        selected = select(cfg, rows, confirm_rows)
    elif stage == "confirm":
        log("this protocol has no confirm stage (add 'confirm': {'top', 'epochs', 'seeds'})")
    write_json(root / "selected.json", selected)
    finals: dict[str, Path | None] = {}
    notes: dict[str, str] = {}
    for arch, choices in selected.items():
        sensitivity_plot(cfg, rows, arch, root / f"sensitivity-{arch}.png")
        finals[arch] = None
        if not all(choice["complete"] for choice in choices.values()):
            (root / f"final-{arch}.json").unlink(missing_ok=True)  # no final configuration before the selection is made
            if stage == "final":
                log(f"{arch}: selection incomplete, no final stage yet (run --stage tune, then --stage confirm if the protocol has one)")
            continue
        final = final_config(cfg, arch, choices)
        write_json(root / f"final-{arch}.json", final)
        stale = stale_final_runs(final, out)
        if stale:
            groups = ", ".join(dict.fromkeys(label.rsplit("/", 1)[0] for label in stale))
            notes[arch] = f"{out / final['name']} holds final runs of an earlier selection ({groups}); they are not reported, and the final stage runs once they are moved or deleted."
            log(notes[arch])
            continue
        if stage in ("final", "all"):
            run_experiment(final, out, progress, log, jobs, scheduler)
        finals[arch] = out / final["name"]
    text = write_protocol_summary(cfg, root, finals, selected, notes)
    log("\n" + text)
    return root

