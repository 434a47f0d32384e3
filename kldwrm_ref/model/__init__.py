"""Networks of layers with hand-written backprop (docs/theory.md §1).

- :mod:`~kldwrm_ref.model.layers`: the :class:`Layer` protocol and the layers (Dense, ReLU, Tanh);
- :mod:`~kldwrm_ref.model.conv`: Conv2d, MaxPool2d, Flatten, Dropout and the authors' CNN :func:`paper_cnn`;
- :mod:`~kldwrm_ref.model.network`: :class:`Network`, a sequence of layers with softmax cross-entropy;
- :mod:`~kldwrm_ref.model.mlp`: :class:`MLP`, the fully connected network;
- :mod:`~kldwrm_ref.model.losses`: cross-entropy and the KL on logits.
"""

from kldwrm_ref.model.conv import Conv2d, ConvFactors, Dropout, Flatten, MaxPool2d, paper_cnn
from kldwrm_ref.model.layers import BlockSpec, Dense, Layer, ReLU, Tanh
from kldwrm_ref.model.mlp import ACTIVATIONS, MLP
from kldwrm_ref.model.network import Network, NetworkCache, ParamTensor

__all__ = ["ACTIVATIONS", "MLP", "BlockSpec", "Conv2d", "ConvFactors", "Dense", "Dropout", "Flatten", "Layer", "MaxPool2d", "Network", "NetworkCache", "ParamTensor", "ReLU", "Tanh", "paper_cnn"]
