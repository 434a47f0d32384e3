"""Bad input, tried as a user would: every case is a real ``kldwrm`` subprocess.

Each case must end with its exit status (2: the arguments were refused before anything was
written or computed; 1: an error found later, caught at the command boundary), exactly one line on
stderr holding the expected message and no traceback, and leave the folder it ran in exactly as
it was (nothing written, no run folder to poison the next command).  The cases of a group share
one folder, and after all of them the group's corrected command must succeed there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest

from kldwrm_ref.experiments.parallel import max_jobs

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # a loaded machine; unloaded, each bad case takes about a second and each corrected command a few


class Case(NamedTuple):
    id: str
    argv: list[str]
    status: int
    message: str  # must appear in the one stderr line
    env: dict[str, str] = {}  # noqa: RUF012 (a NamedTuple default, never mutated)


def kldwrm(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in ("KLDWRM_DATA", "KLDWRM_TRACEBACK")}
    environment.update(PYTHONPATH=str(ROOT), XDG_CACHE_HOME=str(cwd / ".cache-never-written"), **(env or {}))
    environment.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # cases run side by side; BLAS threads on shared cores slow verify 15x
    return subprocess.run([sys.executable, "-m", "kldwrm_ref.cli", *argv], cwd=cwd, env=environment, capture_output=True, text=True, timeout=TIMEOUT_S)


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (and beside it: a name that escapes --out), with file contents."""
    paths = [*folder.rglob("*"), *folder.parent.glob("escape*")]
    return {str(p): p.read_bytes() if p.is_file() else None for p in sorted(paths)}


# --------------------------------------------------------------------------------- the groups
MNIST = ["mnist", "--synthetic", "--architectures", "20-8-10", "--epochs", "1", "--optimizers", "kfac", "--seeds", "0", "--batch", "100", "--no-progress", "--out", "out"]


def mnist(*extra: str) -> list[str]:
    """The synthetic command with ``extra`` options (an option given twice: the last one counts)."""
    return [*MNIST, *extra]


def on_mnist(*extra: str) -> list[str]:
    """The same command on MNIST (784 inputs; no MNIST is read: the sizes are refused first, the data directories are bad)."""
    return [{"20-8-10": "784-8-10"}.get(arg, arg) for arg in MNIST if arg != "--synthetic"] + list(extra)


MNIST_CASES = [
    Case("batch-above-data", mnist("--batch", "100000"), 2, "batch must be in [1, 2000], the training examples (the 2000 synthetic training examples), got 100000"),
    Case("batch-zero", mnist("--batch", "0"), 2, "batch must be an integer >= 1, got 0"),
    Case("seeds-repeated", mnist("--seeds", "0", "0"), 2, "seeds must be distinct, got [0, 0] (repeated: 0)"),
    Case("seed-negative", mnist("--seeds", "-1"), 2, "seeds must be a non-empty list of integers >= 0, got [-1]"),
    Case("epochs-zero", mnist("--epochs", "0"), 2, "epochs must be an integer >= 1, got 0"),
    Case("epochs-not-a-number", mnist("--epochs", "x"), 2, "argument --epochs: invalid int value: 'x'"),
    Case("optimizers-repeated", mnist("--optimizers", "kfac", "kfac"), 2, "optimizers must be distinct"),
    Case("optimizer-unknown", mnist("--optimizers", "adam"), 2, "argument --optimizers: invalid choice: 'adam'"),
    Case("architectures-repeated", mnist("--architectures", "20-8-10", "20-8-10"), 2, "architectures must be distinct"),
    Case("architecture-9-classes", mnist("--architectures", "20-8-9"), 2, "the output layer must have 10 classes, got 9"),
    Case("architecture-not-sizes", mnist("--architectures", "20-x-10"), 2, "architecture must look like 784-256-10"),
    Case("subset-with-synthetic", mnist("--subset", "100"), 2, "data.subset (--subset) applies to MNIST only"),
    Case("pool-with-synthetic", mnist("--pool", "4"), 2, "data.pool (--pool) applies to MNIST only"),
    Case("name-escapes-out", mnist("--name", "../../escape"), 2, "name must be a plain folder name"),
    Case("name-empty", mnist("--name", ""), 2, "name must be a plain folder name"),
    Case("name-dot-dot", mnist("--name", ".."), 2, "name must be a plain folder name"),
    Case("jobs-above-cores", mnist("--jobs", "999"), 2, f"--jobs must be an integer in [1, {max_jobs()}] (the CPU cores of this machine), got 999"),
    Case("jobs-zero", mnist("--jobs", "0"), 2, "--jobs must be an integer in [1,"),
    Case("scheduler-not-an-address", mnist("--scheduler", "notanaddress"), 2, "--scheduler must be a Dask scheduler address [tcp://]HOST:PORT"),
    Case("scheduler-port-out-of-range", mnist("--scheduler", "tcp://127.0.0.1:70000"), 2, "--scheduler must be a Dask scheduler address"),
    Case("scheduler-and-jobs", mnist("--jobs", "2", "--scheduler", "tcp://127.0.0.1:8786"), 2, "--jobs and --scheduler exclude each other"),
    Case("scheduler-unreachable", mnist("--scheduler", "tcp://127.0.0.1:1"), 1, "--scheduler tcp://127.0.0.1:1: no Dask scheduler answered within 5 s"),
    Case("hyper-out-of-range", mnist("--hyper", "rho=1.5"), 2, "rho must be"),
    Case("hyper-unknown", mnist("--hyper", "nonsense=1"), 2, "unknown hyperparameter"),
    Case("hyper-no-value", mnist("--hyper", "novalue"), 2, "--hyper takes [OPTIMISER.]KEY=VALUE, got 'novalue'"),
    Case("summary-only-before-a-run", mnist("--summary-only"), 2, "--summary-only: out/quick holds no experiment (no experiment.json)"),
    Case("config-missing", mnist("--config", "missing.json"), 2, "missing.json: no such configuration file"),
    Case("config-name-escapes", mnist("--config", "escape.json"), 2, "got '../../escape'"),
    Case("config-hyper-unknown-optimizer", mnist("--config", "hyper.json"), 2, "hyper: keys must be '*' or an optimiser name"),
    Case("out-is-a-file", mnist("--out", "a-file"), 2, "--out 'a-file' exists and is not a directory"),
    Case("out-in-proc", mnist("--out", "/proc/x"), 2, "--out '/proc/x': cannot write in '/proc'"),
    Case("unknown-option", mnist("--frobnicate"), 2, "unrecognized arguments: --frobnicate"),
    Case("mnist-subset-zero", on_mnist("--subset", "0"), 2, "data.subset (--subset) must be an integer >= 1, got 0"),
    Case("mnist-subset-negative", on_mnist("--subset", "-7"), 2, "data.subset (--subset) must be an integer >= 1, got -7"),
    Case("mnist-subset-above-data", on_mnist("--subset", "70000"), 2, "data.subset (--subset) must be in [1, 60000] (the 60000 MNIST training images), got 70000"),
    Case("mnist-batch-above-subset", on_mnist("--subset", "100", "--batch", "200"), 2, "batch must be in [1, 100], the training examples (the --subset of 100), got 200"),
    Case("mnist-pool-3", on_mnist("--pool", "3"), 2, "data.pool (--pool) must divide the MNIST image side 28"),
    Case("mnist-data-empty-dir", on_mnist(), 1, "KLDWRM_DATA='empty' lacks train-images-idx3-ubyte, train-labels-idx1-ubyte", dict(KLDWRM_DATA="empty")),
    Case("mnist-data-garbage", on_mnist(), 1, "garbage/train-images-idx3-ubyte is not an IDX file", dict(KLDWRM_DATA="garbage")),
    Case("mnist-data-missing-dir", on_mnist(), 1, "KLDWRM_DATA='missing': no such directory", dict(KLDWRM_DATA="missing")),
    Case("mnist-data-a-file", on_mnist(), 1, "KLDWRM_DATA='a-file' is not a directory", dict(KLDWRM_DATA="a-file")),
]

TRAIN = ["train", "--synthetic", "--epochs", "1", "--hidden", "8", "--optimizers", "kfac", "--batch", "100", "--out", "out"]
TRAIN_CASES = [
    Case("train-batch-above-data", [*TRAIN, "--batch", "5000"], 2, "batch must be in [1, 2000]"),
    Case("train-hidden-zero", [*TRAIN, "--hidden", "0"], 2, "--hidden must be an integer >= 1, got 0"),
    Case("train-seed-negative", [*TRAIN, "--seed", "-1"], 2, "--seed must be an integer >= 0, got -1"),
    Case("train-epochs-zero", [*TRAIN, "--epochs", "0"], 2, "epochs must be an integer >= 1, got 0"),
    Case("train-out-in-proc", [*TRAIN, "--out", "/proc/x"], 2, "--out '/proc/x': cannot write in '/proc'"),
]

PROTOCOL = dict(
    name="tp",
    experiment=dict(optimizers=["kfac"], architectures=[[20, 8, 10]], batch=50, backend="numpy", data=dict(source="synthetic", n_train=400, n_test=100)),
    validation=100, grid={"*": {"step_size": [0.01]}}, tune=dict(epochs=1, seeds=[0]), final=dict(epochs=1, seeds=[0]),
)
PROTOCOLS = {
    "good.json": PROTOCOL,
    "validation-leaves-no-batch.json": dict(PROTOCOL, validation=380),
    "grid-empty.json": dict(PROTOCOL, grid={}),
    "grid-axes-empty.json": dict(PROTOCOL, grid={"*": {}}),
    "name-escapes.json": dict(PROTOCOL, name="../escape"),
    "tune-seeds-repeated.json": dict(PROTOCOL, tune=dict(epochs=1, seeds=[3, 3])),
}
TUNE = ["tune", "--no-progress", "--out", "out", "--config"]
TUNE_CASES = [
    Case("tune-validation-leaves-no-batch", [*TUNE, "validation-leaves-no-batch.json"], 2, "batch must be in [1, 20], the training examples (the 400 synthetic training examples minus 380 held out for validation), got 50"),
    Case("tune-grid-empty", [*TUNE, "grid-empty.json"], 2, "grid: no axes for optimiser 'kfac'"),
    Case("tune-grid-axes-empty", [*TUNE, "grid-axes-empty.json"], 2, "grid['*'] must map hyperparameter names to non-empty lists of values"),
    Case("tune-name-escapes", [*TUNE, "name-escapes.json"], 2, "name must be a plain folder name (non-empty, no '/', '\\', '.' or '..', no leading or trailing spaces), got '../escape'"),
    Case("tune-seeds-repeated", [*TUNE, "tune-seeds-repeated.json"], 2, "tune.seeds must be distinct"),
    Case("tune-config-missing", [*TUNE, "missing.json"], 2, "missing.json: no such configuration file"),
    Case("tune-jobs-above-cores", [*TUNE, "good.json", "--jobs", "999"], 2, "--jobs must be an integer in [1,"),
    Case("tune-scheduler-not-an-address", [*TUNE, "good.json", "--scheduler", "host:port"], 2, "--scheduler must be a Dask scheduler address"),
    Case("tune-summary-before-a-run", [*TUNE, "good.json", "--stage", "summary"], 2, "--stage summary: out/tp holds no protocol run (no protocol.json)"),
    Case("tune-out-in-proc", [*TUNE, "good.json", "--out", "/proc/x"], 2, "--out '/proc/x': cannot write in '/proc'"),
]

VERIFY = ["verify", "--synthetic", "--steps", "2"]
VERIFY_CASES = [
    Case("verify-seed-negative", [*VERIFY, "--seed", "-1"], 2, "--seed must be an integer >= 0, got -1"),
    Case("verify-steps-zero", [*VERIFY, "--steps", "0"], 2, "--steps must be an integer >= 1, got 0"),
    Case("verify-batch-zero", [*VERIFY, "--batch", "0"], 2, "--batch must be an integer >= 1, got 0"),
    Case("verify-batch-times-steps", [*VERIFY, "--batch", "5000", "--steps", "20"], 2, "--batch x --steps must be at most 60000"),
    Case("verify-json-in-proc", [*VERIFY, "--json", "/proc/x.json"], 2, "--json '/proc/x.json': cannot write in '/proc'"),
    Case("verify-data-missing-dir", ["verify", "--steps", "2"], 1, "KLDWRM_DATA='missing': no such directory", dict(KLDWRM_DATA="missing")),
]

BENCH = ["bench", "curvature", "--repeats", "1"]
BENCH_CASES = [
    Case("bench-kernels-repeats-zero", ["bench", "kernels", "--repeats", "0"], 2, "--repeats must be an integer >= 1, got 0"),
    Case("bench-curvature-repeats-negative", ["bench", "curvature", "--repeats", "-1"], 2, "--repeats must be an integer >= 1, got -1"),
    Case("bench-unknown", ["bench", "frobnicate"], 2, "argument what: invalid choice: 'frobnicate'"),
    Case("bench-step-zero-width", ["bench", "step", "--architectures", "784-0-10"], 2, "argument --architectures: must be MLP sizes like 784-256-10 (>= 2 layers, each >= 1) or one of paper-cnn, got '784-0-10'"),
    Case("bench-step-one-layer", ["bench", "step", "--architectures", "5"], 2, "got '5'"),
    Case("bench-step-json-in-proc", ["bench", "step", "--json", "/proc/x.json"], 2, "--json '/proc/x.json': cannot write in '/proc'"),
    Case("unknown-command", ["frobnicate"], 2, "kldwrm: error: unknown command 'frobnicate'"),
]


class Group(NamedTuple):
    cases: list[Case]
    corrected: list[str]
    made: str  # a file the corrected command must have written


GROUPS = {
    "mnist": Group(MNIST_CASES, MNIST, "out/quick/20-8-10/kfac/seed-0/status.json"),
    "train": Group(TRAIN_CASES, TRAIN, "out/train/784-8-10/kfac/seed-0/status.json"),
    "tune": Group(TUNE_CASES, [*TUNE, "good.json"], "out/tp-final-20-8-10/summary.md"),
    "verify": Group(VERIFY_CASES, VERIFY, ""),
    "bench": Group(BENCH_CASES, BENCH, ""),
}


def test_there_are_at_least_40_distinct_cases():
    ids = [case.id for group in GROUPS.values() for case in group.cases]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


def inputs(folder: Path) -> None:
    """The files the cases read: configurations, a plain file, data directories."""
    (folder / "a-file").write_text("not a directory\n")
    (folder / "escape.json").write_text(json.dumps(dict(name="../../escape")))
    (folder / "hyper.json").write_text(json.dumps(dict(hyper={"adam": {"step_size": 0.1}})))
    (folder / "empty").mkdir()
    (folder / "garbage").mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (folder / "garbage" / name).write_bytes(b"garbage\n" * 10)
    for name, protocol in PROTOCOLS.items():
        (folder / name).write_text(json.dumps(protocol))


def check(case: Case, done: subprocess.CompletedProcess) -> None:
    lines = done.stderr.splitlines()
    assert done.returncode == case.status, (case.id, done.returncode, done.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in done.stderr, (case.id, done.stderr[-2000:])
    assert lines[0].startswith("kldwrm") and case.message in lines[0], (case.id, lines[0], case.message)


@pytest.mark.parametrize("group", list(GROUPS))
def test_each_bad_input_is_one_line_writes_nothing_and_the_corrected_command_then_works(group, tmp_path):
    """The group's cases run side by side (a subprocess each, as many as there are cores) in one
    folder, which must be unchanged after them; then the corrected command runs there."""
    folder = tmp_path / "here"
    folder.mkdir()
    inputs(folder)
    cases, corrected, made = GROUPS[group]
    if any(case.id == "scheduler-unreachable" for case in cases):
        pytest.importorskip("distributed")
    before = tree(folder)
    with ThreadPoolExecutor(max_workers=max_jobs()) as pool:
        results = list(pool.map(lambda case: kldwrm(case.argv, folder, case.env), cases))
    for case, done in zip(cases, results):
        check(case, done)
    after = tree(folder)
    assert after == before, ("written or changed", sorted(set(after) ^ set(before)) or [p for p in after if after[p] != before[p]])
    done = kldwrm(corrected, folder)
    assert done.returncode == 0, (group, done.stderr[-3000:])
    assert "Traceback" not in done.stderr
    if made:
        assert (folder / made).is_file(), made


def test_version_prints_the_package_version(tmp_path):
    from kldwrm_ref import __version__

    done = kldwrm(["--version"], tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"kldwrm_ref {__version__}\n", "")


def test_every_option_has_help_and_states_its_default(tmp_path):
    """`kldwrm mnist --help` documents every option (the bench step description is whole)."""
    done = kldwrm(["mnist", "--help"], tmp_path)
    text = " ".join(done.stdout.split())
    for option, default in (("--epochs", "quick: 5"), ("--seeds", "quick: 0 1"), ("--batch", "quick: 512"), ("--jobs", "default 1"), ("--scheduler", "within 5 s")):
        assert option in text and default in text, option
    step = " ".join(kldwrm(["bench", "step", "--help"], tmp_path).stdout.split())
    assert "matrix-product throughput." in step
