"""Networks by name: an architecture entry of a configuration or command line is a list of MLP
layer sizes or the name of a network here."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kldwrm_ref.model.conv import paper_cnn
from kldwrm_ref.model.mlp import MLP
from kldwrm_ref.model.network import Network
from kldwrm_ref.validation import check_choice

NAMED_NETWORKS = {"paper-cnn": paper_cnn}  # the authors' CNN (docs/reference.md), on 1 x 28 x 28 MNIST


def build_network(architecture: Sequence[int] | str, activation: str = "relu", dtype="float64", backend="numpy") -> Network:
    """The network of an architecture entry: MLP sizes, or a name of :data:`NAMED_NETWORKS`."""
    if isinstance(architecture, str):
        return NAMED_NETWORKS[check_choice(architecture, "architectures", tuple(NAMED_NETWORKS))](dtype=np.dtype(dtype), backend=backend)
    return MLP(list(architecture), activation=activation, dtype=np.dtype(dtype), backend=backend)


def arch_label(architecture: Sequence[int] | str) -> str:
    """"784-256-10" for an MLP, the name for a named network."""
    if isinstance(architecture, str):
        return architecture
    return "-".join(str(int(s)) for s in architecture)


def input_size(architecture: Sequence[int] | str) -> int:
    """Flattened input features the architecture takes."""
    return int(np.prod(build_network(architecture).input_shape))
