"""A :class:`~kldwrm_ref.model.network.Network` computed on device arrays (docs/theory.md §1, §5).

:class:`DeviceNetwork` runs the same passes as the host network - forward with caches, backward
of several cotangents per sample, the gradient in theta layout, the K-FAC factors of every layer -
with theta, the batch, activations and cotangents all device arrays.  Each layer type of
:mod:`kldwrm_ref.model` has a device twin here (the table :data:`DEVICE_LAYERS`); a network with
another layer type is refused with its name.  Dropout masks are drawn on the host by the same
Generator calls as :class:`~kldwrm_ref.model.conv.Dropout` (so both paths draw the same masks) and
uploaded as one byte per unit: the only array a training step of a stochastic network uploads.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from kldwrm_ref.backends import cuda as device_ops
from kldwrm_ref.curvature.kfac import KFACFactors
from kldwrm_ref.gpu import kernels
from kldwrm_ref.gpu.transfers import to_device
from kldwrm_ref.model.conv import Conv2d, ConvFactors, Dropout, Flatten, MaxPool2d
from kldwrm_ref.model.layers import Dense, ReLU, Tanh
from kldwrm_ref.model.network import Network


class DeviceCache(NamedTuple):
    """A device forward pass: each layer's input and backward cache, and the logits."""

    inputs: list[Any]
    caches: list[Any]
    logits: Any


class _Dense:
    """y = x W^T + b; factors A = mean abar abar^T, G = (1/N) sum_r delta_r delta_r^T."""

    def __init__(self, layer: Dense):
        self.layer = layer

    def forward(self, params, x, keep):
        W, b = params
        y = device_ops.matmul_device(x, W, trans_b=True)
        kernels.add_rows(y, b)
        return y, x

    def backward(self, params, x, dy):
        return device_ops.matmul_device(dy, params[0])

    def gradients(self, params, x, dy, out) -> None:
        device_ops.matmul_device(dy, x, trans_a=True, out=out[0])
        kernels.column_sums(dy, out[1])

    def factors(self, x, dy, n: int):
        return KFACFactors(kernels.gram(x, 1.0 / n, True), kernels.gram(dy, 1.0 / n, False))


class _Conv:
    """im2col + one product; KFC factors in the layer's scaling (docs/theory.md §5.6)."""

    def __init__(self, layer: Conv2d):
        self.layer = layer

    def _matrix(self, W):
        return W.reshape(self.layer.out_channels, self.layer.patch_size)

    def forward(self, params, x, keep):
        layer, (W, b) = self.layer, params
        patches = device_ops.im2col_device(x, layer.kernel_size, layer.stride, layer.padding)
        n, positions, size = patches.shape
        rows = device_ops.matmul_device(patches.reshape(n * positions, size), self._matrix(W), trans_b=True)
        out_hw = layer.output_shape(tuple(x.shape[1:]))[1:]
        return kernels.conv_output(rows, b, (n, layer.out_channels, *out_hw)), (patches, tuple(x.shape[1:]))

    def backward(self, params, cache, dy):
        layer, (patches, in_shape) = self.layer, cache
        dcols = device_ops.matmul_device(kernels.channels_to_rows(dy), self._matrix(params[0]))
        return device_ops.col2im_device(dcols.reshape(dy.shape[0], patches.shape[1], layer.patch_size), in_shape, layer.kernel_size, layer.stride, layer.padding)

    def gradients(self, params, cache, dy, out) -> None:
        patches = cache[0]
        if dy.shape[0] != patches.shape[0]:
            raise ValueError("the device gradient takes one cotangent row per sample")
        rows = kernels.channels_to_rows(dy)
        device_ops.matmul_device(rows, patches.reshape(rows.shape[0], self.layer.patch_size), trans_a=True, out=self._matrix(out[0]))
        kernels.column_sums(rows, out[1])

    def factors(self, cache, dy, n: int):
        patches = cache[0]
        count, positions, size = patches.shape
        a_scale, g_scale = (n * positions, n) if self.layer.kfac_scaling == "textbook" else (n * positions * positions, n / positions)
        A = kernels.gram(patches.reshape(count * positions, size), 1.0 / a_scale, True)
        G = kernels.gram(kernels.channels_to_rows(dy), 1.0 / g_scale, False)
        G_bias = kernels.gram(kernels.last_sums(dy), 1.0 / n, False)
        A_bias = kernels.empty((1, 1), A.dtype)
        kernels.launch_fill(A_bias, 1.0)
        return ConvFactors(A, G, G_bias, A_bias)


class _Activation:
    """ReLU or tanh: the cache is the derivative, backward multiplies by it."""

    def __init__(self, layer: ReLU | Tanh):
        self.apply = kernels.relu if isinstance(layer, ReLU) else kernels.tanh

    def forward(self, params, x, keep):
        return self.apply(x)

    def backward(self, params, derivative, dy):
        return kernels.multiply_rows(dy, derivative)


class _MaxPool:
    def __init__(self, layer: MaxPool2d):
        self.kernel = layer.kernel_size

    def forward(self, params, x, keep):
        y, argmax = device_ops.max_pool_device(x, self.kernel)
        return y, (argmax, tuple(x.shape[1:]))

    def backward(self, params, cache, dy):
        return device_ops.max_unpool_device(dy, cache[0], cache[1], self.kernel)


class _Flatten:
    def __init__(self, layer: Flatten):
        pass

    def forward(self, params, x, keep):
        return x.reshape(x.shape[0], x.size // x.shape[0]), tuple(x.shape[1:])

    def backward(self, params, shape, dy):
        return dy.reshape(dy.shape[0], *shape)


class _Dropout:
    """Inverted dropout with the uploaded keep flags (identity without them: evaluation)."""

    def __init__(self, layer: Dropout):
        self.keep_probability = 1.0 - layer.p

    def forward(self, params, x, keep):
        if keep is None:
            return x, None
        return kernels.dropout(x, keep, self.keep_probability)

    def backward(self, params, mask, dy):
        return dy if mask is None else kernels.multiply_rows(dy, mask)


DEVICE_LAYERS: dict[type, type] = {Dense: _Dense, Conv2d: _Conv, ReLU: _Activation, Tanh: _Activation, MaxPool2d: _MaxPool, Flatten: _Flatten, Dropout: _Dropout}


class DeviceNetwork:
    """The passes of ``net`` on device arrays; theta is a device vector in the host layout."""

    def __init__(self, net: Network):
        unsupported = sorted({type(layer).__name__ for layer in net.layers if type(layer) not in DEVICE_LAYERS})
        if unsupported:
            raise ValueError(f"the device-resident path has no device twin of the layer type(s) {unsupported}; supported: {sorted(t.__name__ for t in DEVICE_LAYERS)}")
        self.net = net
        self.ops = [DEVICE_LAYERS[type(layer)](layer) for layer in net.layers]

    def params(self, theta) -> list[list[Any]]:
        """Per layer, its parameter tensors as device views into ``theta``."""
        views: list[list[Any]] = [[] for _ in self.net.layers]
        for t in self.net.tensors:
            views[t.layer].append(theta[t.offset : t.offset + t.size].reshape(t.shape))
        return views

    def dropout_keeps(self, rng: np.random.Generator | None, n: int) -> list[Any] | None:
        """Per layer, the uploaded keep flags of a training pass (1[u >= p] from ``rng`` in the
        order the host forward pass draws them); None when ``rng`` is None (evaluation)."""
        if rng is None:
            return None
        keeps: list[Any] = [None] * len(self.net.layers)
        for i, layer in enumerate(self.net.layers):
            if isinstance(layer, Dropout):
                keeps[i] = to_device(rng.random((n, *self.net.shapes[i])) >= layer.p, np.uint8)
        return keeps

    def forward(self, theta, X, keeps: list[Any] | None = None) -> DeviceCache:
        inputs, caches, x = [], [], X
        for i, (op, params) in enumerate(zip(self.ops, self.params(theta))):
            inputs.append(x)
            x, cache = op.forward(params, x, None if keeps is None else keeps[i])
            caches.append(cache)
        return DeviceCache(inputs, caches, x)

    def backward(self, theta, cache: DeviceCache, dlogits) -> list[Any]:
        """Cotangents of every layer's output from (reps * N, C) logit cotangents."""
        params = self.params(theta)
        cotangents: list[Any] = [dlogits] * len(self.ops)
        dy = dlogits
        for i in range(len(self.ops) - 1, -1, -1):
            cotangents[i] = dy
            if i > 0:
                dy = self.ops[i].backward(params[i], cache.caches[i], dy)
        return cotangents

    def gradient(self, theta, cache: DeviceCache, cotangents: list[Any]):
        """sum over the N cotangent rows of the parameter gradient, a device vector in theta layout."""
        grad = kernels.empty(self.net.n_params, self.net.dtype)
        params, grads = self.params(theta), self.params(grad)
        for i in self.net.parametrised:
            self.ops[i].gradients(params[i], cache.caches[i], cotangents[i], grads[i])
        return grad

    def vjp(self, theta, cache: DeviceCache, dlogits):
        return self.gradient(theta, cache, self.backward(theta, cache, dlogits))

    def kfac_factors(self, cache: DeviceCache, cotangents: list[Any], n: int) -> tuple:
        """Per layer with parameters its K-FAC factors (device arrays), as the host layers give them."""
        return tuple(self.ops[i].factors(cache.caches[i], cotangents[i], n) for i in self.net.parametrised)
