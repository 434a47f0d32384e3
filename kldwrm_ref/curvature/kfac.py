"""K-FAC factors and blocks (docs/theory.md §5.1, §5.3).

Every layer with parameters says what its factors are (``Layer.kfac_factors``: for a dense layer
A = mean abar abar^T over the inputs with the homogeneous coordinate, G = (1/N) sum over every
cotangent row of delta delta^T at its output) and where the resulting blocks act in theta
(``Layer.kfac_blocks``); this module loops over the layers.  The factors of one layer are a
:class:`KFACFactors` (A, G), or the layer's own NamedTuple (A, G, ...) when a block takes other
factors (``BlockSpec.a_factor``, ``g_factor``; a convolution's separate bias block,
:class:`~kldwrm_ref.model.conv.ConvFactors`);
a :class:`KronBlock` is G (x) A[rows, rows] acting on the row-major
(out x k) matrix ``theta[positions]``, which absorbs the permutation between [W | b] and theta's
W-then-b layout.  Bias handling: "joint" (one block per layer) or "separate" (the authors': W gets
G (x) A over the plain inputs, b gets G (x) [1]).  Factors are arrays of the network's namespace
(``net.backend.xp``); the positions are host index arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import numpy as np

from kldwrm_ref.arrays import to_numpy
from kldwrm_ref.curvature.fisher import cotangent_rows
from kldwrm_ref.model.layers import BIAS_MODES
from kldwrm_ref.model.network import Network, NetworkCache
from kldwrm_ref.validation import check_choice


class KFACFactors(NamedTuple):
    """One layer's K-FAC factors: A (input side) and G (output side); the block is G (x) A."""

    A: Any
    G: Any


class KronBlock(NamedTuple):
    """G (x) A acting on the row-major (out x k) matrix theta[positions].reshape(out, k)."""

    A: Any
    G: Any
    positions: np.ndarray
    name: str


def kfac_factors(
    net: Network,
    theta: np.ndarray,
    X: np.ndarray,
    y: np.ndarray | None = None,
    fisher_type: str = "exact",
    samples: int = 1,
    rng: np.random.Generator | None = None,
    cache: NetworkCache | None = None,
) -> tuple[KFACFactors, ...]:
    """Per layer with parameters, (A, G) from the Fisher's cotangents
    (:func:`kldwrm_ref.curvature.fisher.fisher_cotangents`): for a batch of one input and
    fisher_type="exact", G (x) A of a dense layer is exactly its block of the Fisher.
    ``cache`` reuses a forward pass of the same (theta, X)."""
    if cache is None:
        cache = net.forward(theta, X)
    rows = cotangent_rows(net, cache, fisher_type, y, samples, rng)
    cotangents = net.backward(theta, cache, rows)
    n_samples = cache.logits.shape[0]
    factors = [net.layers[i].kfac_factors(cache.caches[i], cotangents[i], n_samples, net.backend) for i in net.parametrised]
    return tuple(cast(KFACFactors, f) if hasattr(f, "_fields") else KFACFactors(*f) for f in factors)  # a layer's own (A, G, ...) reads as one


def kron_blocks(net: Network, factors: Sequence[KFACFactors], bias: str = "joint") -> list[KronBlock]:
    """Blocks over theta for the given per-layer factors (module docstring explains ``bias``)."""
    bias = check_choice(bias, "bias", BIAS_MODES)
    layers = net.parametrised
    if len(factors) != len(layers):
        raise ValueError(f"factors must hold one (A, G) per layer with parameters ({len(layers)}), got {len(factors)}")
    blocks = []
    for p, spec in net.kfac_blocks(bias):
        A, G = factors[p][spec.a_factor][spec.a_rows, spec.a_rows], factors[p][spec.g_factor]
        if spec.positions.size != A.shape[0] * G.shape[0]:
            raise ValueError(f"{spec.name}: factors of sizes A {A.shape} and G {G.shape} do not fit its {spec.positions.size} parameters")
        blocks.append(KronBlock(A, G, spec.positions, spec.name))
    return blocks


def kron_dense(blocks: Sequence[KronBlock], n_params: int) -> np.ndarray:
    """The block-diagonal K-FAC matrix assembled densely in theta layout, a host NumPy array (tests,
    small nets): factors of another namespace are copied to the host."""
    host = [(to_numpy(block.A), to_numpy(block.G), block.positions) for block in blocks]
    dense = np.zeros((n_params, n_params), dtype=host[0][0].dtype)
    for A, G, positions in host:
        dense[np.ix_(positions, positions)] = np.kron(G, A)
    return dense
