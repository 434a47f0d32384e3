"""``kldwrm bench kernels``: every backend operation (:data:`kldwrm_ref.backends.OPERATIONS`) at
MNIST sizes for each available backend, with the ratio to NumPy."""

from __future__ import annotations

from functools import partial

import numpy as np
from numba import config

from kldwrm_ref.backends import get_backend
from kldwrm_ref.bench.timing import median_time
from kldwrm_ref.model import MLP


def kernel_inputs(dtype, rng: np.random.Generator) -> dict:
    """Arguments of each operation at the sizes it sees in training (784-256-10, batch 512; the
    dense Fisher rows of a 49-32-10 net at batch 256; the 785 x 785 factor A; the convolutions
    and poolings of the paper's CNN at batch 512)."""
    logits = rng.standard_normal((512, 10)).astype(dtype)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).astype(dtype)
    rotated = rng.standard_normal((256, 785)).astype(dtype)
    d_g, d_a = rng.random(256).astype(dtype), rng.random(785).astype(dtype)
    factor = rng.standard_normal((785, 785)).astype(dtype)
    dense = MLP([49, 32, 10])
    u = np.empty((2560, dense.n_params), dtype)
    images = rng.standard_normal((512, 1, 28, 28)).astype(dtype)
    conv2_cols = rng.standard_normal((512, 125, 64)).astype(dtype)
    conv1_weight = rng.standard_normal((5, 1, 5, 5)).astype(dtype)
    pooled, argmax = get_backend("numpy").max_pool(rng.standard_normal((512, 5, 24, 24)).astype(dtype), 2)
    return dict(
        softmax_cross_entropy=("logits (512, 10)", (logits, rng.integers(0, 10, 512))),
        sample_labels=("probs (512, 10)", (probs, rng.random((1, 512)))),
        fisher_cotangents=("probs (512, 10)", (probs,)),
        per_sample_rows=("U rows (2560, 32 x 49)", (rng.standard_normal((2560, 32)).astype(dtype), rng.standard_normal((256, 49)).astype(dtype), u, 0)),
        ea_update=("A (785, 785)", (factor, factor.T.copy(), 0.95, np.empty_like(factor))),
        eigen_divide=("V (256, 785)", (rotated, d_g, d_a, 0.01)),
        kron_sum_divide=("V (256, 785)", (rotated, d_g, d_a, 0.01)),
        kl_and_grad=("logits (512, 10), symmetric", (logits, logits[::-1].copy(), "symmetric")),
        im2col=("images (512, 1, 28, 28), 5 x 5", (images, 5, 1, 0)),
        col2im=("patches (512, 5 x 5 x 5, 64)", (conv2_cols, (5, 12, 12), 5, 1, 0)),
        lower_rows=("(512, 5, 12, 12), 5 x 5", (rng.standard_normal((512, 5, 12, 12)).astype(dtype), 5, 1, 0)),
        conv2d=("images, W (5, 1, 5, 5)", (images, conv1_weight, conv1_weight[:, 0, 0, 0], 1, 0)),
        conv2d_grads=("dy (512, 5, 24, 24), 5 x 5", (images, rng.standard_normal((512, 5, 24, 24)).astype(dtype), 5, 1, 0)),
        max_pool=("(512, 5, 24, 24), 2 x 2", (rng.standard_normal((512, 5, 24, 24)).astype(dtype), 2)),
        max_unpool=("(512, 5, 12, 12) -> 24 x 24", (pooled, argmax, (5, 24, 24), 2)),
        matmul=("(512, 784) @ (784, 256)", (rng.standard_normal((512, 784)).astype(dtype), rng.standard_normal((784, 256)).astype(dtype))),
    )


def available_backends() -> list[str]:
    """numpy and numba always; cuda on a real GPU (the simulator's timings mean nothing)."""
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
        kernels = {name: getattr(get_backend(name), op) for name in backends}
        times = {name: median_time(partial(fn, *args), repeats) for name, fn in kernels.items()}
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


