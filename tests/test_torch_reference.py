"""Optional cross-check against PyTorch autograd (an implementation outside this project).

Skipped when torch is not installed (it is not a dependency); run it with torch present.
"""

import numpy as np
import pytest

from kldwrm_ref import MLP
from kldwrm_ref.curvature.fisher import fisher
from kldwrm_ref.curvature.kfac import kfac_factors

torch = pytest.importorskip("torch")
torch.set_default_dtype(torch.float64)


def torch_net(mlp, theta):
    layers = []
    for l, (W, b) in enumerate(mlp.unflatten(theta)):
        linear = torch.nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(W.copy()))
            linear.bias.copy_(torch.from_numpy(b.copy()))
        layers.append(linear)
        if l < mlp.n_layers - 1:
            layers.append(torch.nn.ReLU() if mlp.activation == "relu" else torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_gradient_fisher_and_kfac_factors_match_pytorch(activation):
    rng = np.random.default_rng(0)
    mlp = MLP([7, 6, 5, 4], activation)
    theta = mlp.init(1) + 0.1 * rng.standard_normal(mlp.n_params)
    X, y = rng.standard_normal((9, 7)), rng.integers(0, 4, 9)
    net = torch_net(mlp, theta)
    params = list(net.parameters())  # nn.Linear order: weight then bias, layer by layer = theta's layout
    loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(X)), torch.from_numpy(y))
    grad_torch = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).numpy()
    grad = mlp.loss_and_grad(theta, X, y)[1]
    assert np.linalg.norm(grad - grad_torch) <= 1e-10 * np.linalg.norm(grad_torch)

    def logits_of(flat):
        out, pos, h = None, 0, torch.from_numpy(X)
        for l, (o, i) in enumerate(mlp.layer_shapes):
            W = flat[pos : pos + o * i].reshape(o, i)
            b = flat[pos + o * i : pos + o * i + o]
            pos += o * i + o
            h = h @ W.T + b
            if l < mlp.n_layers - 1:
                h = torch.relu(h) if activation == "relu" else torch.tanh(h)
            out = h
        return out

    J = torch.autograd.functional.jacobian(logits_of, torch.from_numpy(theta)).numpy()  # (N, C, n)
    pi = torch.softmax(logits_of(torch.from_numpy(theta)), dim=1).detach().numpy()
    F_torch = sum(J[i].T @ (np.diag(pi[i]) - np.outer(pi[i], pi[i])) @ J[i] for i in range(len(X))) / len(X)
    F = fisher(mlp, theta, X)
    assert np.linalg.norm(F - F_torch) <= 1e-10 * np.linalg.norm(F_torch)

    # K-FAC factors: A from the layer inputs, G from autograd of each class's loss w.r.t. the pre-activations
    activations, preacts = [], []
    h = torch.from_numpy(X)
    for module in net:
        if isinstance(module, torch.nn.Linear):
            activations.append(h.detach())
            h = module(h)
            h.retain_grad()
            preacts.append(h)
        else:
            h = module(h)
    G_torch = [np.zeros((u.shape[1], u.shape[1])) for u in preacts]
    logp = torch.log_softmax(h, dim=1)
    for c in range(4):
        for i in range(len(X)):
            grads = torch.autograd.grad(-logp[i, c], preacts, retain_graph=True)
            for l, g in enumerate(grads):
                d = g[i].numpy()
                G_torch[l] += pi[i, c] * np.outer(d, d) / len(X)
    for l, (A, G) in enumerate(kfac_factors(mlp, theta, X)):
        abar = np.hstack([activations[l].numpy(), np.ones((len(X), 1))])
        assert np.linalg.norm(A - abar.T @ abar / len(X)) <= 1e-12 * np.linalg.norm(A)
        assert np.linalg.norm(G - G_torch[l]) <= 1e-10 * np.linalg.norm(G_torch[l])


def test_cnn_gradient_and_kfc_factors_match_pytorch():
    """A small CNN loaded into torch through its state dict: autograd gradient, and KFC factors from
    torch's own unfold and per-sample output gradients (empirical Fisher, textbook scaling)."""
    from kldwrm_ref.model import Conv2d, Dense, Flatten, MaxPool2d, Network, ReLU
    from kldwrm_ref.model.weights import theta_to_torch_state_dict

    rng = np.random.default_rng(2)
    net = Network([Conv2d(2, 3, 3, padding=1), MaxPool2d(2), ReLU(), Conv2d(3, 4, 2, stride=2), ReLU(), Flatten(), Dense(4, 5, init="torch")], (2, 6, 6))
    theta = net.init(0) + 0.1 * rng.standard_normal(net.n_params)
    X, y = rng.standard_normal((7, 2, 6, 6)), rng.integers(0, 5, 7)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.MaxPool2d(2), torch.nn.ReLU(), torch.nn.Conv2d(3, 4, 2, stride=2), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4, 5)
    )
    model.load_state_dict({k: torch.from_numpy(v) for k, v in theta_to_torch_state_dict(net, theta).items()})
    x = torch.from_numpy(X)
    conv_outputs = []
    h = x
    for module in model:
        h = module(h)
        if isinstance(module, torch.nn.Conv2d):
            h.retain_grad()
            conv_outputs.append(h)
    loss = torch.nn.functional.cross_entropy(h, torch.from_numpy(y), reduction="sum")  # per-sample output gradients
    loss.backward()
    grad_torch = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy() / len(y)
    grad = net.loss_and_grad(theta, X, y)[1]
    assert np.linalg.norm(grad - grad_torch) <= 1e-10 * np.linalg.norm(grad_torch)

    factors = kfac_factors(net, theta, X, y, "empirical")
    second_input = model[2](model[1](conv_outputs[0]))  # ReLU(max-pool(conv 1)), as torch computes it
    for (module, output, inp), f in zip([(model[0], conv_outputs[0], x), (model[3], conv_outputs[1], second_input)], factors[:2]):
        patches = torch.nn.functional.unfold(inp, module.kernel_size, padding=module.padding, stride=module.stride)  # (N, C k k, T)
        n, _, t = patches.shape
        pbar = torch.cat([patches, torch.ones(n, 1, t, dtype=patches.dtype)], dim=1).permute(0, 2, 1).reshape(n * t, -1)
        A = (pbar.T @ pbar / (n * t)).detach().numpy()
        delta = output.grad.permute(0, 2, 3, 1).reshape(n * t, -1)
        G = (delta.T @ delta / n).numpy()
        np.testing.assert_allclose(f.A, A, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(f.G, G, rtol=1e-10, atol=1e-14)
