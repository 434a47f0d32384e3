"""Weights in and out: theta <-> PyTorch ``state_dict`` and flax / haiku parameter trees.

Plain arrays only (neither framework is a dependency): a state dict is any mapping of name ->
array-like, in the order of the module's ``parameters()``; theta's layout is that order with every
tensor row-major (docs/conventions.md), so the torch mapping is a concatenation.  flax / haiku
trees hold one sub-mapping per layer with parameters, in layer order, each with a ``kernel`` (dense:
(in, out); convolution: (kh, kw, in, out)) and a ``bias``; the kernels are transposed to PyTorch's
(out, in) and (out, in, kh, kw).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kldwrm_ref.model.network import Network, ParamTensor

# flax / haiku kernel axes -> PyTorch axes, by kernel rank
_FROM_FLAX = {2: (1, 0), 4: (3, 2, 0, 1)}
_TO_FLAX = {2: (1, 0), 4: (2, 3, 1, 0)}


def _checked(tensor: ParamTensor, name: str, value, dtype) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == object or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name}: expected a numeric array, got dtype {array.dtype}")
    if array.shape != tensor.shape:
        raise ValueError(f"{name}: expected shape {tensor.shape} for layer {tensor.layer} {tensor.name}, got {array.shape}")
    return array.astype(dtype, copy=False)


def theta_from_torch_state_dict(network: Network, state_dict: Mapping[str, object]) -> np.ndarray:
    """theta from a PyTorch-style ``state_dict`` (names -> arrays in ``parameters()`` order)."""
    items = list(state_dict.items())
    if len(items) != len(network.tensors):
        raise ValueError(f"state_dict has {len(items)} tensors, the network {len(network.tensors)} ({', '.join(f'{t.name}{t.shape}' for t in network.tensors)})")
    parts = [_checked(t, name, value, network.dtype).ravel() for t, (name, value) in zip(network.tensors, items)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=network.dtype)


def theta_to_torch_state_dict(network: Network, theta: np.ndarray) -> dict[str, np.ndarray]:
    """``{"<layer index>.<weight|bias>": array}`` (nn.Sequential naming), copies in theta's order."""
    theta = network.check_theta(theta)
    return {f"{t.layer}.{t.name}": theta[t.offset : t.offset + t.size].reshape(t.shape).copy() for t in network.tensors}


def _parametrised_tensors(network: Network) -> list[list[ParamTensor]]:
    by_layer: dict[int, list[ParamTensor]] = {}
    for t in network.tensors:
        by_layer.setdefault(t.layer, []).append(t)
    return list(by_layer.values())


def theta_from_flax_params(network: Network, params: Mapping[str, Mapping[str, object]]) -> np.ndarray:
    """theta from a flax / haiku tree ``{layer name: {"kernel": ..., "bias": ...}}`` in layer order."""
    layers = _parametrised_tensors(network)
    if len(params) != len(layers):
        raise ValueError(f"params has {len(params)} layers, the network {len(layers)} layers with parameters")
    parts = []
    for (name, leaves), (weight, bias) in zip(params.items(), layers):
        if set(leaves) != {"kernel", "bias"}:
            raise ValueError(f"{name}: expected the leaves 'kernel' and 'bias', got {sorted(leaves)}")
        kernel = np.asarray(leaves["kernel"])
        if kernel.ndim not in _FROM_FLAX:
            raise ValueError(f"{name}.kernel: expected a dense (in, out) or convolution (kh, kw, in, out) kernel, got shape {kernel.shape}")
        parts += [_checked(weight, f"{name}.kernel", kernel.transpose(_FROM_FLAX[kernel.ndim]), network.dtype).ravel(), _checked(bias, f"{name}.bias", leaves["bias"], network.dtype).ravel()]
    return np.concatenate(parts)


def theta_to_flax_params(network: Network, theta: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """``{"layer_<i>": {"kernel", "bias"}}`` with flax's kernel layouts (dense (in, out), conv (kh, kw, in, out))."""
    torch = theta_to_torch_state_dict(network, theta)
    tree = {}
    for weight, bias in _parametrised_tensors(network):
        kernel = torch[f"{weight.layer}.{weight.name}"]
        tree[f"layer_{weight.layer}"] = {"kernel": np.ascontiguousarray(kernel.transpose(_TO_FLAX[kernel.ndim])), "bias": torch[f"{bias.layer}.{bias.name}"]}
    return tree
