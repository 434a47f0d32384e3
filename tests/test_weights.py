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
    conv_out = net.forward(theta, x).inputs[1]  # the input of the ReLU = the convolution's output
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
