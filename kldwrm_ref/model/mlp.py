"""The fully connected softmax classifier: a :class:`~kldwrm_ref.model.network.Network` of
``Dense`` layers with ReLU or tanh between them (docs/theory.md §1.1).

Parameter layout: layer by layer, W (out, in) row-major, then b (out,) - PyTorch ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kldwrm_ref.backends import Backend
from kldwrm_ref.model.layers import Dense, ReLU, Tanh
from kldwrm_ref.model.network import Network
from kldwrm_ref.validation import check_choice

ACTIVATIONS = ("relu", "tanh")


class MLP(Network):
    """Softmax MLP ``sizes = [in, hidden..., C]`` with ReLU or tanh hidden activations.

    Initialisation: W ~ N(0, gain^2 / fan_in), b = 0, with gain^2 = 2 before a ReLU (He et al.
    2015) and 1 otherwise (LeCun; the output layer too).
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu", dtype=np.float64, backend: str | Backend = "numpy"):
        sizes = list(sizes)
        if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in sizes):
            raise ValueError(f"sizes must be a list of at least two positive integers [in, ..., C], got {sizes!r}")
        if sizes[-1] < 2:
            raise ValueError(f"sizes[-1] (number of classes C) must be >= 2, got {sizes[-1]}")
        self.sizes = [int(s) for s in sizes]
        self.activation = check_choice(activation, "activation", ACTIVATIONS)
        hidden_init = "he-normal" if self.activation == "relu" else "lecun-normal"
        layers: list = []
        for l, (n_in, n_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            last = l == len(self.sizes) - 2
            layers.append(Dense(n_in, n_out, "lecun-normal" if last else hidden_init))
            if not last:
                layers.append(ReLU() if self.activation == "relu" else Tanh())
        super().__init__(layers, (self.sizes[0],), dtype, backend)

    def with_backend(self, backend: str | Backend) -> MLP:
        return MLP(self.sizes, self.activation, self.dtype, backend)

    def __repr__(self) -> str:
        return f"MLP(sizes={self.sizes}, activation={self.activation!r}, dtype={self.dtype.name}, backend={self.backend.name!r})"

    @property
    def n_layers(self) -> int:
        """Number of Dense layers."""
        return len(self.sizes) - 1

    @property
    def layer_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of each Dense layer."""
        return [(o, i) for i, o in zip(self.sizes[:-1], self.sizes[1:])]

    @property
    def offsets(self) -> list[int]:
        """Where each Dense layer's parameters start in theta, and n_params at the end."""
        return [self.layer_offset(i) for i in self.parametrised] + [self.n_params]

    def unflatten(self, theta: Any) -> list[tuple[Any, Any]]:
        """Per Dense layer (W, b) from ``theta`` (:meth:`Network.params`: views on NumPy)."""
        return [(p[0], p[1]) for p in self.params(theta) if p]

    def flatten(self, layers: Sequence[tuple[Any, Any]]) -> Any:
        """Inverse of :meth:`unflatten`: concatenate per-layer (W, b) (host data or arrays of the
        backend's namespace) into one theta of the namespace."""
        if len(layers) != self.n_layers:
            raise ValueError(f"layers must hold {self.n_layers} (W, b) pairs, got {len(layers)}")
        xp, parts = self.backend.xp, []
        for l, ((W, b), (out, inp)) in enumerate(zip(layers, self.layer_shapes)):
            W, b = self.backend.asarray(W, self.dtype), self.backend.asarray(b, self.dtype)
            if tuple(W.shape) != (out, inp) or tuple(b.shape) != (out,):
                raise ValueError(f"layer {l}: expected W {(out, inp)} and b {(out,)}, got {tuple(W.shape)} and {tuple(b.shape)}")
            parts += [xp.reshape(W, (-1,)), xp.reshape(b, (-1,))]
        return xp.concat(parts)
