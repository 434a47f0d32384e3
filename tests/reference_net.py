"""An independent implementation of the same MLP for the tests, differentiated by complex step.

It shares no code with kldwrm_ref: its own parameter unpacking (PyTorch nn.Linear order), its
own forward pass written for complex inputs, and derivatives from the complex-step formula
f'(x) v = Im f(x + i h v) / h (h = 1e-30), which has no subtractive cancellation and is exact
to machine precision for analytic functions (ReLU is handled branch-wise on the real part).
"""

import itertools

import numpy as np

H = 1e-30


def unpack(sizes, theta):
    layers, pos = [], 0
    for fan_in, fan_out in itertools.pairwise(sizes):
        W = theta[pos : pos + fan_in * fan_out].reshape(fan_out, fan_in)
        pos += fan_in * fan_out
        b = theta[pos : pos + fan_out]
        pos += fan_out
        layers.append((W, b))
    return layers


def activation(name, u):
    if name == "tanh":
        return np.tanh(u)
    return np.where(u.real > 0, u, 0.0)


def forward_all(sizes, act, theta, X, perturb_layer=None, perturbation=None):
    """Logits and per-layer (input, pre-activation); optionally add a perturbation to u_l."""
    a = X.astype(complex)
    inputs, preacts = [], []
    layers = unpack(sizes, theta)
    for l, (W, b) in enumerate(layers):
        inputs.append(a)
        u = a @ W.T + b
        if perturb_layer == l:
            u = u + perturbation
        preacts.append(u)
        a = activation(act, u) if l < len(layers) - 1 else u
    return a, inputs, preacts


def log_softmax(z):
    m = z.real.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def mean_loss(sizes, act, theta, X, y):
    z, _, _ = forward_all(sizes, act, theta, X)
    return -log_softmax(z)[np.arange(len(y)), y].mean()


def gradient(sizes, act, theta, X, y):
    n = theta.size
    grad = np.empty(n)
    for i in range(n):
        t = theta.astype(complex)
        t[i] += 1j * H
        grad[i] = mean_loss(sizes, act, t, X, y).imag / H
    return grad


def jacobians(sizes, act, theta, X):
    """J[i] = d logits(x_i) / d theta, shape (N, C, n)."""
    n = theta.size
    cols = []
    for i in range(n):
        t = theta.astype(complex)
        t[i] += 1j * H
        z, _, _ = forward_all(sizes, act, t, X)
        cols.append(z.imag / H)
    return np.stack(cols, axis=-1)


def exact_fisher(sizes, act, theta, X):
    """mean_x J^T (diag(pi) - pi pi^T) J."""
    J = jacobians(sizes, act, theta, X)
    z, _, _ = forward_all(sizes, act, theta.astype(complex), X)
    pi = np.exp(log_softmax(z).real)
    F = np.zeros((theta.size, theta.size))
    for i in range(X.shape[0]):
        Hs = np.diag(pi[i]) - np.outer(pi[i], pi[i])
        F += J[i].T @ Hs @ J[i]
    return F / X.shape[0]


def kfac_factors_exact(sizes, act, theta, X):
    """Per layer (A, G): A = mean [a;1][a;1]^T, G = mean_x sum_c pi_c delta_c delta_c^T with
    delta_c = d(-log p(c|x)) / du_l from complex-step perturbations of u_l."""
    z, inputs, preacts = forward_all(sizes, act, theta.astype(complex), X)
    pi = np.exp(log_softmax(z).real)
    N = X.shape[0]
    factors = []
    for l, (a, u) in enumerate(zip(inputs, preacts)):
        abar = np.hstack([a.real, np.ones((N, 1))])
        A = abar.T @ abar / N
        out = u.shape[1]
        G = np.zeros((out, out))
        for c in range(z.shape[1]):
            delta = np.empty((N, out))
            for j in range(out):
                pert = np.zeros((N, out), dtype=complex)
                pert[:, j] = 1j * H
                zz, _, _ = forward_all(sizes, act, theta.astype(complex), X, l, pert)
                delta[:, j] = (-log_softmax(zz)[:, c]).imag / H
            G += (pi[:, c, None] * delta).T @ delta
        factors.append((A, G / N))
    return factors
