"""``kldwrm bench curvature | kernels | step | interleave``: benchmarks that print numbers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kldwrm_ref.bench import interleave, step
from kldwrm_ref.bench.curvature import curvature_rows, format_rows
from kldwrm_ref.bench.kernels import format_kernel_rows, kernel_rows
from kldwrm_ref.validation import CommandParser


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="kldwrm bench", description="Benchmarks that print numbers (kldwrm bench step --help and kldwrm bench interleave --help for their options).")
    parser.add_argument("what", choices=["curvature", "kernels", "step", "interleave"], help="which benchmark")
    parser.add_argument("--repeats", type=int, default=5, metavar="N", help="timed repetitions, >= 1 (kernels: 4 N calls per operation; default: 5)")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="floating-point type (default: float64)")
    if argv and argv[0] == "step":
        return step.main(argv[1:])
    if argv and argv[0] == "interleave":
        return interleave.main(argv[1:])
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be an integer >= 1, got {args.repeats}")
    if args.what == "kernels":
        print(f"backend kernels at MNIST sizes, {args.dtype}, median of {4 * args.repeats} calls (after a warm-up that compiles)")
        print(format_kernel_rows(*kernel_rows(np.dtype(args.dtype).type, 4 * args.repeats)))
        return 0
    print(f"curvature engine, MLP 784-256-10 at batch 512 and a dense-platform 49-32-10 net, {args.dtype}")
    print(format_rows(curvature_rows(repeats=args.repeats, dtype=np.dtype(args.dtype).type)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
