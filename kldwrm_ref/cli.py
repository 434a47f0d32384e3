"""The ``kldwrm`` command: ``verify``, ``mnist``, ``tune``, ``robustness``, ``train``, ``bench``, ``trajectory``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from kldwrm_ref.allocator import reuse_freed_memory
from kldwrm_ref.bench import cli as bench_cli
from kldwrm_ref.experiments import cli as experiments_cli
from kldwrm_ref.theory import verify
from kldwrm_ref.trajectory import cli as trajectory_cli

COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "verify": (verify.main, "run the paper's claims as numerical checks"),
    "mnist": (experiments_cli.main, "resumable multi-seed MNIST experiments, summary table and plots"),
    "tune": (experiments_cli.tune_main, "the tuned comparison protocol: grid on a validation split, selection, final seeds"),
    "robustness": (experiments_cli.robustness_main, "the robustness study: success regions on a step size x damping grid, paired tests"),
    "train": (experiments_cli.train_main, "short single-seed MNIST comparison of optimisers"),
    "bench": (bench_cli.main, "benchmarks that print numbers (curvature, kernels, step)"),
    "trajectory": (trajectory_cli.main, "export per-step reference trajectories, compare two (docs/trajectory-format.md)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: kldwrm COMMAND [options]", "", "commands:"]
        lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nkldwrm: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    reuse_freed_memory()
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
