"""Parallel sweeps (``--jobs``, ``--scheduler``) write the same runs as the serial sweep."""

import os
import signal
import subprocess
import sys
import time

import pytest

from kldwrm_ref.experiments import parallel, runner
from kldwrm_ref.experiments.cli import main
from kldwrm_ref.experiments.config import expand, validate_config
from kldwrm_ref.storage import read_csv, read_json

from kill_campaign import _alive

ARGV = ["--synthetic", "--architectures", "12-8-10", "--optimizers", "kfac", "qe-kld-wrm", "--seeds", "0", "1", "--epochs", "2", "--batch", "40", "--dtype", "float64", "--hyper", "period=3", "--no-progress"]
TIMELESS = [k for k in runner.METRIC_FIELDS if k not in ("wall_time", "epoch_time")]


def sweep(out, *extra):
    assert main([*ARGV, "--out", str(out), *extra]) == 0
    cfg = validate_config(read_json(out / "quick/experiment.json"))
    return {spec.label: out / "quick" / spec.label for spec in expand(cfg)}


def assert_same_runs(a: dict, b: dict):
    assert a.keys() == b.keys() and len(a) == 4
    for label in a:
        rows_a, rows_b = read_csv(a[label] / "metrics.csv"), read_csv(b[label] / "metrics.csv")
        assert [[r[k] for k in TIMELESS] for r in rows_a] == [[r[k] for k in TIMELESS] for r in rows_b], label
        assert read_json(a[label] / "status.json") == read_json(b[label] / "status.json") == dict(state="finished", epochs_completed=2)
        config_a, config_b = read_json(a[label] / "config.json"), read_json(b[label] / "config.json")
        assert config_a == config_b, label
        assert (a[label] / "test_correct.npz").read_bytes() == (b[label] / "test_correct.npz").read_bytes()


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    return sweep(tmp_path_factory.mktemp("serial"))


def trained_elsewhere() -> bool:
    """No run loaded its data in this process: they ran in workers."""
    return runner._cached_data.cache_info().misses == 0


def test_jobs_2_writes_the_serial_runs_extends_and_skips(serial, tmp_path, capsys):
    runner._cached_data.cache_clear()
    sweep(tmp_path, "--jobs", "2", "--epochs", "1")
    runs = sweep(tmp_path, "--jobs", "2")  # the workers extend every run from its epoch-1 checkpoint
    assert_same_runs(serial, runs)
    assert "| 12-8-10 | qe-kld-wrm | 2/2 |" in capsys.readouterr().out
    written = {label: (run / "metrics.csv").stat().st_mtime_ns for label, run in runs.items()}
    sweep(tmp_path, "--jobs", "2")  # finished: nothing is rewritten
    assert {label: (run / "metrics.csv").stat().st_mtime_ns for label, run in runs.items()} == written
    assert trained_elsewhere()


def test_a_dask_cluster_writes_the_serial_runs(serial, tmp_path):
    from distributed import LocalCluster

    runner._cached_data.cache_clear()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        runs = sweep(tmp_path, "--scheduler", cluster.scheduler_address)
    assert_same_runs(serial, runs)
    assert trained_elsewhere()


def test_missing_extra_gives_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "joblib", None)  # makes `import joblib` fail as if it were not installed
    with pytest.raises(SystemExit) as exit_info:
        main([*ARGV, "--out", str(tmp_path), "--jobs", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "kldwrm mnist: error: --jobs needs the optional package joblib: pip install 'kldwrm_ref[parallel]' (see kldwrm mnist --help)\n"
    assert not (tmp_path / "quick").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--jobs", "0"], "--jobs must be an integer in [1, "), (["--jobs", str(parallel.max_jobs() + 1)], f"in [1, {parallel.max_jobs()}] (the CPU cores of this machine)"),
        (["--jobs", "2", "--scheduler", "tcp://127.0.0.1:1"], "exclude each other"), (["--scheduler", "10.0.0.5"], "[tcp://]HOST:PORT"),
    ],
)
def test_bad_parallel_options(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*ARGV, "--out", str(tmp_path), *extra])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0]
    assert not tmp_path.joinpath("quick").exists()


@pytest.mark.parametrize("jobs, runs, workers", [(2, 1, None), (2, 3, 2), (8, 3, 3)])
def test_never_more_workers_than_runs(jobs, runs, workers, monkeypatch, tmp_path):
    """--jobs N with R runs starts min(N, R) workers; one worker is the serial sweep in this process."""
    calls = []

    def fake_parallel_map(function, arguments, n_jobs, scheduler):
        calls.append(n_jobs)
        return iter([(run_dir, dict(state="finished", epochs_completed=1)) for _, run_dir in arguments])

    monkeypatch.setattr(parallel, "parallel_map", fake_parallel_map)
    monkeypatch.setattr(runner, "run_one", lambda spec, data, run_dir, progress, log: dict(state="finished", epochs_completed=1))
    specs = expand(validate_config(dict(name="w", optimizers=["sgd"], architectures=[[12, 8, 10]], seeds=list(range(runs)), data=dict(source="synthetic"), batch=40)))
    runner.run_tasks([(spec, tmp_path / spec.label) for spec in specs], progress=False, log=lambda *_: None, jobs=jobs)
    assert calls == ([] if workers is None else [workers])


def test_an_unreachable_scheduler_is_one_line_within_the_timeout_and_writes_nothing(tmp_path):
    pytest.importorskip("distributed")
    start = time.perf_counter()
    with pytest.raises(OSError, match=f"no Dask scheduler answered within {parallel.CONNECT_TIMEOUT_S} s"):
        runner.run_experiment(dict(name="u", optimizers=["sgd"], architectures=[[12, 8, 10]], seeds=[0], data=dict(source="synthetic"), batch=40), tmp_path, scheduler="tcp://127.0.0.1:1")
    assert time.perf_counter() - start >= parallel.CONNECT_TIMEOUT_S - 1  # it waited for the answer (a lower bound holds under load)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killing_the_sweep_ends_its_workers(tmp_path, sig):
    """`kill` of a --jobs sweep leaves no worker training on (and holding its run's lock)."""
    endless = ["--synthetic", "--architectures", "12-8-10", "--optimizers", "kfac", "--seeds", "0", "1", "--epochs", "100000", "--batch", "40", "--no-progress"]
    command = [sys.executable, "-m", "kldwrm_ref.cli", "mnist", *endless, "--out", str(tmp_path), "--jobs", "2"]
    sweep_process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def both_locks():
            locks = sorted((tmp_path / "quick").rglob(".lock"))
            return locks if len(locks) == 2 else None

        workers = [read_json(lock)["pid"] for lock in wait_for(both_locks, 120)]
        assert sweep_process.pid not in workers and all(_alive(pid) for pid in workers)
        sweep_process.send_signal(sig)
        sweep_process.wait(timeout=10)
        assert wait_for(lambda: not any(_alive(pid) for pid in workers), 15), f"workers {workers} outlived the killed sweep"
    finally:
        try:
            os.killpg(sweep_process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(condition, seconds: float):
    """``condition()``'s first truthy value within ``seconds``, polled, else None."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    return None
