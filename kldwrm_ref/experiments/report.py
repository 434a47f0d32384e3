"""Summary of an experiment across seeds: markdown tables and PNG plots (``kldwrm mnist``).

Per architecture and optimiser: final test accuracy, and the best epoch's unless the
configuration's ``report_best_on_test`` is false (mean +- sample std over the seeds
that did not diverge), epochs and training wall time to reach 97% and 98% test accuracy (mean over
the seeds that reached it, with how many did), seconds per epoch, and the test accuracy at fixed
epoch and training-time budgets.  Because every optimiser of a
seed starts from the same weights and sees the same batches, the comparison is also
given paired by seed against the first optimiser of the configuration (K-FAC, or EA-CM for the
exact family): the mean +- std of the per-seed accuracy differences and the number of seeds on
which the method is ahead.  Per architecture, a significance table tests the final test accuracy
against that baseline (:mod:`kldwrm_ref.experiments.statistics`): mean difference with its 95% t
interval, paired t and Wilcoxon p, the t p Holm-adjusted over every comparison of the summary, and
on how many seeds the exact McNemar test on the per-example test correctness gives p < 0.05.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import stats

from kldwrm_ref.experiments.config import expand
from kldwrm_ref.experiments.run_folder import read_exports, read_test_correct
from kldwrm_ref.experiments.statistics import holm, mcnemar, paired_comparison
from kldwrm_ref.storage import write_figure, write_text

THRESHOLDS = (0.97, 0.98)
ALPHA = 0.05


def collect(root: Path, cfg: dict) -> dict:
    """{(architecture label, optimiser): [per-seed dict(seed, status, metrics arrays, correct)]} from the run files.

    ``correct`` is the per-example test correctness of the last epoch in ``metrics``, or None.
    """
    groups: dict = {}
    for spec in expand(cfg):
        run_dir = root / spec.label
        arch = spec.label.split("/")[0]
        status, metrics = read_exports(run_dir)
        entry: dict = dict(seed=spec.seed, status=status, metrics=metrics, correct=None)
        if len(metrics.get("epoch", ())) and (run_dir / "test_correct.npz").exists():
            correct, saved = read_test_correct(run_dir / "test_correct.npz")
            if saved.get("epoch") == int(metrics["epoch"][-1]):
                entry["correct"] = correct
        groups.setdefault((arch, spec.optimizer), []).append(entry)
    return groups


def usable_runs(runs: list) -> list:
    """Finished runs (diverged and unfinished runs are counted, not averaged)."""
    return [r for r in runs if r["metrics"] and r["status"] and r["status"]["state"] == "finished"]


def _mean_std(values, scale: float = 100.0, digits: int = 2) -> str:
    values = np.asarray(values, dtype=float) * scale
    if values.size == 0:
        return "-"
    if values.size == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def _first_reaching(metrics: dict, threshold: float) -> tuple[int, float] | None:
    hits = np.nonzero(metrics["test_accuracy"] >= threshold)[0]
    if hits.size == 0:
        return None
    i = int(hits[0])
    return int(metrics["epoch"][i]), float(metrics["wall_time"][i])


def _reach_cells(runs: list, threshold: float) -> tuple[str, str]:
    reached = [hit for hit in (_first_reaching(r["metrics"], threshold) for r in runs) if hit is not None]
    if not reached:
        return f"- (0/{len(runs)})", "-"
    epochs, seconds = np.array(reached).T
    return f"{epochs.mean():.1f} ({len(reached)}/{len(runs)})", f"{seconds.mean():.0f}"


def _status_cell(runs: list) -> str:
    states = [r["status"]["state"] if r["status"] else "not started" for r in runs]
    diverged = [r for r in runs if r["status"] and r["status"]["state"] == "diverged"]
    text = f"{states.count('finished')}/{len(runs)}"
    unfinished = len(runs) - states.count("finished") - len(diverged)
    if unfinished:
        text += f", {unfinished} unfinished"
    if diverged:
        text += ", diverged: " + ", ".join(f"seed {r['seed']} step {r['status'].get('step')}" for r in diverged)
    return text


def results_table(groups: dict, best: bool = True) -> str:
    """One row per (architecture, optimiser); the best-epoch test accuracy only with ``best``."""
    header = ["architecture", "optimizer", "runs finished", "epochs"] + ["best test acc %"] * best + ["final test acc %"]
    for t in THRESHOLDS:
        header += [f"epochs to {t:.0%}", f"s to {t:.0%}"]
    header += ["s / epoch", "final train loss"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (arch, name), runs in groups.items():
        ok = usable_runs(runs)
        cells = [arch, name, _status_cell(runs)]
        if ok:
            cells.append(str(int(max(r["metrics"]["epoch"][-1] for r in ok))))
            if best:
                cells.append(_mean_std([r["metrics"]["test_accuracy"].max() for r in ok]))
            cells.append(_mean_std([r["metrics"]["test_accuracy"][-1] for r in ok]))
            for t in THRESHOLDS:
                cells += list(_reach_cells(ok, t))
            cells += [
                f"{np.mean([r['metrics']['epoch_time'].mean() for r in ok]):.1f}",
                _mean_std([r["metrics"]["train_loss"][-1] for r in ok], scale=1.0, digits=4),
            ]
        else:
            cells += ["-"] * (len(header) - 3)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budgets(groups: dict, arch: str) -> tuple[list[int], list[float]]:
    """The fixed budgets of an architecture's budget table: epochs E/5, E/2 and E (E the most
    epochs a finished run has), and training wall times 1/4, 1/2 and 1 of the fastest method's mean
    total training time."""
    runs = {name: usable_runs(r) for (a, name), r in groups.items() if a == arch}
    runs = {name: r for name, r in runs.items() if r}
    if not runs:
        return [], []
    most = max(int(r["metrics"]["epoch"][-1]) for rs in runs.values() for r in rs)
    fastest = min(float(np.mean([r["metrics"]["wall_time"][-1] for r in rs])) for rs in runs.values())
    return sorted({max(1, round(most / 5)), max(1, round(most / 2)), most}), [fastest / 4, fastest / 2, fastest]


def accuracy_within(metrics: dict, epochs: int | None = None, seconds: float | None = None) -> float:
    """Test accuracy after the last epoch that fits the budget (at most ``epochs`` epochs, or at
    most ``seconds`` of training wall time); NaN when no epoch fits."""
    fits = metrics["epoch"] <= epochs if epochs is not None else metrics["wall_time"] <= seconds
    hits = np.nonzero(fits)[0]
    return float(metrics["test_accuracy"][hits[-1]]) if hits.size else float("nan")


def budget_table(groups: dict, arch: str) -> str:
    """Test accuracy (mean ± std over seeds, %) at fixed epoch and wall-time budgets (:func:`budgets`);
    "(k/n)" when only k of n runs had finished an epoch within the budget."""
    epochs, seconds = budgets(groups, arch)
    if not epochs:
        return ""
    header = ["optimizer"] + [f"epoch {e}" for e in epochs] + [f"{t:.0f} s" for t in seconds]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (a, name), runs in groups.items():
        ok = usable_runs(runs)
        if a != arch or not ok:
            continue
        cells = [name]
        for budget in [dict(epochs=e) for e in epochs] + [dict(seconds=t) for t in seconds]:
            values = np.array([accuracy_within(r["metrics"], **budget) for r in ok])
            done = values[~np.isnan(values)]
            cells.append(_mean_std(done) + ("" if done.size == values.size else f" ({done.size}/{values.size})"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons(groups: dict, baseline: str) -> list[tuple[str, str, list]]:
    """(architecture, optimiser, [(run, baseline run)]) for each method with a seed both finished with as many epochs."""
    out = []
    for (arch, name), runs in groups.items():
        if name == baseline or (arch, baseline) not in groups:
            continue
        base = {r["seed"]: r for r in usable_runs(groups[(arch, baseline)])}
        pairs = [(r, base[r["seed"]]) for r in usable_runs(runs) if r["seed"] in base]
        pairs = [(m, b) for m, b in pairs if len(m["metrics"]["epoch"]) == len(b["metrics"]["epoch"])]
        if pairs:
            out.append((arch, name, pairs))
    return out


def paired_table(groups: dict, baseline: str, best: bool = True) -> str:
    """Per-seed differences (method - baseline) of final (and with ``best`` best-epoch) test accuracy, in points."""
    kinds = ("best", "final") if best else ("final",)
    header = ["architecture", "optimizer", "seeds"] + [f"{kind} acc - {baseline}" for kind in kinds] + [f"ahead on {kind}" for kind in kinds]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arch, name, pairs in comparisons(groups, baseline):
        diffs = {
            "best": np.array([m["metrics"]["test_accuracy"].max() - b["metrics"]["test_accuracy"].max() for m, b in pairs]),
            "final": np.array([m["metrics"]["test_accuracy"][-1] - b["metrics"]["test_accuracy"][-1] for m, b in pairs]),
        }
        cells = [arch, name, str(len(pairs))] + [_mean_std(diffs[kind]) for kind in kinds] + [f"{int((diffs[kind] > 0).sum())}/{len(pairs)}" for kind in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def format_p(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:.3f}" if value >= 0.001 else f"{value:.0e}"


def significance_tables(groups: dict, baseline: str) -> dict[str, str]:
    """{architecture: markdown} testing the final test accuracy of each method against ``baseline``."""
    rows = []
    for arch, name, pairs in comparisons(groups, baseline):
        test = paired_comparison([100 * m["metrics"]["test_accuracy"][-1] for m, _ in pairs], [100 * b["metrics"]["test_accuracy"][-1] for _, b in pairs], ALPHA)
        mc = [mcnemar(m["correct"], b["correct"]).p for m, b in pairs if m["correct"] is not None and b["correct"] is not None]
        rows.append((arch, name, test, f"{sum(p < ALPHA for p in mc)}/{len(mc)}" if mc else "-"))
    adjusted = holm([test.t_p for _, _, test, _ in rows])
    header = ["optimizer", "seeds", f"final acc - {baseline} [{1 - ALPHA:.0%} CI]", "paired t p", "Wilcoxon p", f"Holm t p ({int(np.count_nonzero(~np.isnan(adjusted)))} tests)", f"seeds with McNemar p < {ALPHA}"]
    lines: dict[str, list[str]] = {}
    notes: dict[str, dict[str, list[str]]] = {}  # {arch: {note: [optimisers]}}
    for (arch, name, test, mc_cell), holm_p in zip(rows, adjusted):
        interval = f" [{test.ci_low:.2f}, {test.ci_high:.2f}]" if test.n > 1 else ""
        cells = [name, str(test.n), f"{test.mean:.2f}{interval}", format_p(test.t_p), format_p(test.wilcoxon_p), format_p(holm_p), mc_cell]
        lines.setdefault(arch, ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]).append("| " + " | ".join(cells) + " |")
        if test.note:
            notes.setdefault(arch, {}).setdefault(test.note, []).append(name)
    tables = {arch: "\n".join(table) for arch, table in lines.items()}
    for arch, by_note in notes.items():
        tables[arch] += "\n\n" + "\n".join(f"- {', '.join(names)}: {note}." for note, names in by_note.items())
    return tables


def plot(groups: dict, arch: str, path: Path, title: str) -> Path | None:
    """2 x 2 panels: test accuracy and training loss, against epochs and against wall time; the
    band is the 95% t confidence interval of the mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series = {name: usable_runs(runs) for (a, name), runs in groups.items() if a == arch}
    series = {name: runs for name, runs in series.items() if runs}
    if not series:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), constrained_layout=True)
    lowest_accuracy = 1.0
    for index, (name, runs) in enumerate(series.items()):
        color = f"C{index}"
        epochs = min(len(r["metrics"]["epoch"]) for r in runs)
        x_epoch = runs[0]["metrics"]["epoch"][:epochs]
        x_time = np.mean([r["metrics"]["wall_time"][:epochs] for r in runs], axis=0)
        for row, key in enumerate(("test_accuracy", "train_loss")):
            values = np.array([r["metrics"][key][:epochs] for r in runs])
            scale = 100.0 if key == "test_accuracy" else 1.0
            mean = values.mean(0) * scale
            half = stats.t.ppf(1 - ALPHA / 2, len(runs) - 1) * values.std(0, ddof=1) * scale / np.sqrt(len(runs)) if len(runs) > 1 else np.zeros_like(mean)
            low, high = mean - half, mean + half
            for col, x in enumerate((x_epoch, x_time)):
                ax = axes[row, col]
                ax.plot(x, mean, color=color, label=f"{name} (n={len(runs)} seeds)", marker="o" if epochs <= 12 else None, markersize=3)
                ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
            if key == "test_accuracy" and epochs > 1:
                lowest_accuracy = min(lowest_accuracy, float(low[1:].min()) / 100.0)
    for col, xlabel in enumerate(("epoch", "training wall time (s)")):
        axes[0, col].set_ylabel("test accuracy (%)")
        axes[1, col].set_ylabel("training loss (full training set)")
        axes[1, col].set_yscale("log")
        for row in range(2):
            axes[row, col].set_xlabel(xlabel)
            axes[row, col].grid(True, alpha=0.3)
        for t in THRESHOLDS:
            axes[0, col].axhline(100 * t, color="grey", linestyle=":", linewidth=1)
        axes[0, col].set_ylim(max(0.0, 100 * lowest_accuracy - 0.5), 100.0 * min(1.0, max(THRESHOLDS) + 0.006) if lowest_accuracy > 0.9 else 100.0)  # accuracy stops at 100%, its t band need not
    for row in range(2):
        axes[row, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].legend(loc="lower right")
    fig.suptitle(f"{title}: {arch} (line: mean over seeds, band: its {1 - ALPHA:.0%} t confidence interval; dotted: 97% and 98%)")
    write_figure(path, fig)
    plt.close(fig)
    return path


def write_summary(root: str | Path, cfg: dict) -> str:
    """Write ``summary.md`` and one PNG per architecture under ``root``; return the markdown."""
    root = Path(root)
    groups = collect(root, cfg)
    parts = [f"# {cfg['name']}: {cfg.get('description') or ''}".rstrip(": "), ""]
    parts.append(
        f"Platform {cfg['platform']}, preset {cfg['preset']}, batch {cfg['batch']}, dtype {cfg['dtype']}, "
        f"data {cfg['data']['source']} (pool {cfg['data']['pool']}, subset {cfg['data']['subset']}), "
        f"seeds {cfg['seeds']}, up to {cfg['epochs']} epochs; hyperparameter overrides {cfg['hyper'] or 'none'}.  "
        "Accuracies in %, mean ± sample std over seeds; time is training wall time (evaluation excluded), "
        "as measured: runs that shared the CPU with other jobs show longer times (`kldwrm bench step` gives clean per-step timings)."
    )
    best = cfg["report_best_on_test"]
    if not best:
        parts += ["", "Only the final epoch's test accuracy is reported: the hyperparameters were selected on a validation split, and the best epoch on the test set would be a selection on test."]
    parts += ["", results_table(groups, best)]
    baseline = cfg["optimizers"][0]
    paired = paired_table(groups, baseline, best)
    if paired:
        parts += ["", f"Paired by seed (same initialisation and batches), difference to {baseline} in accuracy points:", "", paired]
    tables = significance_tables(groups, baseline)
    if tables:
        parts += [
            "", f"Significance of the final test accuracy minus {baseline}'s, paired by seed, in points; p-values two-sided; "
            "Holm over the paired t tests of every architecture and method in this summary; McNemar exact, per seed, on which test examples each classifies correctly.",
        ]
    for arch, table in tables.items():
        parts += ["", f"{arch}:", "", table]
    for arch in dict.fromkeys(a for a, _ in groups):
        table = budget_table(groups, arch)
        if table:
            parts += ["", f"{arch}: test accuracy at fixed budgets (after the last epoch within the budget; wall time is training time as measured):", "", table]
    for arch in dict.fromkeys(a for a, _ in groups):
        png = plot(groups, arch, root / f"{arch}.png", cfg["name"])
        if png is not None:
            parts += ["", f"![{arch}]({png.name})"]
    text = "\n".join(parts) + "\n"
    write_text(root / "summary.md", text)
    return text
