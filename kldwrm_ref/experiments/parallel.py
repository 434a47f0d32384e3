"""Independent tasks in parallel (``kldwrm mnist --jobs N`` or ``--scheduler ADDRESS``); needs the ``parallel`` extra.

:func:`parallel_map` runs each task under a threadpoolctl limit of one BLAS/OpenMP thread, so that
N workers keep to N cores: ``jobs`` joblib (loky) worker processes, which also start with
``NUMBA_NUM_THREADS``, ``OMP_NUM_THREADS`` and the BLAS variables at 1, or the workers of the Dask
distributed cluster at ``scheduler``.  The sweep's task is
:func:`kldwrm_ref.experiments.runner.run_task`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence


def require(scheduler: str | None) -> None:
    """Raise ImportError naming the extra to install if a package of parallel runs is missing."""
    for module in ("joblib", "threadpoolctl") + (("distributed",) if scheduler else ()):
        try:
            importlib.import_module(module)
        except ImportError:
            option = "--scheduler" if scheduler else "--jobs"
            raise ImportError(f"{option} needs the optional package {module}: pip install 'kldwrm_ref[parallel]'") from None


def _single_threaded(function: Callable, *args):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return function(*args)


def parallel_map(function: Callable, arguments: Sequence[tuple], jobs: int, scheduler: str | None) -> Iterator:
    """``function(*args)`` for each args of ``arguments``, in ``jobs`` local processes or on the Dask cluster at ``scheduler``, yielded as each ends."""
    require(scheduler)
    if scheduler is None:
        from joblib import Parallel, delayed, parallel_config

        with parallel_config(backend="loky", inner_max_num_threads=1):
            yield from Parallel(n_jobs=jobs, batch_size=1, return_as="generator_unordered")(delayed(_single_threaded)(function, *args) for args in arguments)
        return
    from distributed import Client, as_completed

    with Client(scheduler) as client:
        for future in as_completed(client.map(_single_threaded, [function] * len(arguments), *zip(*arguments), pure=False)):
            yield future.result()
