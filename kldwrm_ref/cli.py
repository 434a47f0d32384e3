"""The ``kldwrm`` command: ``verify``, ``mnist``, ``tune``, ``robustness``, ``train``, ``bench``, ``trajectory``.

Every command checks its arguments before it writes or computes anything (one line on stderr,
exit status 2).  Errors found later - a data directory without MNIST, an unwritable or full file
system, a scheduler that does not answer, a run folder holding another run - end the command here
with one line, ``kldwrm COMMAND: error: MESSAGE``, and exit status 1 (with the environment variable
``KLDWRM_TRACEBACK=1`` the traceback is shown instead); ``backend="cuda"`` without what it needs
(docs/gpu.md) is one such line with exit status 2.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

import kldwrm_ref
from kldwrm_ref.backends.probe import GPUUnavailableError
from kldwrm_ref.data import MnistDataError

# command: (module, function, help); a command's module is imported only when it runs.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "verify": ("kldwrm_ref.theory.verify", "main", "run the paper's claims as numerical checks"),
    "mnist": ("kldwrm_ref.experiments.cli", "main", "resumable multi-seed MNIST experiments, summary table and plots"),
    "tune": ("kldwrm_ref.experiments.cli", "tune_main", "the tuned comparison protocol: grid on a validation split, selection, final seeds"),
    "robustness": ("kldwrm_ref.experiments.cli", "robustness_main", "the robustness study: success regions on a step size x damping grid, paired tests"),
    "train": ("kldwrm_ref.experiments.cli", "train_main", "short single-seed MNIST comparison of optimisers"),
    "bench": ("kldwrm_ref.bench.cli", "main", "benchmarks that print numbers (curvature, kernels, step)"),
    "trajectory": ("kldwrm_ref.trajectory.cli", "main", "export per-step reference trajectories, compare two (docs/trajectory-format.md)"),
}


# Errors a command may meet after its arguments were checked, reported in one line at the boundary.
LATE_ERRORS = (OSError, ValueError, MnistDataError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        print(f"kldwrm_ref {kldwrm_ref.__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"kldwrm: error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} (see kldwrm --help)", file=sys.stderr)
            return 2
        lines = ["usage: kldwrm COMMAND [options]   (kldwrm COMMAND --help for its options; kldwrm --version)", "", "commands:"]
        lines += [f"  {name:<11} {help_}" for name, (_, _, help_) in COMMANDS.items()]
        print("\n".join(lines))
        return 0
    module, function, _ = COMMANDS[argv[0]]
    try:
        return getattr(importlib.import_module(module), function)(argv[1:])
    except GPUUnavailableError as error:  # backend "cuda" without CuPy, a device or a working numba-cuda
        print(f"kldwrm {argv[0]}: error: {error}", file=sys.stderr)
        return 2
    except LATE_ERRORS as error:
        if os.environ.get("KLDWRM_TRACEBACK"):
            raise
        print(f"kldwrm {argv[0]}: error: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kldwrm {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
