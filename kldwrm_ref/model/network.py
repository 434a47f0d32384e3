"""A network: a sequence of layers ending in logits, with softmax cross-entropy (docs/theory.md §1).

Parameters live in one flat vector ``theta``: layer after layer, each layer's tensors in the
order of its :meth:`~kldwrm_ref.model.layers.Layer.param_shapes`, each row-major (so a PyTorch
``state_dict`` of the same architecture maps to theta by concatenation).  Every method is a pure
function of ``theta``; the object holds the architecture, the float dtype and the backend.

theta, the batch, the caches, cotangents and gradients are arrays of the backend's namespace
(``backend.xp``: NumPy, CuPy, or any array-API library), touched only through it.  Host data
(NumPy inputs and labels) is checked and moved there on entry; :meth:`Network.init` draws on the
host and moves theta there; dropout masks are drawn on the host from :meth:`Network.training_rng`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from kldwrm_ref.arrays import NUMPY_NAMESPACE, array_namespace, host_floats, is_numpy_namespace, namespace_name
from kldwrm_ref.backends import Backend, get_backend
from kldwrm_ref.model import losses
from kldwrm_ref.model.layers import BlockSpec, Layer, PreparingLayer
from kldwrm_ref.validation import check_positive_int


class ParamTensor(NamedTuple):
    """One parameter tensor's place in theta."""

    layer: int
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


class PreparedInput(NamedTuple):
    """A batch checked and cast once, with its first layer's input-only work done (a Conv2d's
    patches, where the layer keeps them: on a GPU or below ``PATCH_CACHE_BYTES``), for passes that run many times on the same batch (:meth:`Network.prepare`)."""

    X: Any  # (N, *input_shape) in the backend's namespace and the network's dtype
    first: Any  # the first layer's ``prepare`` result, or None


class NetworkCache(NamedTuple):
    """A forward pass: each layer's backward cache (only what its backward pass reads, so an
    activation no later pass needs is freed at once) and the logits."""

    caches: list[Any]
    logits: Any


class Network:
    """``layers`` applied in order to inputs of per-sample shape ``input_shape``; the last layer's
    output (N, C) are the logits of a softmax classifier over C >= 2 classes."""

    def __init__(self, layers: Sequence[Layer], input_shape: Sequence[int], dtype=np.float64, backend: str | Backend = "numpy"):
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("layers must hold at least one layer")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise ValueError(f"layers[{i}] ({layer!r}) does not implement the Layer protocol")
        self.input_shape = tuple(check_positive_int(int(d), "input_shape entries") for d in input_shape)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        self.backend = get_backend(backend)
        self._host_namespace = is_numpy_namespace(self.backend.xp)
        shape = self.input_shape
        self.shapes = [shape]
        for layer in self.layers:
            shape = layer.output_shape(shape)
            self.shapes.append(shape)
        if len(shape) != 1 or shape[0] < 2:
            raise ValueError(f"the last layer must output (C,) logits with C >= 2 classes, got {shape}")
        tensors, offset = [], 0
        for i, layer in enumerate(self.layers):
            for name, tensor_shape in layer.param_shapes():
                tensors.append(ParamTensor(i, name, tuple(tensor_shape), offset))
                offset += tensors[-1].size
        self.tensors = tensors
        self.n_params = offset

    # ------------------------------------------------------------------ layout
    @property
    def n_classes(self) -> int:
        return self.shapes[-1][0]

    @property
    def stochastic(self) -> bool:
        """Whether a training forward pass draws randomness (dropout masks)."""
        return any(getattr(layer, "stochastic", False) for layer in self.layers)

    def training_rng(self, key: Sequence[int]) -> np.random.Generator | None:
        """A fresh Generator seeded by ``key`` for a training forward pass (None for a deterministic
        network, so evaluation and training coincide): every pass of one step that uses the same key
        draws the same dropout masks."""
        return np.random.default_rng(list(key)) if self.stochastic else None

    @property
    def parametrised(self) -> list[int]:
        """Indices of the layers that have parameters."""
        return sorted({t.layer for t in self.tensors})

    def layer_offset(self, i: int) -> int:
        """Where layer i's parameters start in theta."""
        return next(t.offset for t in self.tensors if t.layer == i)

    def __repr__(self) -> str:
        return f"Network({self.layers!r}, input_shape={self.input_shape}, dtype={self.dtype.name}, backend={self.backend.name!r})"

    def with_backend(self, backend: str | Backend) -> Network:
        """The same architecture computing with ``backend``."""
        return Network(self.layers, self.input_shape, self.dtype, backend)

    def params(self, theta: Any) -> list[list[Any]]:
        """Per layer, its parameter tensors: slices of ``theta`` reshaped (to be read; on NumPy
        they are views into theta)."""
        return self._slices(self.check_theta(theta), self.backend.xp)

    def _slices(self, theta: Any, xp: Any) -> list[list[Any]]:
        slices: list[list[Any]] = [[] for _ in self.layers]
        for t in self.tensors:
            slices[t.layer].append(xp.reshape(theta[t.offset : t.offset + t.size], t.shape))
        return slices

    def init(self, seed: int = 0) -> Any:
        """theta with every layer's initialisation, drawn on the host layer by layer from
        ``default_rng(seed)`` (the same theta on every backend), in the backend's namespace."""
        rng = np.random.default_rng(seed)
        theta = np.zeros(self.n_params, dtype=self.dtype)
        for layer, params in zip(self.layers, self._slices(theta, NUMPY_NAMESPACE)):
            layer.init(params, rng)
        return self.backend.asarray(theta)

    def kfac_blocks(self, bias: str) -> list[tuple[int, BlockSpec]]:
        """(index among the parametrised layers, block) for every K-FAC block, in theta order."""
        blocks = []
        for p, i in enumerate(self.parametrised):
            blocks += [(p, spec) for spec in self.layers[i].kfac_blocks(self.layer_offset(i), bias, f"layer {p}")]
        return blocks

    # ------------------------------------------------------------------ checks
    def _in_namespace(self, x: Any) -> bool:
        """Whether ``x`` is an array of the backend's namespace."""
        if self._host_namespace:
            return isinstance(x, np.ndarray)
        try:
            return array_namespace(x) is self.backend.xp
        except TypeError:
            return False

    def check_theta(self, theta: Any) -> Any:
        if not self._in_namespace(theta):
            raise ValueError(f"theta must be an array of the backend's namespace ({namespace_name(self.backend.xp)}) for {self!r}, got {type(theta).__name__}")
        if theta.ndim != 1 or theta.shape[0] != self.n_params:
            raise ValueError(f"theta must be a 1-D array of length {self.n_params} for {self!r}, got shape {tuple(theta.shape)}")
        return theta

    def check_X(self, X: Any, *, values: bool = True) -> Any:
        """X (host data or an array of the namespace) as (N, *input_shape) in the network's dtype
        and the backend's namespace; flat rows are reshaped.  ``values=False`` skips the finiteness
        check (a host read on a device), for callers that made it already."""
        xp = self.backend.xp
        X = self.backend.asarray(X, self.dtype)
        flat = int(np.prod(self.input_shape))
        if X.ndim == 2 and X.shape[1] == flat and len(self.input_shape) > 1:
            X = xp.reshape(X, (X.shape[0], *self.input_shape))
        if X.shape[1:] != self.input_shape:
            raise ValueError(f"X must have shape (N, {', '.join(map(str, self.input_shape))}), got {tuple(X.shape)}")
        if X.shape[0] == 0:
            raise ValueError("X must hold at least one row")
        if values:
            self._check_finite("X", X)
        return X

    def _check_finite(self, name: str, x: Any) -> None:
        xp = self.backend.xp
        finite = xp.isfinite(x)
        if not bool(xp.all(finite)):
            raise ValueError(f"{name} must be finite; it has {x.size - int(xp.count_nonzero(finite))} non-finite entries")

    def check_labels(self, y: Any, n_rows: int, *, values: bool = True) -> Any:
        """Integer class labels in [0, C), one per row, as int64 in the backend's namespace: host
        labels are checked on the host, labels of the namespace in it (``values=False`` skips their
        range, a host read on a device, for callers that made it already)."""
        if isinstance(y, np.ndarray) or not self._in_namespace(y):
            y = np.asarray(y)
            if y.shape != (n_rows,):
                raise ValueError(f"y must have shape ({n_rows},) to match X, got {y.shape}")
            if not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
            if y.size:
                self._check_label_range(int(y.min()), int(y.max()))
            return self.backend.asarray(y, np.int64)
        xp = self.backend.xp
        if tuple(y.shape) != (n_rows,):
            raise ValueError(f"y must have shape ({n_rows},) to match X, got {tuple(y.shape)}")
        if not xp.isdtype(y.dtype, "integral"):
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        if n_rows and values:
            self._check_label_range(*(int(v) for v in host_floats(xp, xp.min(y), xp.max(y))))
        return xp.astype(y, xp.int64)

    def _check_label_range(self, low: int, high: int) -> None:
        if low < 0 or high >= self.n_classes:
            raise ValueError(f"y must hold labels in [0, {self.n_classes}), got range [{low}, {high}]")

    def checked_batch(self, theta: Any, X: Any, y: Any) -> tuple[Any, Any, bool]:
        """(X, y, whether X is finite) for a training step: X and y shaped, cast and moved as
        :meth:`check_X` and :meth:`check_labels` do, theta finite and the labels in range, with
        every check of values read to the host in one transfer (on a GPU each read is a
        synchronisation).  The caller decides what a non-finite batch is (a step: a divergence)."""
        xp = self.backend.xp
        self.check_theta(theta)
        X = self.check_X(X, values=False)
        host_labels = isinstance(y, np.ndarray) or not self._in_namespace(y)
        y = self.check_labels(y, X.shape[0], values=False)  # host labels are checked in full here
        wanted = [xp.all(xp.isfinite(X)), xp.all(xp.isfinite(theta))]
        if not host_labels:
            wanted += [xp.min(y), xp.max(y)]
        read = host_floats(xp, *wanted)
        if not read[0]:  # a non-finite batch is reported before theta's and the labels' values
            return X, y, False
        if not read[1]:
            self._check_finite("theta", theta)
        if not host_labels:
            self._check_label_range(int(read[2]), int(read[3]))
        return X, y, bool(read[0])

    # ------------------------------------------------------------------ passes
    def prepare(self, X: Any, *, validate: bool = True) -> PreparedInput:
        """X checked, cast and moved to the backend's namespace, with the first layer's input-only
        work done once (a Conv2d's im2col where its patches are kept): QE's inner solve runs a dozen passes on the same batch.
        ``validate=False`` skips the checks of values (:meth:`checked_batch` made them)."""
        x = self.check_X(X, values=validate)
        first = self.layers[0]
        return PreparedInput(x, first.prepare(x, self.backend) if isinstance(first, PreparingLayer) else None)

    def forward(self, theta: Any, X: Any, rng: np.random.Generator | None = None, *, validate: bool = True) -> NetworkCache:
        """Forward pass keeping each layer's backward cache (``rng``: training-mode
        randomness such as dropout masks; None evaluates); ``X`` may be :meth:`prepare`'s result.
        ``validate=False`` skips the checks of theta's and X's values (each a host read on a
        device), for an optimiser's passes on a batch it checked once."""
        prepared = X if isinstance(X, PreparedInput) else self.prepare(X, validate=validate)
        params = self.params(theta)
        if validate:
            self._check_finite("theta", theta)
        x = prepared.X
        caches = []
        for i, (layer, layer_params) in enumerate(zip(self.layers, params)):
            if i == 0 and prepared.first is not None and isinstance(layer, PreparingLayer):
                x, cache = layer.forward_prepared(layer_params, prepared.first, self.backend)
            else:
                x, cache = layer.forward(layer_params, x, self.backend, rng)
            caches.append(cache)
        return NetworkCache(caches, x)

    def logits(self, theta: Any, X: Any) -> Any:
        return self.forward(theta, X).logits

    def backward(self, theta: Any, cache: NetworkCache, dlogits: Any) -> list[Any]:
        """Backpropagate cotangents of the logits ((reps * N, C): several per sample allowed) to
        every layer's output; entry i is d/d(output of layer i).  No forward pass is re-run."""
        n = cache.logits.shape[0]
        if dlogits.ndim != 2 or dlogits.shape[1] != cache.logits.shape[1] or dlogits.shape[0] % n:
            raise ValueError(f"dlogits must have shape (reps * {n}, {cache.logits.shape[1]}), got {dlogits.shape}")
        params = self.params(theta)
        cotangents: list[Any] = [dlogits] * len(self.layers)
        dy = dlogits
        for i in range(len(self.layers) - 1, -1, -1):
            cotangents[i] = dy
            if i > 0:
                dy = self.layers[i].backward(params[i], cache.caches[i], dy, self.backend)
        return cotangents

    def gradient(self, theta: Any, cache: NetworkCache, cotangents: list[Any]) -> Any:
        """Sum over cotangent rows of the parameter gradient, in theta layout: the layers'
        tensor gradients flattened and concatenated."""
        xp = self.backend.xp
        params = self.params(theta)
        pieces = [xp.reshape(g, (-1,)) for i in self.parametrised for g in self.layers[i].param_gradients(params[i], cache.caches[i], cotangents[i], self.backend)]
        return xp.concat(pieces) if pieces else xp.zeros((0,), dtype=cache.logits.dtype)

    def vjp(self, theta: Any, cache: NetworkCache, dlogits: Any) -> Any:
        """sum_i J(x_i)^T dlogits[i], J = d logits / d theta (the backward pass)."""
        return self.gradient(theta, cache, self.backward(theta, cache, dlogits))

    def jvp(self, theta: Any, cache: NetworkCache, v: Any) -> Any:
        """Forward-mode J(x_i) v for every row of the cached batch: (N, C)."""
        params = self.params(theta)
        tangents = self.params(self.backend.asarray(v, self.dtype))
        dx = None
        for layer, p, dp, c in zip(self.layers, params, tangents, cache.caches):
            dx = layer.jvp(p, c, dp, dx, self.backend)
        if dx is None:
            return self.backend.xp.zeros_like(cache.logits)
        return dx

    def per_sample_gradients(self, cache: NetworkCache, cotangents: list[Any]) -> Any:
        """Row r = the parameter gradient of cotangent row r alone, (R, n), in theta layout."""
        rows = cotangents[-1].shape[0]
        out = self.backend.xp.empty((rows, self.n_params), dtype=cache.logits.dtype)
        for i in self.parametrised:
            self.layers[i].per_sample_rows(cache.caches[i], cotangents[i], out, self.layer_offset(i), self.backend)
        return out

    # ------------------------------------------------------------------ loss
    def training_pass(self, theta: Any, X: Any, y: Any, rng: np.random.Generator | None = None, *, validate: bool = True):
        """(mean softmax cross-entropy as a 0-d array of the namespace, its gradient, the forward
        cache): :meth:`loss_grad_cache` without reading the loss to the host; ``validate=False``
        as in :meth:`forward` (the labels' range is not checked either)."""
        cache = self.forward(theta, X, rng, validate=validate)
        y = self.check_labels(y, cache.logits.shape[0], values=validate)
        per_sample_loss, dlogits = losses.cross_entropy(cache.logits, y, self.backend)
        grad = self.vjp(theta, cache, dlogits) / y.shape[0]
        return self.backend.xp.mean(per_sample_loss), grad, cache

    def loss_grad_cache(self, theta: Any, X: Any, y: Any, rng: np.random.Generator | None = None):
        """Mean softmax cross-entropy, its gradient and the forward cache (for curvature reuse)."""
        loss, grad, cache = self.training_pass(theta, X, y, rng)
        return float(loss), grad, cache

    def loss_and_grad(self, theta: Any, X: Any, y: Any) -> tuple[float, Any]:
        """Mean softmax cross-entropy L = mean_i -log p(y_i|x_i) and its gradient."""
        loss, grad, _ = self.loss_grad_cache(theta, X, y)
        return loss, grad

    def loss(self, theta: Any, X: Any, y: Any) -> float:
        logits = self.logits(theta, X)
        y = self.check_labels(y, logits.shape[0])
        return float(self.backend.xp.mean(losses.cross_entropy(logits, y, self.backend)[0]))

    def predict(self, theta: Any, X: Any) -> Any:
        """The class of largest logit per row (in the backend's namespace)."""
        return self.backend.xp.argmax(self.logits(theta, X), axis=1)

    def accuracy(self, theta: Any, X: Any, y: Any) -> float:
        xp = self.backend.xp
        X = self.check_X(X)
        y = self.check_labels(y, X.shape[0])
        return int(xp.count_nonzero(self.predict(theta, X) == y)) / X.shape[0]
