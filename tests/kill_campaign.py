"""The kill campaign: SIGKILL a real sweep, at random moments and inside its writes, until it finishes.

``python tests/kill_campaign.py --kills 20 --jobs 1`` (or ``--jobs 2``) runs a small
synthetic ``kldwrm mnist`` sweep once without interruption (the reference), then again as a
subprocess that it kills with SIGKILL, restarts, and kills again, ``--kills`` times, before
letting it finish.  Kill moments come from a seeded generator and are set in progress, not
time: each attempt runs a random share of the remaining epochs (:func:`kill_progress`, always
leaving one beyond the epochs the other workers have in flight), counted from its "epoch k/E"
lines, plus a fraction of an epoch, so a kill lands inside the sweep however loaded the machine
is.  Every other kill waits, through the test-only hook
:data:`kldwrm_ref.storage.WRITE_DELAY_VARIABLE` (each atomic write sleeps before its final
rename), for a temporary file of the sweep to appear and lands inside that write.
With ``--jobs 2`` a kill hits the parent or one of its worker processes, at random.

Checked after every kill, before the restart: every file of the sweep parses (no half-written
file), and no run's checkpoint went back to fewer epochs than before the kill (whole epochs lost:
zero; what is lost is the epoch in progress).  Checked at the end: no temporary, lock or
``.corrupt`` file is left, and every run's ``metrics.csv`` (its wall-time columns aside),
checkpoint arrays, ``test_correct.npz``, ``config.json`` (its git commit aside) and the summary's
tables (their time columns aside) equal the reference's bit for bit.  The report gives the kills
sent, those that landed inside a write, and the work lost per run in flight, in epochs (seconds
since that run's last checkpoint, or since this attempt took its lock, over its median epoch
interval in the reference).

Linux only (the process tree is read from ``/proc``).  A test harness, not part of the installed
package: ``tests/test_faults.py`` runs it (5 kills in CI, 20 kills under ``-m slow``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from kldwrm_ref.experiments.checkpoint import CheckpointError, load_checkpoint
from kldwrm_ref.experiments.config import expand, validate_config
from kldwrm_ref.experiments.lock import LOCK_NAME
from kldwrm_ref.experiments.run_folder import CHECKPOINT, RunFolderError, read_metrics, read_status, read_test_correct
from kldwrm_ref.storage import WRITE_DELAY_VARIABLE, read_json, write_json
from kldwrm_ref.validation import check_nonnegative_int, check_positive_int

TIME_COLUMNS = ("wall_time", "epoch_time")
EPOCH_LINE = re.compile(r"^(\S+): epoch (\d+)/(\d+),")


def campaign_config(epochs: int = 6) -> dict:
    """A small sweep: three optimisers, two seeds, a 20-16-10 network on synthetic data, NumPy backend."""
    return dict(
        name="campaign", optimizers=["kfac", "q-kld-wrm", "sgd"], architectures=[[20, 16, 10]], epochs=epochs, seeds=[0, 1],
        batch=50, dtype="float64", backend="numpy", data=dict(source="synthetic", n_train=600, n_test=200), hyper={"*": {"period": 3}},
    )


# ------------------------------------------------------------------------------- processes
def _children(pid: int) -> list[int]:
    """The process ids of ``pid``'s descendants (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for p in frontier for child in parents.get(p, [])]
        found += frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Sweep:
    """One ``kldwrm mnist`` subprocess; its stdout lines are collected with their arrival times."""

    def __init__(self, config_path: Path, out: Path, jobs: int, env: dict):
        command = [sys.executable, "-m", "kldwrm_ref.cli", "mnist", "--config", str(config_path), "--out", str(out), "--no-progress"]
        if jobs > 1:
            command += ["--jobs", str(jobs)]
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self) -> int:
        code = self.process.wait()
        self._reader.join(timeout=1.0)  # orphaned workers of a killed parent may hold the pipe open
        return code

    def end_orphans(self) -> None:
        """SIGKILL what is left of the sweep's process group (idle workers of a killed parent), once it holds no run."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def epoch_times(self) -> dict[str, list[float]]:
        """Per run label, the arrival times of its "epoch k/E" lines."""
        times: dict[str, list[float]] = {}
        for stamp, line in list(self.lines):  # a copy: the reader thread appends while the campaign polls
            match = EPOCH_LINE.match(line)
            if match:
                times.setdefault(match.group(1), []).append(stamp)
        return times

    def epochs_reported(self) -> int:
        """How many epochs this attempt has reported, over all runs (its progress, in epochs of training)."""
        return sum(len(stamps) for stamps in self.epoch_times().values())

    def epoch_seconds(self, fallback: float) -> float:
        """Wall time per epoch of progress in this attempt so far (``fallback`` before two epochs are reported)."""
        stamps = sorted(stamp for run in self.epoch_times().values() for stamp in run)
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else fallback


# ------------------------------------------------------------------------------- files
def temporaries(root: Path) -> list[Path]:
    return sorted(root.rglob(".*.tmp"))


def checkpoint_epochs(root: Path, labels: Sequence[str]) -> dict[str, int]:
    """The epoch of each run's checkpoint (0 where there is none yet)."""
    epochs = {}
    for label in labels:
        path = root / label / CHECKPOINT
        epochs[label] = int(load_checkpoint(path)[2]["epoch"]) if path.exists() else 0
    return epochs


def unreadable_files(root: Path) -> list[str]:
    """Every file under ``root`` that does not parse as what its name says, with the reason."""
    problems = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".tmp") and not p.name.startswith(LOCK_NAME)):
        try:
            if path.name == "metrics.csv":
                read_metrics(path)
            elif path.name == "status.json":
                read_status(path)
            elif path.suffix == ".json":
                read_json(path)
            elif path.name == CHECKPOINT:
                load_checkpoint(path)
            elif path.name == "test_correct.npz":
                read_test_correct(path)
            elif path.suffix == ".png":
                data = path.read_bytes()
                if not (data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")):
                    raise ValueError("not a complete PNG")
            elif path.suffix == ".md":
                path.read_text(encoding="utf-8")
        except (CheckpointError, RunFolderError, ValueError, OSError) as error:
            problems.append(f"{path}: {error}")
    return problems


def _timeless_summary(text: str) -> list[list[str]]:
    """The summary's lines, with the cells of time columns blanked: headers "s ..." ("s to 97%",
    "s / epoch") and "... s" (the wall-time budgets, "26 s"), whose values depend on the machine's load."""
    lines, timed = [], set()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else [line]
        if line.startswith("|") and not set(line) <= set("|-"):
            if any(c.startswith("s ") or c.endswith(" s") for c in cells):
                timed = {i for i, c in enumerate(cells) if c.startswith("s ") or c.endswith(" s")}
            cells = ["" if i in timed else c for i, c in enumerate(cells)]
        elif not line.startswith("|"):
            timed = set()
        lines.append(cells)
    return lines


def differences(reference: Path, root: Path, labels: Sequence[str]) -> list[str]:
    """Where the sweep under ``root`` differs from the reference sweep (time columns aside)."""
    found = []
    for label in labels:
        a, b = reference / label, root / label
        ma, mb = read_metrics(a / "metrics.csv"), read_metrics(b / "metrics.csv")
        found += [f"{label}: metrics.csv column {k}" for k in ma if k not in TIME_COLUMNS and not np.array_equal(ma[k], mb[k])]
        (ta, sa, ca), (tb, sb, cb) = load_checkpoint(a / CHECKPOINT), load_checkpoint(b / CHECKPOINT)
        if ta.tobytes() != tb.tobytes():
            found.append(f"{label}: checkpoint theta")
        leaves_a, leaves_b = _leaves(sa), _leaves(sb)
        if len(leaves_a) != len(leaves_b) or any(_bytes(x) != _bytes(y) for x, y in zip(leaves_a, leaves_b)):
            found.append(f"{label}: checkpoint optimiser state")
        if ca["test_correct"].tobytes() != cb["test_correct"].tobytes() or read_test_correct(a / "test_correct.npz")[0].tobytes() != read_test_correct(b / "test_correct.npz")[0].tobytes():
            found.append(f"{label}: test_correct")
        config_a, config_b = (dict(read_json(d / "config.json"), git_commit=None) for d in (a, b))
        if config_a != config_b:
            found.append(f"{label}: config.json")
        if read_status(a / "status.json") != read_status(b / "status.json"):
            found.append(f"{label}: status.json")
    if _timeless_summary((reference / "summary.md").read_text()) != _timeless_summary((root / "summary.md").read_text()):
        found.append("summary.md")
    return found


def _leaves(tree) -> list:
    if isinstance(tree, tuple):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]


def _bytes(leaf) -> bytes:
    return np.asarray(leaf).tobytes() if leaf is not None else b""


# ------------------------------------------------------------------------------- campaign
def kill_progress(rng: np.random.Generator, remaining: int, kills_left: int, jobs: int = 1) -> float:
    """How many epochs of progress an attempt makes before its kill: the remaining work shared out
    among the kills left (and the final, unkilled attempt), times a random factor in [0.3, 1.5),
    at most ``remaining - jobs``.  With ``jobs`` runs training side by side, the other workers'
    epochs in flight when the count is reached may end at the same moment; the cap still leaves an
    epoch to run after them, so the kill lands before the sweep ends."""
    share = remaining / (kills_left + 1)
    return float(min(rng.uniform(0.3, 1.5) * share, max(remaining - jobs, 0)))


def _wait_while_running(process: subprocess.Popen, until: float) -> None:
    while time.monotonic() < until and process.poll() is None:
        time.sleep(0.005)


def _wait_for_progress(sweep: Sweep, root: Path, labels: Sequence[str], epochs: int, startup: float) -> bool:
    """Wait until the sweep has reported ``epochs`` epochs (for none: until its reference start-up
    time has passed or one of its runs holds its lock, whichever comes first); False when it ended
    first.  Progress, not time, sets the kills, so that they land inside the sweep whatever the
    machine's load."""
    while epochs == 0 and sweep.process.poll() is None and time.monotonic() < sweep.started + startup:
        if any(_alive(pid) for pid in _lock_holders(root, labels).values()):  # earlier attempts' processes are all gone
            break
        time.sleep(0.005)
    while sweep.process.poll() is None and sweep.epochs_reported() < epochs:
        time.sleep(0.005)
    return sweep.process.poll() is None


def _wait_for_write(root: Path, process: subprocess.Popen) -> Path | None:
    """Poll until a temporary file of a run's atomic write appears under ``root`` (None when the sweep ends first)."""
    while process.poll() is None:
        found = [p for p in temporaries(root) if "seed-" in p.parent.name]
        if found:
            return found[0]
        time.sleep(0.001)
    return None


def run_campaign(work: str | os.PathLike, kills: int = 20, jobs: int = 1, seed: int = 0, epochs: int = 6, write_delay: float = 0.02, log: Callable = print) -> dict:
    """Run the campaign in the folder ``work``; returns the report (see the module docstring); raises AssertionError on a failed check."""
    check_nonnegative_int(kills, "kills")
    check_positive_int(jobs, "jobs")
    work = Path(work)
    cfg = validate_config(campaign_config(epochs))
    labels = [spec.label for spec in expand(cfg)]
    config_path = write_json(work / "campaign.json", cfg)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env[WRITE_DELAY_VARIABLE] = str(write_delay)
    rng = np.random.default_rng(seed)

    reference = Sweep(config_path, work / "reference", jobs, env)
    if reference.wait() != 0:
        raise RuntimeError("the uninterrupted reference sweep failed:\n" + "\n".join(line for _, line in reference.lines[-20:]))
    reference_seconds = time.monotonic() - reference.started
    epoch_times = reference.epoch_times()
    interval = {label: float(np.median(np.diff(stamps))) for label, stamps in epoch_times.items() if len(stamps) > 1}
    first_epoch = min(stamps[0] for stamps in epoch_times.values()) - reference.started
    startup = max(first_epoch - float(np.median(list(interval.values()))), 0.0)
    epoch_seconds = (reference_seconds - startup) / (len(labels) * epochs)  # wall time per epoch of sweep progress
    log(f"reference sweep: {len(labels)} runs x {epochs} epochs in {reference_seconds:.1f} s ({startup:.1f} s of it start-up)")

    out = work / "killed"
    root = out / cfg["name"]  # the sweep's folder, holding the run folders
    records: list[dict] = []
    attempts = 0
    while True:
        attempts += 1
        sweep = Sweep(config_path, out, jobs, env)
        if len(records) >= kills:
            code = sweep.wait()
            if code != 0:
                raise AssertionError(f"the final restart failed ({code}):\n" + "\n".join(line for _, line in sweep.lines[-20:]))
            break
        inside = len(records) % 2 == 1
        done = sum(checkpoint_epochs(root, labels).values())
        lead = kill_progress(rng, len(labels) * epochs - done, kills - len(records), jobs)
        reached = _wait_for_progress(sweep, root, labels, int(lead), startup)
        writing = None
        if inside and reached:
            writing = _wait_for_write(root, sweep.process)
        elif reached:
            _wait_while_running(sweep.process, time.monotonic() + (lead - int(lead)) * sweep.epoch_seconds(epoch_seconds))
        if sweep.process.poll() is not None:  # the sweep ended before the kill: it is complete
            sweep.wait()
            break
        before = _epochs_or_none(root, labels)
        tree = [sweep.process.pid] + _children(sweep.process.pid)
        holders = _lock_holders(root, labels)
        workers = sorted(set(holders.values()) & set(tree[1:]))
        if jobs == 1:
            target = tree[0]
        elif writing is not None and int(writing.name.split(".")[-3]) in tree:  # the process inside the write
            target = int(writing.name.split(".")[-3])
        else:
            target = int(rng.choice(workers)) if workers and rng.random() < 0.5 else tree[0]
        killed_at = time.time()
        os.kill(target, signal.SIGKILL)
        killed = set(tree) if jobs == 1 else {target}
        if target == tree[0]:
            sweep.wait()
        writes = [p.name for p in temporaries(root) if int(p.name.split(".")[-3]) in killed]
        after = checkpoint_epochs(root, labels)
        problems = unreadable_files(root)
        sweep.wait()
        _wait_for_orphans(root)
        sweep.end_orphans()
        in_flight = [label for label, pid in holders.items() if not _alive(pid) and _lock_holders(root, [label]).get(label) == pid]
        record = dict(
            kill=len(records) + 1, aimed_inside_write=inside, target="parent" if target == tree[0] else "worker",
            inside_write=bool(writes), writes=writes, runs_in_flight=in_flight,
            whole_epochs_lost={label: epoch - after[label] for label, epoch in before.items() if epoch is not None and epoch > after[label]},
            epoch_in_progress_lost={label: _lost_fraction(root / label, killed_at, interval.get(label)) for label in in_flight},
        )
        if problems or record["whole_epochs_lost"]:
            raise AssertionError(f"after kill {record['kill']}: unreadable files {problems}, whole epochs lost {record['whole_epochs_lost']}")
        records.append(record)
        log(f"kill {record['kill']:>3}: {record['target']}, {'inside ' + ', '.join(writes) if writes else 'between writes'}; runs in flight {in_flight}")

    _wait_for_orphans(root)
    leftovers = [str(p) for p in root.rglob("*") if p.name.endswith((".tmp", ".corrupt")) or p.name.startswith(LOCK_NAME)]
    diff = differences(work / "reference" / cfg["name"], root, labels)
    lost = [fraction for r in records for fraction in r["epoch_in_progress_lost"].values() if fraction is not None]
    report = dict(
        kills_sent=len(records), kills_inside_a_write=sum(r["inside_write"] for r in records), restarts=attempts - 1, jobs=jobs, seed=seed,
        worker_kills=sum(r["target"] == "worker" for r in records), runs=len(labels), runs_bit_identical=len(labels) - len({d.split(":")[0] for d in diff if ":" in d}),
        whole_epochs_lost=sum(sum(r["whole_epochs_lost"].values()) for r in records),
        epoch_in_progress_lost_mean=float(np.mean(lost)) if lost else 0.0, epoch_in_progress_lost_max=float(np.max(lost)) if lost else 0.0,
        leftover_files=leftovers, differences=diff, unreadable_files=unreadable_files(root), kills=records,
    )
    if leftovers or diff or report["unreadable_files"]:
        raise AssertionError(f"campaign failed: leftovers {leftovers}, differences {diff}, unreadable {report['unreadable_files']}")
    return report


def _epochs_or_none(root: Path, labels: Sequence[str]) -> dict[str, int | None]:
    """Checkpoint epochs just before a kill; None for a run whose checkpoint is being replaced at that instant."""
    epochs: dict[str, int | None] = {}
    for label in labels:
        try:
            epochs[label] = checkpoint_epochs(root, [label])[label]
        except (CheckpointError, OSError):
            epochs[label] = None
    return epochs


def _lock_holders(root: Path, labels: Sequence[str]) -> dict[str, int]:
    """The process id holding each locked run's lock."""
    held = {}
    for label in labels:
        try:
            pid = json.loads((root / label / LOCK_NAME).read_text()).get("pid")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(pid, int):
            held[label] = pid
    return held


def _lost_fraction(run_dir: Path, killed_at: float, interval: float | None) -> float | None:
    """Seconds of work lost by a run killed in flight, in units of its reference epoch interval.

    The work since the later of its last checkpoint write and the moment this attempt took the run's
    lock (the time before that was spent starting the process, not training).
    """
    try:
        since = max((run_dir / CHECKPOINT).stat().st_mtime, (run_dir / LOCK_NAME).stat().st_mtime)
    except OSError:
        return None
    return max(killed_at - since, 0.0) / interval if interval else None


def _wait_for_orphans(root: Path, timeout: float = 120.0) -> None:
    """Wait until no live process holds a run lock under ``root`` (a worker orphaned by a killed parent ends itself within a second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holders = []
        for lock in root.rglob(LOCK_NAME):
            try:
                holders.append(json.loads(lock.read_text()).get("pid"))
            except (OSError, ValueError):
                continue
        if not any(isinstance(pid, int) and _alive(pid) for pid in holders):
            return
        time.sleep(0.05)
    raise AssertionError(f"processes still hold run locks under {root} after {timeout:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/kill_campaign.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--write-delay", type=float, default=0.02, help="seconds each atomic write sleeps before its rename (default 0.02)")
    parser.add_argument("--work", help="folder for the sweeps (default: a temporary folder, removed afterwards)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kldwrm-campaign-") as tmp:
        report = run_campaign(args.work or tmp, args.kills, args.jobs, args.seed, args.epochs, args.write_delay)
    summary = {k: v for k, v in report.items() if k != "kills"}
    print(json.dumps(summary, indent=2))
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
