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


# ---------------------------------------------------------------- convolutional networks
# A CNN is a ``spec``: a list of ("conv", in, out, kernel, stride, padding), ("pool", kernel),
# ("relu",), ("flatten",), ("dropout", scaled_mask) and ("dense", in, out).  Convolution is
# computed as a sum over kernel taps of shifted inputs and pooling as a max over shifted grids:
# no patch matrices.


def conv2d(x, W, b, stride, padding):
    """y[n, o, i, j] = b[o] + sum_{c, u, v} W[o, c, u, v] xpad[n, c, i s + u, j s + v]."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    k = W.shape[2]
    ho, wo = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    y = np.zeros((x.shape[0], W.shape[0], ho, wo), dtype=complex) + b[None, :, None, None]
    for u in range(k):
        for v in range(k):
            shifted = x[:, :, u : u + stride * ho : stride, v : v + stride * wo : stride]
            y += np.einsum("nchw,oc->nohw", shifted, W[:, :, u, v])
    return y


def max_pool(x, k):
    """Max over k x k windows (stride k, floor), the first maximum in row-major order (by real part)."""
    ho, wo = x.shape[2] // k, x.shape[3] // k
    grids = np.stack([x[:, :, u : u + k * ho : k, v : v + k * wo : k] for u in range(k) for v in range(k)])
    first = np.argmax(grids.real, axis=0)
    return np.take_along_axis(grids, first[None], axis=0)[0]


def cnn_logits(spec, theta, X):
    a, pos = X.astype(complex), 0
    for layer in spec:
        kind = layer[0]
        if kind in ("conv", "dense"):
            shape = (layer[2], layer[1], layer[3], layer[3]) if kind == "conv" else (layer[2], layer[1])
            size = int(np.prod(shape))
            W, b = theta[pos : pos + size].reshape(shape), theta[pos + size : pos + size + shape[0]]
            pos += size + shape[0]
            a = conv2d(a, W, b, layer[4], layer[5]) if kind == "conv" else a @ W.T + b
        elif kind == "pool":
            a = max_pool(a, layer[1])
        elif kind == "relu":
            a = activation("relu", a)
        elif kind == "flatten":
            a = a.reshape(a.shape[0], -1)
        else:  # ("dropout", scaled_mask)
            a = a * layer[1]
    return a


def cnn_mean_loss(spec, theta, X, y):
    return -log_softmax(cnn_logits(spec, theta, X))[np.arange(len(y)), y].mean()


def complex_step(f, x):
    """Columns d f / d x_i = Im f(x + i h e_i) / h, stacked on a last axis."""
    cols = []
    for i in range(x.size):
        t = x.astype(complex)
        t.flat[i] += 1j * H
        cols.append(np.imag(f(t)) / H)
    return np.stack(cols, axis=-1)


def cnn_gradients(spec, theta, X, y):
    """d mean loss / d theta and d mean loss / d X (shaped like X)."""
    d_theta = complex_step(lambda t: cnn_mean_loss(spec, t, X, y), theta)
    d_X = complex_step(lambda x: cnn_mean_loss(spec, theta, x, y), X).reshape(X.shape)
    return d_theta, d_X


def cnn_jacobians(spec, theta, X):
    """J[i] = d logits(x_i) / d theta, shape (N, C, n)."""
    return complex_step(lambda t: cnn_logits(spec, t, X), theta)


def cnn_exact_fisher(spec, theta, X):
    """mean_x J^T (diag(pi) - pi pi^T) J."""
    J = cnn_jacobians(spec, theta, X)
    pi = np.exp(log_softmax(cnn_logits(spec, theta, X)).real)
    H_logits = np.einsum("nc,cd->ncd", pi, np.eye(pi.shape[1])) - np.einsum("nc,nd->ncd", pi, pi)
    return np.einsum("nca,ncd,ndb->ab", J, H_logits, J) / X.shape[0]
