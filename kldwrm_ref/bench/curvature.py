"""``kldwrm bench curvature``: the curvature engine's pieces at MNIST sizes (batch 512, MLP
784-256-10) and, for the dense platform, a net of about 2,000 parameters: K-FAC factor statistics,
eigendecompositions, each inverse application, the exact Kronecker-sum set-up and apply, and the
dense Fisher build.  FLOP counts come from the shapes (a multiply-add counts 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np

from kldwrm_ref.backends import NUMPY
from kldwrm_ref.bench.timing import median_time
from kldwrm_ref.curvature.fisher import fisher
from kldwrm_ref.curvature.inverses import ExactKronSumInverse, damped_inverse
from kldwrm_ref.curvature.kfac import kfac_factors, kron_blocks
from kldwrm_ref.curvature.linalg import safe_eigh
from kldwrm_ref.data import synthetic_classification
from kldwrm_ref.model import MLP


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
        t = median_time(partial(kfac_factors, mlp, theta, X, y, fisher_type), repeats)
        rows.append((f"K-FAC factor statistics ({fisher_type})", t, factor_flops(mlp, batch, n_cot)))
    factors = kfac_factors(mlp, theta, X, y, "empirical")
    blocks = kron_blocks(mlp, factors)
    eig_flops = sum(9.0 * (b.A.shape[0] ** 3 + b.G.shape[0] ** 3) for b in blocks)  # ~9 n^3 for eigh with vectors
    rows.append(("eigendecompositions (all factors)", median_time(lambda: [safe_eigh(b.A, "A") and safe_eigh(b.G, "G") for b in blocks], repeats), eig_flops))
    v = np.random.default_rng(0).standard_normal(mlp.n_params).astype(dtype)
    for style in ("eigen", "factored"):
        inverse = damped_inverse(blocks, mlp.n_params, 0.01, style, 0.0, NUMPY)
        rows.append((f"K-FAC inverse apply ({style} damping)", median_time(partial(inverse.matvec, v), repeats), solve_flops(mlp)))
    current = kron_blocks(mlp, kfac_factors(mlp, theta + 0.01, X, y, "empirical"))
    rows.append(("Kronecker-sum set-up (exact, generalised eigh)", median_time(lambda: ExactKronSumInverse(blocks, current, mlp.n_params, 0.01, 0.01, NUMPY), repeats), eig_flops))
    kron_sum = ExactKronSumInverse(blocks, current, mlp.n_params, 0.01, 0.01, NUMPY)
    rows.append(("Kronecker-sum inverse apply (exact)", median_time(lambda: kron_sum.matvec(v), repeats), solve_flops(mlp)))
    dense_mlp = MLP(dense_sizes, dtype=dtype)
    Xd, _ = synthetic_classification(dense_batch, dense_sizes[0], dense_sizes[-1], seed=1, dtype=dtype)
    td = dense_mlp.init(0)
    n = dense_mlp.n_params
    rows.append((f"dense exact Fisher build (n={n}, batch {dense_batch})", median_time(lambda: fisher(dense_mlp, td, Xd), repeats), 2.0 * dense_batch * dense_sizes[-1] * n * n))
    return rows


def format_rows(rows) -> str:
    lines = [f"{'operation':<52} {'median ms':>10} {'GFLOP/s':>9}", "-" * 73]
    lines += [f"{name:<52} {t * 1e3:>10.2f} {flops / t / 1e9:>9.2f}" for name, t, flops in rows]
    return "\n".join(lines)


