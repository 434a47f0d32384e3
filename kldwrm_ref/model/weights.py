"""Weights in and out: theta <-> PyTorch ``state_dict`` and flax / haiku parameter trees.

Plain arrays only (neither framework is a dependency).  theta's layout is the layers' tensors in
order, every tensor row-major (docs/conventions.md), which is PyTorch's layout: a state dict maps
to theta by concatenation.  Keys are ``"<layer name>.weight"`` and ``"<layer name>.bias"``; the layer
names are ``names`` (one per layer with parameters, e.g. ``["fc1", "fc2"]`` for a module with named
layers, or ``["model.fc1", ...]`` for a prefix), by default the layer's index (``nn.Sequential``'s
``"0"``, ``"2"``, ...).  With ``names`` a state dict is read by key, in any order; without, by
position, in the order of the module's ``parameters()``.  flax / haiku trees hold one
sub-mapping per layer with parameters, ``{"kernel", "bias"}``, named ``names`` (by default
``"layer_<index>"``, and read by position); their kernels are dense (in, out) and convolution
(kh, kw, in, out), transposed from and to PyTorch's (out, in) and (out, in, kh, kw).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


def _parametrised_tensors(network: Network) -> list[list[ParamTensor]]:
    """The tensors of every layer with parameters, layer by layer."""
    by_layer: dict[int, list[ParamTensor]] = {}
    for t in network.tensors:
        by_layer.setdefault(t.layer, []).append(t)
    return list(by_layer.values())


def _layer_names(network: Network, names: Sequence[str] | None, default: str) -> list[str]:
    """``names`` checked (one distinct string per layer with parameters), or ``default``
    formatted with each layer's index."""
    layers = _parametrised_tensors(network)
    if names is None:
        return [default.format(tensors[0].layer) for tensors in layers]
    names = list(names)
    if len(names) != len(layers) or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"names must be {len(layers)} distinct non-empty strings, one per layer with parameters, got {names!r}")
    return names


def _from_keys(mapping: Mapping[str, object], keys: list[str], what: str) -> list[object]:
    """The values of ``keys`` in ``mapping``, refusing missing and unexpected keys by name."""
    missing, extra = [k for k in keys if k not in mapping], sorted(set(mapping) - set(keys))
    if missing or extra:
        raise ValueError(f"{what} does not match the network: {'missing ' + ', '.join(missing) if missing else ''}{'; ' if missing and extra else ''}{'unexpected ' + ', '.join(extra) if extra else ''}")
    return [mapping[k] for k in keys]


def theta_from_torch_state_dict(network: Network, state_dict: Mapping[str, object], names: Sequence[str] | None = None) -> np.ndarray:
    """theta from a PyTorch-style ``state_dict``: by key ``"<names[p]>.<weight|bias>"`` when
    ``names`` is given, else by position (``parameters()`` order)."""
    if names is None:
        items = list(state_dict.items())
        if len(items) != len(network.tensors):
            raise ValueError(f"state_dict has {len(items)} tensors, the network {len(network.tensors)} ({', '.join(f'{t.name}{t.shape}' for t in network.tensors)})")
        keys, values = [key for key, _ in items], [value for _, value in items]
    else:
        keys = [f"{name}.{t.name}" for name, tensors in zip(_layer_names(network, names, ""), _parametrised_tensors(network)) for t in tensors]
        values = _from_keys(state_dict, keys, "state_dict")
    parts = [_checked(t, key, value, network.dtype).ravel() for t, key, value in zip(network.tensors, keys, values)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=network.dtype)


def theta_to_torch_state_dict(network: Network, theta: np.ndarray, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``{"<layer name>.<weight|bias>": array}`` in theta's order, copies; layer p is named
    ``names[p]``, by default its index (nn.Sequential naming)."""
    theta = network.check_theta(theta)
    layer_names = _layer_names(network, names, "{}")
    return {f"{name}.{t.name}": theta[t.offset : t.offset + t.size].reshape(t.shape).copy() for name, tensors in zip(layer_names, _parametrised_tensors(network)) for t in tensors}


def theta_from_flax_params(network: Network, params: Mapping[str, Mapping[str, object]], names: Sequence[str] | None = None) -> np.ndarray:
    """theta from a flax / haiku tree ``{layer name: {"kernel": ..., "bias": ...}}``: by name when
    ``names`` is given, else in layer order."""
    layers = _parametrised_tensors(network)
    if names is None:
        if len(params) != len(layers):
            raise ValueError(f"params has {len(params)} layers, the network {len(layers)} layers with parameters")
        keys, trees = list(params), list[object](params.values())
    else:
        keys = _layer_names(network, names, "")
        trees = _from_keys(params, keys, "params")
    parts = []
    for name, leaves, (weight, bias) in zip(keys, trees, layers):
        if not isinstance(leaves, Mapping) or set(leaves) != {"kernel", "bias"}:
            raise ValueError(f"{name}: expected the leaves 'kernel' and 'bias', got {sorted(leaves) if isinstance(leaves, Mapping) else type(leaves).__name__}")
        kernel = np.asarray(leaves["kernel"])
        if kernel.ndim not in _FROM_FLAX:
            raise ValueError(f"{name}.kernel: expected a dense (in, out) or convolution (kh, kw, in, out) kernel, got shape {kernel.shape}")
        parts += [_checked(weight, f"{name}.kernel", kernel.transpose(_FROM_FLAX[kernel.ndim]), network.dtype).ravel(), _checked(bias, f"{name}.bias", leaves["bias"], network.dtype).ravel()]
    return np.concatenate(parts)


def theta_to_flax_params(network: Network, theta: np.ndarray, names: Sequence[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """``{layer name: {"kernel", "bias"}}`` with flax's kernel layouts (dense (in, out), conv
    (kh, kw, in, out)); layer p is named ``names[p]``, by default ``"layer_<index>"``."""
    torch = theta_to_torch_state_dict(network, theta)
    tree = {}
    for name, (weight, bias) in zip(_layer_names(network, names, "layer_{}"), _parametrised_tensors(network)):
        kernel = torch[f"{weight.layer}.{weight.name}"]
        tree[name] = {"kernel": np.ascontiguousarray(kernel.transpose(_TO_FLAX[kernel.ndim])), "bias": torch[f"{bias.layer}.{bias.name}"]}
    return tree
