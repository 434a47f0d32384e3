"""Layers with hand-written forward, backward (vjp), forward-mode (jvp), per-sample gradient rows
and K-FAC statistics (docs/theory.md §1, §5).

Every layer maps a batch ``x`` of shape (N, *in_shape) to (N, *out_shape) and owns the layout of
its parameters inside the network's flat ``theta`` (:meth:`Layer.param_shapes`, in PyTorch's
``parameters()`` order).  Cotangents may carry ``reps * N`` rows - several cotangents per sample,
stacked rep-major (the exact Fisher backpropagates C of them at once); row r belongs to sample
r mod N, and layers broadcast their cached per-sample quantities accordingly.

Arrays of a pass (inputs, caches, cotangents, parameters, gradients) are arrays of the backend's
namespace ``xp = backend.xp`` and are only touched through it (NumPy, CuPy, or any array-API
library); the kernels are calls through the backend.  Only :meth:`Layer.init` works on the host:
it draws from a NumPy Generator into NumPy views of a host theta.

A layer with parameters also says what its K-FAC factors are (:meth:`Layer.kfac_factors`: (A, G),
or a NamedTuple (A, G, ...) when a block needs another G) and how they act on theta
(:meth:`Layer.kfac_blocks`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from kldwrm_ref.backends import Backend
from kldwrm_ref.validation import check_choice, check_positive_int

BIAS_MODES = ("joint", "separate")
DENSE_INITS = ("he-normal", "lecun-normal", "torch")


class BlockSpec(NamedTuple):
    """Where one K-FAC block G (x) A[a_rows, a_rows] acts: ``positions`` lists the theta indices of
    its row-major (out x k) parameter matrix.  A is entry ``a_factor`` of the layer's factors and G
    entry ``g_factor`` (0 and 1; a convolution's separate bias block has its own A = [1] and G)."""

    name: str
    positions: np.ndarray
    a_rows: slice
    a_factor: int = 0
    g_factor: int = 1


@runtime_checkable
class Layer(Protocol):
    """What a layer provides to :class:`kldwrm_ref.model.network.Network`.

    ``params`` is the list of this layer's parameter tensors (reshaped slices of theta, read
    only, shapes from :meth:`param_shapes`); ``cache`` is whatever :meth:`forward` kept for the
    backward pass.  :meth:`param_gradients` returns the gradient of each tensor (summed over the
    cotangent rows), in the order of :meth:`param_shapes`; :meth:`per_sample_rows` writes this
    layer's columns, from ``start``, into the freshly allocated (R, n) array ``out``.
    """

    name: str

    def param_shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]: ...

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]: ...

    def init(self, params: list[np.ndarray], rng: np.random.Generator) -> None:
        """Fill ``params`` (host NumPy views of a host theta) with draws from ``rng``."""
        ...

    def forward(self, params: list[Any], x: Any, backend: Backend, rng: np.random.Generator | None) -> tuple[Any, Any]: ...

    def backward(self, params: list[Any], cache: Any, dy: Any, backend: Backend) -> Any: ...

    def param_gradients(self, params: list[Any], cache: Any, dy: Any, backend: Backend) -> list[Any]: ...

    def jvp(self, params: list[Any], cache: Any, dparams: list[Any], dx: Any | None, backend: Backend) -> Any | None: ...

    def per_sample_rows(self, cache: Any, dy: Any, out: Any, start: int, backend: Backend) -> None: ...

    def kfac_factors(self, cache: Any, dy: Any, n_samples: int, backend: Backend) -> tuple[Any, ...]: ...

    def kfac_blocks(self, start: int, bias: str, name: str) -> list[BlockSpec]: ...


@runtime_checkable
class PreparingLayer(Protocol):
    """A first layer with input-only work worth doing once per batch (Conv2d: im2col):
    ``forward(params, x, ...) == forward_prepared(params, prepare(x, backend), backend)``."""

    def prepare(self, x: Any, backend: Backend) -> Any: ...

    def forward_prepared(self, params: list[Any], prepared: Any, backend: Backend) -> tuple[Any, Any]: ...


def homogeneous_moment(rows: Any, backend: Backend) -> Any:
    """sum over rows of abar abar^T with abar = [a; 1] (the homogeneous coordinate last), unscaled."""
    xp = backend.xp
    n_in = rows.shape[1]
    A = xp.empty((n_in + 1, n_in + 1), dtype=rows.dtype)
    A[:-1, :-1] = backend.matmul(rows.T, rows)
    colsum = xp.sum(rows, axis=0)
    A[:-1, -1] = colsum
    A[-1, :-1] = colsum
    A[-1, -1] = float(rows.shape[0])
    return A


def host_float_dtype(xp: Any, dtype: Any) -> np.dtype:
    """The NumPy float type of the precision of ``dtype``, a float type of namespace ``xp`` (for
    host draws that must round as the pass does)."""
    return dtype if isinstance(dtype, np.dtype) else np.dtype(f"float{xp.finfo(dtype).bits}")


def affine_blocks(start: int, out: int, k: int, bias: str, name: str, bias_block: BlockSpec) -> list[BlockSpec]:
    """K-FAC blocks of an affine map with weight (out, k) then bias (out,) from ``start`` in theta:
    "joint", one block over [W | b]; "separate", W's block over A[:k, :k] and ``bias_block``
    (its name and positions are filled in here)."""
    bias = check_choice(bias, "bias", BIAS_MODES)
    w_index = start + np.arange(out * k).reshape(out, k)
    b_index = start + out * k + np.arange(out)
    if bias == "joint":
        return [BlockSpec(name, np.concatenate([w_index, b_index[:, None]], axis=1).ravel(), slice(None))]
    return [BlockSpec(f"{name} weight", w_index.ravel(), slice(0, k)), bias_block._replace(name=f"{name} bias", positions=b_index)]


def per_sample(xp: Any, dy: Any, cached: Any) -> tuple[Any, Any]:
    """(dy, cached) shaped to broadcast: dy's ``reps * N`` rows against the N cached rows."""
    n = cached.shape[0]
    if dy.shape[0] == n:
        return dy, cached
    return xp.reshape(dy, (dy.shape[0] // n, *cached.shape)), cached


class ParameterFree:
    """Defaults for layers without parameters (activations, pooling, reshaping)."""

    name = "parameter-free"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def param_shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return ()

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return input_shape

    def init(self, params, rng) -> None:
        return None

    def param_gradients(self, params, cache, dy, backend) -> list:
        return []

    def per_sample_rows(self, cache, dy, out, start, backend) -> None:
        return None

    def kfac_factors(self, cache, dy, n_samples, backend):
        raise TypeError(f"{self.name} has no parameters and no K-FAC factors")

    def kfac_blocks(self, start, bias, name) -> list[BlockSpec]:
        return []


class ReLU(ParameterFree):
    """y = max(x, 0); y' = 1[x > 0] (the cache is the mask)."""

    name = "relu"

    def forward(self, params, x, backend, rng):
        return backend.xp.maximum(x, 0.0), x > 0

    def backward(self, params, mask, dy, backend):
        xp = backend.xp
        dy_b, mask_b = per_sample(xp, dy, mask)
        return xp.reshape(dy_b * xp.astype(mask_b, dy.dtype), dy.shape)

    def jvp(self, params, mask, dparams, dx, backend):
        return None if dx is None else dx * backend.xp.astype(mask, dx.dtype)


class Tanh(ParameterFree):
    """y = tanh(x); y' = 1 - y^2 (the cache is y)."""

    name = "tanh"

    def forward(self, params, x, backend, rng):
        y = backend.xp.tanh(x)
        return y, y

    def backward(self, params, y, dy, backend):
        xp = backend.xp
        dy_b, y_b = per_sample(xp, dy, y)
        return xp.reshape(dy_b * (1.0 - y_b * y_b), dy.shape)

    def jvp(self, params, y, dparams, dx, backend):
        return None if dx is None else dx * (1.0 - y * y)


class Dense:
    """Affine layer y = x W^T + b, W (out, in) row-major then b (out,): PyTorch ``nn.Linear``.

    K-FAC (docs/theory.md §5.1): A = mean_n abar abar^T with abar = [x; 1] ((in+1) x (in+1)),
    G = (1/N) sum_r delta_r delta_r^T over every cotangent row r (out x out).
    ``init``: "he-normal" W ~ N(0, 2 / in) (before a ReLU), "lecun-normal" W ~ N(0, 1 / in), b = 0;
    "torch" (PyTorch's default: kaiming-uniform with a = sqrt(5)) W ~ U(+-1/sqrt(in)), b ~ U(+-1/sqrt(in)).
    """

    def __init__(self, in_features: int, out_features: int, init: str = "lecun-normal"):
        self.in_features = check_positive_int(in_features, "in_features")
        self.out_features = check_positive_int(out_features, "out_features")
        self.init_scheme = check_choice(init, "init", DENSE_INITS)
        self.name = f"dense {self.in_features}->{self.out_features}"

    def __repr__(self) -> str:
        return f"Dense({self.in_features}, {self.out_features}, init={self.init_scheme!r})"

    def param_shapes(self):
        return (("weight", (self.out_features, self.in_features)), ("bias", (self.out_features,)))

    def output_shape(self, input_shape):
        if input_shape != (self.in_features,):
            raise ValueError(f"{self.name} expects inputs of shape ({self.in_features},), got {input_shape}")
        return (self.out_features,)

    def init(self, params, rng):
        W, b = params
        if self.init_scheme == "torch":
            bound = 1.0 / np.sqrt(self.in_features)
            W[...] = rng.uniform(-bound, bound, W.shape)
            b[...] = rng.uniform(-bound, bound, b.shape)
            return
        gain2 = 2.0 if self.init_scheme == "he-normal" else 1.0
        W[...] = rng.standard_normal(W.shape) * np.sqrt(gain2 / W.shape[1])
        b[...] = 0.0

    def forward(self, params, x, backend, rng):
        W, b = params
        y = backend.matmul(x, W.T)
        y += b
        return y, x

    def backward(self, params, x, dy, backend):
        return backend.matmul(dy, params[0])

    def param_gradients(self, params, x, dy, backend):
        return [backend.matmul(dy.T, x), backend.xp.sum(dy, axis=0)]

    def jvp(self, params, x, dparams, dx, backend):
        dW, db = dparams
        dy = backend.matmul(x, dW.T) + db
        if dx is not None:
            dy += backend.matmul(dx, params[0].T)
        return dy

    def per_sample_rows(self, x, dy, out, start, backend):
        backend.per_sample_rows(dy, x, out, start)

    def kfac_factors(self, x, dy, n_samples, backend):
        A = homogeneous_moment(x, backend)
        A /= n_samples
        G = backend.matmul(dy.T, dy) / n_samples
        return A, G

    def kfac_blocks(self, start, bias, name):
        n_in = self.in_features
        return affine_blocks(start, self.out_features, n_in, bias, name, BlockSpec("bias", np.empty(0, dtype=int), slice(n_in, n_in + 1)))
