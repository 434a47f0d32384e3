"""Independent tasks in parallel (``kldwrm mnist --jobs N`` or ``--scheduler ADDRESS``); needs the ``parallel`` extra.

:func:`parallel_map` runs each task under a threadpoolctl limit of one BLAS/OpenMP thread, so that
N workers keep to N cores: ``jobs`` joblib (loky) worker processes, which also start with
``NUMBA_NUM_THREADS``, ``OMP_NUM_THREADS`` and the BLAS variables at 1, or the workers of the Dask
distributed cluster at ``scheduler``.  The sweep's task is
:func:`kldwrm_ref.experiments.runner.run_task`.

A local worker does not outlive the sweep that started it: a watchdog thread ends the worker
process as soon as its parent is gone, whether that was ``kill`` (SIGTERM, which gives the parent
no chance to stop its pool) or SIGKILL.  Otherwise an orphaned worker would train on to the end of
its run, holding the run's lock against the restarted sweep.  Ending a worker mid-epoch is safe:
every file is written atomically and the restarted sweep resumes from the last checkpoint, takes
over the dead worker's lock and removes its temporaries.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from kldwrm_ref.storage import process_alive

ORPHAN_POLL_SECONDS = 0.5
CONNECT_TIMEOUT_S = 5  # how long to wait for the Dask scheduler to answer (--scheduler)
_ADDRESS = re.compile(r"(?:(?:tcp|tls|ucx|ws|wss)://)?(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})")
_watchdog_started = False


def max_jobs() -> int:
    """The most local worker processes a sweep may start: the CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_jobs(jobs: int, name: str = "--jobs") -> int:
    """``jobs`` if it is an integer in [1, :func:`max_jobs`]; else ValueError naming ``name`` and the range."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= max_jobs():
        raise ValueError(f"{name} must be an integer in [1, {max_jobs()}] (the CPU cores of this machine), got {jobs!r}")
    return jobs


def check_address(address: str, name: str = "--scheduler") -> str:
    """A Dask scheduler address ``[PROTOCOL://]HOST:PORT`` (protocol tcp, tls, ucx, ws or wss; port 1-65535)."""
    match = _ADDRESS.fullmatch(address)
    if match is None or not 1 <= int(match.group(1)) <= 65535:
        raise ValueError(f"{name} must be a Dask scheduler address [tcp://]HOST:PORT with PORT in [1, 65535] (e.g. tcp://10.0.0.5:8786), got {address!r}")
    return address


def check_scheduler(address: str) -> None:
    """Connect to the scheduler at ``address`` and disconnect: an OSError naming it when none
    answers within :data:`CONNECT_TIMEOUT_S` seconds (checked before a sweep writes anything)."""
    from distributed import Client

    try:
        with Client(check_address(address), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as error:
        raise OSError(f"--scheduler {address}: no Dask scheduler answered within {CONNECT_TIMEOUT_S} s ({error})") from None


def require(scheduler: str | None) -> None:
    """Raise ImportError naming the extra to install if a package of parallel runs is missing."""
    for module in ("joblib", "threadpoolctl") + (("distributed",) if scheduler else ()):
        try:
            importlib.import_module(module)
        except ImportError:
            option = "--scheduler" if scheduler else "--jobs"
            raise ImportError(f"{option} needs the optional package {module}: pip install 'kldwrm_ref[parallel]'") from None


def _exit_when_orphaned(sweep_pid: int) -> None:
    """Poll until the process ``sweep_pid`` is gone, then end this worker process at once."""
    direct_child = os.getppid() == sweep_pid
    while (os.getppid() == sweep_pid) if direct_child else process_alive(sweep_pid):
        time.sleep(ORPHAN_POLL_SECONDS)
    os._exit(3)  # no clean-up on purpose: the files are consistent at every instant


def _local_task(sweep_pid: int, function: Callable, *args):
    """A task in a local worker: start the worker's orphan watchdog once, then run single-threaded."""
    global _watchdog_started
    if not _watchdog_started:
        threading.Thread(target=_exit_when_orphaned, args=(sweep_pid,), name="kldwrm-orphan-watchdog", daemon=True).start()
        _watchdog_started = True
    return _single_threaded(function, *args)


def _single_threaded(function: Callable, *args):
    """``function(*args)`` with one BLAS/OpenMP thread."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return function(*args)


def parallel_map(function: Callable, arguments: Sequence[tuple], jobs: int, scheduler: str | None) -> Iterator:
    """``function(*args)`` for each args of ``arguments``, in ``jobs`` local processes or on the Dask cluster at ``scheduler``, yielded as each ends."""
    require(scheduler)
    if scheduler is None:
        from joblib import Parallel, delayed, parallel_config

        with parallel_config(backend="loky", inner_max_num_threads=1):
            tasks = (delayed(_local_task)(os.getpid(), function, *args) for args in arguments)
            yield from Parallel(n_jobs=jobs, batch_size=1, return_as="generator_unordered")(tasks)
        return
    from distributed import Client, as_completed

    with Client(scheduler, timeout=CONNECT_TIMEOUT_S) as client:
        for future in as_completed(client.map(_single_threaded, [function] * len(arguments), *zip(*arguments), pure=False)):
            yield future.result()
