"""``kldwrm bench interleave``: the order of the runs, the paired ratios, the child process."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from kldwrm_ref.bench import interleave as il
from kldwrm_ref.cli import main
from kldwrm_ref.storage import read_json

HERE = Path(__file__).resolve().parents[1]


def test_pairs_alternate_which_tree_runs_first_after_an_untimed_pair():
    calls = []

    def run(tree, job):
        calls.append((tree.name, job.name))
        return dict.fromkeys(il.QUANTITIES, 1.0)

    trees = {"before": Path("/old"), "after": Path("/new")}
    jobs = [il.Job("kfac", "paper-cnn"), il.Job("q-kld-wrm", "paper-cnn")]
    records = il.interleave(trees, jobs, 3, run=run)
    assert calls == [
        ("new", "kfac"), ("old", "kfac"), ("new", "q-kld-wrm"), ("old", "q-kld-wrm"),  # untimed: fills each tree's compile cache
        ("old", "kfac"), ("new", "kfac"), ("old", "q-kld-wrm"), ("new", "q-kld-wrm"),
        ("new", "kfac"), ("old", "kfac"), ("new", "q-kld-wrm"), ("old", "q-kld-wrm"),
        ("old", "kfac"), ("new", "kfac"), ("old", "q-kld-wrm"), ("new", "q-kld-wrm"),
    ]
    assert [(r["rep"], r["name"], r["tree"]) for r in records][:4] == [(1, "kfac", "before"), (1, "kfac", "after"), (1, "q-kld-wrm", "before"), (1, "q-kld-wrm", "after")]
    assert len(records) == 12


def test_the_summary_is_the_geometric_mean_of_the_paired_ratios_with_its_t_interval():
    """Recomputed here from the pairs: exp of the mean log ratio and of mean -+ t_{0.975, n-1} s / sqrt(n);
    a quantity that is NaN in a pair (SGD's refresh step) leaves that pair out."""
    rng = np.random.default_rng(0)
    before = rng.uniform(30, 40, 6)
    after = before * rng.uniform(0.4, 0.5, 6)
    records = []
    for rep, (b, a) in enumerate(zip(before, after), start=1):
        refresh = math.nan if rep == 2 else 3 * b
        records.append(dict(rep=rep, name="kfac", tree="before", times=dict(median_non_refresh_s=b, refresh_s=refresh, mean_s=b)))
        records.append(dict(rep=rep, name="kfac", tree="after", times=dict(median_non_refresh_s=a, refresh_s=3 * a, mean_s=a)))
    summary = il.summarise(records)["kfac"]
    logs = np.log(after / before)
    half = stats.t.ppf(0.975, 5) * logs.std(ddof=1) / np.sqrt(6)
    got = summary["mean_s"]
    assert got.n == 6 and got.ratio == pytest.approx(np.exp(logs.mean()), rel=1e-9)
    assert (got.ci_low, got.ci_high) == pytest.approx((np.exp(logs.mean() - half), np.exp(logs.mean() + half)), rel=1e-9)
    assert got.before_median_s == pytest.approx(np.median(before)) and got.after_median_s == pytest.approx(np.median(after))
    assert summary["refresh_s"].n == 5 and summary["refresh_s"].ratio == pytest.approx(np.exp(np.delete(logs, 1).mean()), rel=1e-9)
    assert "after/before" in il.format_summary(il.summarise(records))


def test_a_child_times_a_tiny_network_with_the_checkout_it_was_given(tmp_path):
    times = il.run_in_tree(HERE, il.Job("kfac", (6, 4, 3), batch=8))
    assert set(times) == set(il.QUANTITIES) and all(t > 0 for t in times.values())
    impostor = tmp_path / "kldwrm_ref"
    (impostor / "bench").mkdir(parents=True)
    (impostor / "bench" / "step.py").write_text("")
    (impostor / "__init__.py").write_text(  # a checkout whose package hands over to this one
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('kldwrm_ref', {str(HERE / 'kldwrm_ref' / '__init__.py')!r}, submodule_search_locations=[{str(HERE / 'kldwrm_ref')!r}])\n"
        "module = importlib.util.module_from_spec(spec)\nsys.modules['kldwrm_ref'] = module\nspec.loader.exec_module(module)\n"
    )
    with pytest.raises(RuntimeError, match="imported kldwrm_ref from"):
        il.run_in_tree(tmp_path.resolve(), il.Job("kfac", (6, 4, 3), batch=8))
    (impostor / "__init__.py").write_text("raise ImportError('not this one')\n")
    with pytest.raises(RuntimeError, match="failed \\(exit 1\\): ImportError: not this one"):
        il.run_in_tree(tmp_path.resolve(), il.Job("kfac", (6, 4, 3), batch=8))


@pytest.mark.parametrize("args, message", [
    (["/no/such/folder"], r"before '/no/such/folder' is not a checkout of kldwrm_ref"),
    ([str(HERE), "--reps", "1"], r"--reps must be an integer >= 2"),
    ([str(HERE), "--batch", "0"], r"--batch must be an integer >= 1"),
    ([str(HERE), "--json", "/no/such/folder/out.json"], r"--json '/no/such/folder/out.json': the directory"),
])
def test_bad_arguments_get_one_line_before_anything_runs(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "interleave", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert re.search(message, err)


def test_a_failing_child_ends_the_run_with_one_line_and_keeps_the_pairs_measured(tmp_path, monkeypatch, capsys):
    calls = []

    def run(tree, job):
        calls.append(tree)
        if len(calls) == 5:  # the untimed pair, the first timed pair, then the failure
            raise RuntimeError("timing kfac in /old failed (exit 1): MemoryError")
        return dict.fromkeys(il.QUANTITIES, 0.01 * len(calls))

    monkeypatch.setattr(il, "run_in_tree", run)
    out = tmp_path / "pairs.json"
    with pytest.raises(SystemExit, match=r"kldwrm bench interleave: timing kfac in /old failed \(exit 1\): MemoryError"):
        main(["bench", "interleave", str(HERE), str(HERE), "--optimizers", "kfac", "--reps", "4", "--json", str(out)])
    saved = read_json(out)
    assert saved["complete"] is False and [(r["rep"], r["tree"]) for r in saved["records"]] == [(1, "before"), (1, "after")]
    assert "kfac" in capsys.readouterr().out
