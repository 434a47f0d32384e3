"""Shared hypothesis strategies: small random MLPs, points and batches (float64)."""

import numpy as np
from hypothesis import strategies as st

from kldwrm_ref import MLP


@st.composite
def nets(draw, max_width=6, max_hidden=2, max_classes=5):
    """(mlp, theta, X, y, rng) for a random architecture, point and batch."""
    n_hidden = draw(st.integers(0, max_hidden))
    sizes = [draw(st.integers(1, max_width))] + [draw(st.integers(1, max_width)) for _ in range(n_hidden)] + [draw(st.integers(2, max_classes))]
    activation = draw(st.sampled_from(["relu", "tanh"]))
    seed = draw(st.integers(0, 2**31 - 1))
    n_rows = draw(st.integers(1, 7))
    rng = np.random.default_rng(seed)
    mlp = MLP(sizes, activation)
    theta = mlp.init(seed) + 0.1 * rng.standard_normal(mlp.n_params)
    X = rng.standard_normal((n_rows, sizes[0]))
    y = rng.integers(0, sizes[-1], size=n_rows)
    return mlp, theta, X, y, rng
