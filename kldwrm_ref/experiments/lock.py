"""A per-run lock, so that two sweeps (or two workers) never write one run folder at once.

The lock is the file ``<run folder>/.lock`` holding ``{"pid", "host", "start"}`` of its owner
(``start``: the process's start time from ``/proc``, so a recycled process id is not mistaken
for the owner).  It is created complete or not at all: the content goes to a temporary file
that is hard-linked to ``.lock``, and ``link`` fails if ``.lock`` exists.  A lock whose owner is
gone (same host, no such process, or a process with another start time) is stale and is taken
over; a lock held by a live process makes :func:`acquire_run_lock` raise :class:`LockHeld`, whose
message names the holder, and the sweep skips that run.  Locks of other hosts
(a shared file system) are never taken over: delete them by hand when their sweep is dead.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

from kldwrm_ref.storage import process_alive

LOCK_NAME = ".lock"


class LockHeld(RuntimeError):
    """The run folder is locked by another live process."""


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after the command name


def _owner() -> dict:
    pid = os.getpid()
    return dict(pid=pid, host=socket.gethostname(), start=_start_time(pid))


def _holder_alive(holder: dict) -> bool:
    pid, host = holder.get("pid"), holder.get("host")
    if not isinstance(pid, int) or not isinstance(host, str):
        return False  # not a lock this module wrote: stale
    if host != socket.gethostname():
        return True
    if not process_alive(pid):
        return False
    return holder.get("start") is None or _start_time(pid) in (None, holder["start"])


def _read_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: written by no version of this module, treated as stale
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """The held lock of one run folder; release it with :meth:`release` or a ``with`` block."""

    def __init__(self, path: Path, owner: dict):
        self.path, self.owner = path, owner

    def release(self) -> None:
        if _read_holder(self.path) == self.owner:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _try_link(path: Path, owner: dict) -> bool:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{LOCK_NAME}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(owner, fh)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def acquire_run_lock(run_dir: str | os.PathLike) -> RunLock:
    """Lock ``run_dir`` for this process (taking over a stale lock), or raise :class:`LockHeld`."""
    path = Path(run_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = _owner()
    for _ in range(3):  # a stale lock removed by a competitor between our reads: try again
        if _try_link(path, owner):
            return RunLock(path, owner)
        holder = _read_holder(path)
        if holder is None:
            continue
        if _holder_alive(holder):
            raise LockHeld(f"{run_dir} is being written by process {holder.get('pid')} on {holder.get('host')}; skipped (rerun when it is done)")
        stale = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.rename(path, stale)  # only one competitor wins the rename of the stale lock
        except FileNotFoundError:
            continue
        if _read_holder(stale) != holder:  # replaced under us by a live owner's lock: put it back
            try:
                os.link(stale, path)
            except FileExistsError:
                pass
            stale.unlink()
            continue
        stale.unlink()
    raise LockHeld(f"{run_dir}: could not take its lock after three tries; another process keeps taking it")
