import json

import pytest

from kldwrm_ref import cli
from kldwrm_ref.experiments.cli import train_main
from kldwrm_ref.theory import verify


def test_verify_runs_every_claim_and_all_pass_on_synthetic_data(tmp_path, capsys):
    out = tmp_path / "verify.json"
    assert verify.main(["--synthetic", "--steps", "10", "--json", str(out)]) == 0  # a short trajectory keeps the suite quick; users run 20
    rows = json.loads(out.read_text())
    assert {r["status"] for r in rows} == {"PASS", "INFO"}
    claims = " ".join(r["claim"] for r in rows)
    for needle in ("Theorem 1", "Theorem 2", "Theorem 3", "Limits §4.5", "QE consistency (a)", "QE consistency (b)", "KL expansion", "K-FAC"):
        assert needle in claims
    assert "PASS" in capsys.readouterr().out
    on_cnn = [r for r in rows if r["on"].startswith("CNN")]
    assert {r["claim"].split(":")[0] for r in on_cnn} >= {"Theorem 1", "Theorem 2", "Theorem 3", "QE consistency (b)"}
    assert {r["status"] for r in on_cnn} == {"PASS"}


def test_verify_exits_non_zero_on_a_failed_claim(monkeypatch, capsys):
    failing = verify.CheckResult("broken claim", "test", 1, 1.0, 1e-9)
    monkeypatch.setattr(verify, "run_all", lambda *a, **k: [failing])
    assert verify.main([]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_train_runs_on_synthetic_data(tmp_path, capsys):
    assert train_main(["--synthetic", "--epochs", "1", "--optimizers", "sgd", "kfac", "--hidden", "16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 784-16-10 | kfac | 1/1 |" in out and "final test acc %" in out
    assert (tmp_path / "train" / "784-16-10" / "sgd" / "seed-0" / "metrics.csv").exists()


def test_cli_lists_commands_and_rejects_unknown(capsys):
    assert cli.main([]) == 0
    assert "verify" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    with pytest.raises(SystemExit):
        train_main(["--epochs", "0", "--synthetic"])


def _bad_paths(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    return {"missing directory": str(tmp_path / "missing" / "x.json"), "a directory": str(tmp_path), "below a file": str(a_file / "x.json")}, a_file


# The function each command calls to start its work: a bad output path must be refused before it.
WORK = {"verify": ("kldwrm_ref.theory.verify", "run_all"), "bench step": ("kldwrm_ref.bench.step", "gemm_throughput"), "mnist": ("kldwrm_ref.experiments.cli", "run_experiment"), "train": ("kldwrm_ref.experiments.cli", "run_experiment")}


@pytest.mark.parametrize("command", list(WORK))
def test_bad_output_paths_fail_before_any_work_with_one_line(command, tmp_path, capsys, monkeypatch):
    """Every output path is checked before any work (the command's work function, replaced here by
    one that fails the test, is never called): exit 2 with one line naming the option."""
    import importlib

    module, function = WORK[command]
    monkeypatch.setattr(importlib.import_module(module), function, lambda *a, **k: pytest.fail(f"{command} started its work"))
    json_paths, a_file = _bad_paths(tmp_path)
    if command in ("mnist", "train"):
        cases = {"an existing file": [str(a_file)], "below a file": [str(a_file / "runs")]}
        option = "--out"
    else:
        cases = {label: [path] for label, path in json_paths.items()}
        option = "--json"
    argv_head = command.split() + (["--synthetic"] if command in ("verify", "mnist", "train") else [])
    for label, (path,) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*argv_head, option, path])
        assert exit_info.value.code == 2, label
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"kldwrm {command}: error: {option} ") and repr(path) in err[0], (label, err)


def test_verify_reports_claims_on_how_steps_combine_as_not_checked_on_one_step(tmp_path, capsys, monkeypatch):
    """With --steps 1 the theorems on the real trajectories (and the EA-of-factors gap, exactly 0
    for one factor) cannot fail: they are NOT CHECKED, never PASS; the single-step claims still run.
    (The random-history checks, whose length --steps does not set, are left out to keep this quick.)"""
    monkeypatch.setattr(verify, "synthetic_checks", lambda seed: [])
    out = tmp_path / "verify.json"
    assert verify.main(["--synthetic", "--steps", "1", "--batch", "8", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    unchecked = {(r["claim"].split(":")[0], r["on"].split(",")[0]) for r in rows if r["status"] == "NOT CHECKED"}
    assert unchecked == {(claim, on) for claim in ("Theorem 1", "Theorem 2", "Theorem 3") for on in ("MLP 49-16-10", "CNN 1x7x7 conv3/2-tanh-27-10")} | {("K-FAC", "MLP 49-16-10")}
    trajectory = [r for r in rows if r["steps"] == 1]
    assert all(r["status"] != "PASS" or r["min_steps"] == 1 for r in trajectory)
    assert "7 not checked" in capsys.readouterr().out
