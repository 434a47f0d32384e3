"""Weights in and out: PyTorch state dicts and flax / haiku trees map to theta and back."""

import itertools

import numpy as np
import pytest

from kldwrm_ref import MLP
from kldwrm_ref.model import Conv2d, Dense, Flatten, Network, ReLU, paper_cnn
from kldwrm_ref.model.weights import theta_from_flax_params, theta_from_torch_state_dict, theta_to_flax_params, theta_to_torch_state_dict


def torch_like_mlp_state(rng, sizes):
    """An nn.Sequential(Linear, ReLU, Linear, ...) state dict: '0.weight' (out, in), '0.bias', '2.weight', ..."""
    state = {}
    for l, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        state[f"{2 * l}.weight"] = rng.standard_normal((n_out, n_in))
        state[f"{2 * l}.bias"] = rng.standard_normal(n_out)
    return state


def test_torch_state_dict_drives_the_same_mlp_as_a_direct_forward():
    rng = np.random.default_rng(0)
    sizes = [5, 4, 3]
    state = torch_like_mlp_state(rng, sizes)
    mlp = MLP(sizes)
    theta = theta_from_torch_state_dict(mlp, state)
    X = rng.standard_normal((6, 5))
    hidden = np.maximum(X @ state["0.weight"].T + state["0.bias"], 0.0)  # y = x W^T + b, as nn.Linear
    np.testing.assert_allclose(mlp.logits(theta, X), hidden @ state["2.weight"].T + state["2.bias"], rtol=1e-14)
    back = theta_to_torch_state_dict(mlp, theta)
    assert list(back) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for key in state:
        np.testing.assert_array_equal(back[key], state[key])


def test_flax_tree_of_the_same_weights_imports_to_the_same_theta():
    rng = np.random.default_rng(1)
    state = torch_like_mlp_state(rng, [6, 5, 4, 3])
    flax = {f"Dense_{i}": {"kernel": state[f"{2 * i}.weight"].T, "bias": state[f"{2 * i}.bias"]} for i in range(3)}
    mlp = MLP([6, 5, 4, 3])
    theta = theta_from_torch_state_dict(mlp, state)
    np.testing.assert_array_equal(theta_from_flax_params(mlp, flax), theta)
    np.testing.assert_array_equal(theta_from_flax_params(mlp, theta_to_flax_params(mlp, theta)), theta)


def test_flax_convolution_kernel_is_transposed_to_pytorch_layout():
    """A flax (kh, kw, in, out) kernel gives the convolution y = sum_{h,w,c} x[c, i+h, j+w] K[h, w, c, o] + b."""
    rng = np.random.default_rng(2)
    net = Network([Conv2d(2, 3, 3), ReLU(), Flatten(), Dense(3 * 2 * 2, 4)], (2, 4, 4))
    K, b = rng.standard_normal((3, 3, 2, 3)), rng.standard_normal(3)
    tree = {"Conv_0": {"kernel": K, "bias": b}, "Dense_0": {"kernel": rng.standard_normal((12, 4)), "bias": rng.standard_normal(4)}}
    theta = theta_from_flax_params(net, tree)
    x = rng.standard_normal((1, 2, 4, 4))
    direct = np.zeros((3, 2, 2))
    for o in range(3):
        for i in range(2):
            for j in range(2):
                direct[o, i, j] = np.sum(x[0, :, i : i + 3, j : j + 3].transpose(1, 2, 0) * K[:, :, :, o]) + b[o]
    conv_out, _ = net.layers[0].forward(net.params(theta)[0], x, net.backend, None)
    np.testing.assert_allclose(conv_out[0], direct, rtol=1e-13)
    for name, leaves in theta_to_flax_params(net, theta).items():
        original = tree["Conv_0" if name == "layer_0" else "Dense_0"]
        np.testing.assert_array_equal(leaves["kernel"], original["kernel"])


def test_paper_cnn_round_trips_in_pytorch_layout():
    net = paper_cnn()
    theta = net.init(3)
    state = theta_to_torch_state_dict(net, theta)
    assert [(k, v.shape) for k, v in state.items()][:2] == [("0.weight", (5, 1, 5, 5)), ("0.bias", (5,))]
    assert sum(v.size for v in state.values()) == 4712
    np.testing.assert_array_equal(theta_from_torch_state_dict(net, state), theta)


@pytest.mark.parametrize(
    "state, match",
    [
        ({"0.weight": np.zeros((4, 5)), "0.bias": np.zeros(4), "2.weight": np.zeros((3, 4))}, "3 tensors, the network 4"),
        ({"0.weight": np.zeros((5, 4)), "0.bias": np.zeros(4), "2.weight": np.zeros((3, 4)), "2.bias": np.zeros(3)}, r"0.weight: expected shape \(4, 5\)"),
        ({"0.weight": np.zeros((4, 5), dtype=object), "0.bias": np.zeros(4), "2.weight": np.zeros((3, 4)), "2.bias": np.zeros(3)}, "numeric array"),
    ],
)
def test_bad_state_dicts_are_refused_naming_the_tensor(state, match):
    with pytest.raises(ValueError, match=match):
        theta_from_torch_state_dict(MLP([5, 4, 3]), state)


# ---------------------------------------------------------------- named layers
def _relu_mlp(params, X):
    """y = W2 relu(W1 x + b1) + b2 written from a named {layer: (W (out, in), b)} mapping."""
    (W1, b1), (W2, b2) = params["fc1"], params["fc2"]
    return np.maximum(X @ W1.T + b1, 0.0) @ W2.T + b2


def test_named_torch_state_dict_loads_by_key_in_any_order_and_round_trips():
    """A module with named layers (self.fc1, self.fc2): keys 'fc1.weight', ..., here listed in an
    order other than parameters()', are read by name."""
    rng = np.random.default_rng(4)
    params = {"fc1": (rng.standard_normal((4, 5)), rng.standard_normal(4)), "fc2": (rng.standard_normal((3, 4)), rng.standard_normal(3))}
    state = {"fc2.bias": params["fc2"][1], "fc1.weight": params["fc1"][0], "fc2.weight": params["fc2"][0], "fc1.bias": params["fc1"][1]}
    mlp, X = MLP([5, 4, 3]), rng.standard_normal((6, 5))
    theta = theta_from_torch_state_dict(mlp, state, names=["fc1", "fc2"])
    np.testing.assert_allclose(mlp.logits(theta, X), _relu_mlp(params, X), rtol=1e-14)
    back = theta_to_torch_state_dict(mlp, theta, names=["fc1", "fc2"])
    assert list(back) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert all(np.array_equal(back[key], state[key]) for key in state)
    prefixed = theta_to_torch_state_dict(mlp, theta, names=["model.fc1", "model.fc2"])  # a prefix scheme is a list of names
    assert list(prefixed) == ["model.fc1.weight", "model.fc1.bias", "model.fc2.weight", "model.fc2.bias"]
    np.testing.assert_array_equal(theta_from_torch_state_dict(mlp, prefixed, names=["model.fc1", "model.fc2"]), theta)


def test_named_flax_tree_loads_by_name_and_round_trips():
    """A flax module with submodules named 'encoder' and 'head': kernels (in, out)."""
    rng = np.random.default_rng(5)
    params = {"fc1": (rng.standard_normal((4, 5)), rng.standard_normal(4)), "fc2": (rng.standard_normal((3, 4)), rng.standard_normal(3))}
    tree = {"head": {"bias": params["fc2"][1], "kernel": params["fc2"][0].T.copy()}, "encoder": {"kernel": params["fc1"][0].T.copy(), "bias": params["fc1"][1]}}
    mlp, X = MLP([5, 4, 3]), rng.standard_normal((6, 5))
    theta = theta_from_flax_params(mlp, tree, names=["encoder", "head"])
    np.testing.assert_allclose(mlp.logits(theta, X), _relu_mlp(params, X), rtol=1e-14)
    back = theta_to_flax_params(mlp, theta, names=["encoder", "head"])
    assert list(back) == ["encoder", "head"]
    for name in tree:
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(back[name][leaf], tree[name][leaf])


def test_named_paper_cnn_round_trips_in_both_layouts():
    net, names = paper_cnn(), ["conv1", "conv2", "fc1", "fc2"]
    theta = net.init(1)
    state = theta_to_torch_state_dict(net, theta, names=names)
    assert [(k, v.shape) for k, v in state.items()] == [
        ("conv1.weight", (5, 1, 5, 5)), ("conv1.bias", (5,)), ("conv2.weight", (7, 5, 5, 5)), ("conv2.bias", (7,)),
        ("fc1.weight", (30, 112)), ("fc1.bias", (30,)), ("fc2.weight", (10, 30)), ("fc2.bias", (10,)),
    ]
    np.testing.assert_array_equal(theta_from_torch_state_dict(net, dict(reversed(state.items())), names=names), theta)
    tree = theta_to_flax_params(net, theta, names=names)
    assert tree["conv2"]["kernel"].shape == (5, 5, 5, 7) and tree["fc1"]["kernel"].shape == (112, 30)
    np.testing.assert_array_equal(theta_from_flax_params(net, tree, names=names), theta)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda mlp: theta_from_torch_state_dict(mlp, {"fc1.weight": np.zeros((4, 5)), "fc1.bias": np.zeros(4), "fc2.weight": np.zeros((3, 4)), "fc3.bias": np.zeros(3)}, names=["fc1", "fc2"]), "missing fc2.bias; unexpected fc3.bias"),
        (lambda mlp: theta_from_torch_state_dict(mlp, {"fc1.weight": np.zeros((5, 4)), "fc1.bias": np.zeros(4), "fc2.weight": np.zeros((3, 4)), "fc2.bias": np.zeros(3)}, names=["fc1", "fc2"]), r"fc1.weight: expected shape \(4, 5\)"),
        (lambda mlp: theta_to_torch_state_dict(mlp, mlp.init(0), names=["fc1"]), "names must be 2 distinct non-empty strings"),
        (lambda mlp: theta_to_flax_params(mlp, mlp.init(0), names=["a", "a"]), "names must be 2 distinct"),
        (lambda mlp: theta_from_flax_params(mlp, {"encoder": {"kernel": np.zeros((5, 4)), "bias": np.zeros(4)}}, names=["encoder", "head"]), "params does not match the network: missing head"),
    ],
)
def test_named_layers_that_do_not_match_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call(MLP([5, 4, 3]))
