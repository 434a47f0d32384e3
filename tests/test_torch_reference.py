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
