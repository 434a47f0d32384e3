"""``kldwrm bench curvature | kernels | step``: benchmarks that print numbers.

``curvature`` prints, at MNIST sizes (batch 512, MLP 784-256-10) and for a dense-platform net of about 2,000
parameters, the median time of: K-FAC factor statistics, eigendecompositions, each inverse
application, the exact Kronecker-sum set-up and apply, and the dense Fisher build.  FLOP counts
are computed from the shapes (a multiply-add counts 2).

``kernels`` times every backend operation (:data:`kldwrm_ref.backend.OPERATIONS`) at MNIST sizes
for each available backend and gives the ratio to NumPy.  ``step`` is :mod:`kldwrm_ref.step_bench`.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Sequence

import numpy as np

from kldwrm_ref import MLP
from kldwrm_ref.backend import get_backend
from kldwrm_ref.data import synthetic_classification
from kldwrm_ref.fisher import fisher
from kldwrm_ref.kfac import KFACInverse, KronSumInverse, kfac_factors, kron_blocks
from kldwrm_ref.linalg import safe_eigh


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def factor_flops(mlp: MLP, batch: int, n_cot: int) -> float:
    """Forward + n_cot backward passes and the A, G products."""
    flops = 0.0
    for out, inp in mlp.layer_shapes:
        flops += 2 * batch * out * inp  # forward
        flops += 2 * n_cot * batch * out * inp  # backward through W
        flops += 2 * batch * (inp + 1) ** 2 + 2 * n_cot * batch * out * out  # A and G
    return flops


def solve_flops(mlp: MLP) -> float:
    """Four matrix products per layer: Q_G^T V, (.) Q_A, Q_G (.), (.) Q_A^T."""
    return sum(4 * out * (inp + 1) * (out + inp + 1) for out, inp in mlp.layer_shapes)


def curvature_rows(batch: int = 512, sizes: Sequence[int] = (784, 256, 10), dense_sizes: Sequence[int] = (49, 32, 10), dense_batch: int = 256, repeats: int = 5, dtype=np.float64):
    rows = []
    mlp = MLP(sizes, dtype=dtype)
    X, y = synthetic_classification(batch, sizes[0], sizes[-1], seed=0, dtype=dtype)
    theta = mlp.init(0)
    for fisher_type, n_cot in (("exact", sizes[-1]), ("empirical", 1)):
        t = median_time(lambda: kfac_factors(mlp, theta, X, y, fisher_type), repeats)
        rows.append((f"K-FAC factor statistics ({fisher_type})", t, factor_flops(mlp, batch, n_cot)))
    factors = kfac_factors(mlp, theta, X, y, "empirical")
    blocks = kron_blocks(mlp, factors)
    eig_flops = sum(9.0 * (b.A.shape[0] ** 3 + b.G.shape[0] ** 3) for b in blocks)  # ~9 n^3 for eigh with vectors
    rows.append(("eigendecompositions (all factors)", median_time(lambda: [safe_eigh(b.A, "A") and safe_eigh(b.G, "G") for b in blocks], repeats), eig_flops))
    v = np.random.default_rng(0).standard_normal(mlp.n_params).astype(dtype)
    for style in ("eigen", "factored"):
        inverse = KFACInverse(blocks, mlp.n_params, 0.01, style)
        rows.append((f"K-FAC inverse apply ({style} damping)", median_time(lambda: inverse.matvec(v), repeats), solve_flops(mlp)))
    current = kron_blocks(mlp, kfac_factors(mlp, theta + 0.01, X, y, "empirical"))
    rows.append(("Kronecker-sum set-up (exact, generalised eigh)", median_time(lambda: KronSumInverse(blocks, current, mlp.n_params, 0.01, 0.01, "exact"), repeats), eig_flops))
    kron_sum = KronSumInverse(blocks, current, mlp.n_params, 0.01, 0.01, "exact")
    rows.append(("Kronecker-sum inverse apply (exact)", median_time(lambda: kron_sum.matvec(v), repeats), solve_flops(mlp)))
    dense_mlp = MLP(dense_sizes, dtype=dtype)
    Xd, _ = synthetic_classification(dense_batch, dense_sizes[0], dense_sizes[-1], seed=1, dtype=dtype)
    td = dense_mlp.init(0)
    n = dense_mlp.n_params
    rows.append((f"dense exact Fisher build (n={n}, batch {dense_batch})", median_time(lambda: fisher(dense_mlp, td, Xd), repeats), 2.0 * dense_batch * dense_sizes[-1] * n * n))
    return rows


def kernel_inputs(dtype, rng: np.random.Generator) -> dict:
    """Arguments of each operation at the sizes it sees in training (784-256-10, batch 512; the
    dense Fisher rows of a 49-32-10 net at batch 256; the 785 x 785 factor A)."""
    logits = rng.standard_normal((512, 10)).astype(dtype)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).astype(dtype)
    rotated = rng.standard_normal((256, 785)).astype(dtype)
    d_g, d_a = rng.random(256).astype(dtype), rng.random(785).astype(dtype)
    factor = rng.standard_normal((785, 785)).astype(dtype)
    dense = MLP([49, 32, 10])
    u = np.empty((2560, dense.n_params), dtype)
    return dict(
        softmax_cross_entropy=("logits (512, 10)", (logits, rng.integers(0, 10, 512))),
        sample_labels=("probs (512, 10)", (probs, rng.random((1, 512)))),
        fisher_cotangents=("probs (512, 10)", (probs,)),
        per_sample_rows=("U rows (2560, 32 x 49)", (rng.standard_normal((2560, 32)).astype(dtype), rng.standard_normal((256, 49)).astype(dtype), u, 0)),
        ea_update=("A (785, 785)", (factor, factor.T.copy(), 0.95, np.empty_like(factor))),
        eigen_divide=("V (256, 785)", (rotated, d_g, d_a, 0.01)),
        kron_sum_divide=("V (256, 785)", (rotated, d_g, d_a, 0.01)),
        kl_and_grad=("logits (512, 10), symmetric", (logits, logits[::-1].copy(), "symmetric")),
        matmul=("(512, 784) @ (784, 256)", (rng.standard_normal((512, 784)).astype(dtype), rng.standard_normal((784, 256)).astype(dtype))),
    )


def available_backends() -> list[str]:
    """numpy and numba always; cuda on a real GPU (the simulator's timings mean nothing)."""
    from numba import config

    names = ["numpy", "numba"]
    try:
        get_backend("cuda")
    except RuntimeError:
        return names
    return names if config.ENABLE_CUDASIM else names + ["cuda"]


def kernel_rows(dtype=np.float64, repeats: int = 20) -> tuple[list[str], list[tuple]]:
    """Per operation: (operation, shape, {backend: median seconds})."""
    backends = available_backends()
    rows = []
    for op, (shape, args) in kernel_inputs(dtype, np.random.default_rng(0)).items():
        times = {name: median_time(lambda: getattr(get_backend(name), op)(*args), repeats) for name in backends}
        rows.append((op, shape, times))
    return backends, rows


def format_kernel_rows(backends, rows) -> str:
    header = f"{'operation':<22} {'shape':<30}" + "".join(f" {name + ' ms':>10}" for name in backends)
    header += "".join(f" {name + '/numpy':>12}" for name in backends[1:]) + "  fastest"
    lines = [header, "-" * len(header)]
    for op, shape, times in rows:
        line = f"{op:<22} {shape:<30}" + "".join(f" {times[b] * 1e3:>10.3f}" for b in backends)
        line += "".join(f" {times['numpy'] / times[b]:>11.2f}x" for b in backends[1:])
        lines.append(line + "  " + min(times, key=times.get))
    return "\n".join(lines)


def format_rows(rows) -> str:
    lines = [f"{'operation':<52} {'median ms':>10} {'GFLOP/s':>9}", "-" * 73]
    lines += [f"{name:<52} {t * 1e3:>10.2f} {flops / t / 1e9:>9.2f}" for name, t, flops in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kldwrm bench", description="Benchmarks that print numbers.")
    parser.add_argument("what", choices=["curvature", "kernels", "step"], help="which benchmark")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    if argv and argv[0] == "step":
        from kldwrm_ref import step_bench

        return step_bench.main(argv[1:])
    args = parser.parse_args(argv)
    if args.what == "kernels":
        print(f"backend kernels at MNIST sizes, {args.dtype}, median of {4 * args.repeats} calls (after a warm-up that compiles)")
        print(format_kernel_rows(*kernel_rows(np.dtype(args.dtype).type, 4 * args.repeats)))
        return 0
    print(f"curvature engine, MLP 784-256-10 at batch 512 and a dense-platform 49-32-10 net, {args.dtype}")
    print(format_rows(curvature_rows(repeats=args.repeats, dtype=np.dtype(args.dtype).type)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
