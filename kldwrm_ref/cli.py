"""The ``kldwrm`` command: ``kldwrm verify``, ``kldwrm train``, ``kldwrm mnist``, ``kldwrm bench``."""

from __future__ import annotations

import sys
from typing import Sequence

COMMANDS = {
    "verify": ("kldwrm_ref.verify", "run the paper's claims as numerical checks"),
    "train": ("kldwrm_ref.train", "short single-seed MNIST comparison of optimisers"),
    "mnist": ("kldwrm_ref.experiment", "resumable multi-seed MNIST experiments, summary table and plots"),
    "bench": ("kldwrm_ref.bench", "benchmarks that print numbers (curvature)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: kldwrm COMMAND [options]", "", "commands:"]
        lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nkldwrm: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = __import__(COMMANDS[argv[0]][0], fromlist=["main"])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
