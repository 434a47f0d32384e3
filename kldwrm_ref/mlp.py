"""Framework-free fully connected softmax classifier with hand-written backprop (THEORY.md 1).

Parameter layout (one flat vector ``theta``): layer by layer, the weight W (out, in) row-major,
then the bias b (out,) - PyTorch ``nn.Linear`` order.  Layer l computes
u_l = a_l W_l^T + b_l, a_{l+1} = act(u_l) (no activation after the last layer: u_L = logits).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from kldwrm_ref.backend import get_backend
from kldwrm_ref.validation import check_choice, check_finite

ACTIVATIONS = ("relu", "tanh")


class ForwardCache(NamedTuple):
    """What backprop and K-FAC need from a forward pass.

    inputs[l]: the input activations a_l of layer l, (N, in_l); inputs[0] is X.
    preacts[l]: the pre-activations u_l of layer l, (N, out_l); preacts[-1] are the logits.
    """

    inputs: list[np.ndarray]
    preacts: list[np.ndarray]

    @property
    def logits(self) -> np.ndarray:
        return self.preacts[-1]


class MLP:
    """Softmax MLP ``sizes = [in, hidden..., C]`` with ReLU or tanh hidden activations.

    Every method is a pure function of ``theta``; the object only holds the architecture.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu", dtype=np.float64, backend="numpy"):
        sizes = list(sizes)
        if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in sizes):
            raise ValueError(f"sizes must be a list of at least two positive integers [in, ..., C], got {sizes!r}")
        if sizes[-1] < 2:
            raise ValueError(f"sizes[-1] (number of classes C) must be >= 2, got {sizes[-1]}")
        self.sizes = [int(s) for s in sizes]
        self.activation = check_choice(activation, "activation", ACTIVATIONS)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        self.layer_shapes = [(o, i) for i, o in zip(self.sizes[:-1], self.sizes[1:])]
        offsets = [0]
        for out, inp in self.layer_shapes:
            offsets.append(offsets[-1] + out * inp + out)
        self.offsets = offsets
        self.n_params = offsets[-1]
        self.backend = get_backend(backend)

    def with_backend(self, backend) -> "MLP":
        """The same architecture computing with ``backend`` (products and the loss kernel)."""
        return MLP(self.sizes, self.activation, self.dtype, backend)

    # ------------------------------------------------------------------ layout
    @property
    def n_layers(self) -> int:
        return len(self.layer_shapes)

    @property
    def n_classes(self) -> int:
        return self.sizes[-1]

    def __repr__(self) -> str:
        return f"MLP(sizes={self.sizes}, activation={self.activation!r}, dtype={self.dtype.name}, backend={self.backend.name!r})"

    def init(self, seed: int = 0) -> np.ndarray:
        """Scaled Gaussian initialisation: W ~ N(0, gain^2 / fan_in), b = 0.

        gain^2 = 2 for ReLU (He et al. 2015), 1 for tanh (LeCun); the output layer uses gain 1.
        """
        rng = np.random.default_rng(seed)
        theta = np.zeros(self.n_params, dtype=self.dtype)
        for l, (W, _) in enumerate(self.unflatten(theta)):
            gain2 = 2.0 if (self.activation == "relu" and l < self.n_layers - 1) else 1.0
            W[...] = rng.standard_normal(W.shape) * np.sqrt(gain2 / W.shape[1])
        return theta

    def unflatten(self, theta: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per-layer (W, b) *views* into ``theta`` (writing to them writes theta)."""
        theta = self.check_theta(theta)
        views = []
        for l, (out, inp) in enumerate(self.layer_shapes):
            start = self.offsets[l]
            W = theta[start : start + out * inp].reshape(out, inp)
            b = theta[start + out * inp : start + out * inp + out]
            views.append((W, b))
        return views

    def flatten(self, layers: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Inverse of :meth:`unflatten`: concatenate per-layer (W, b) into one theta."""
        if len(layers) != self.n_layers:
            raise ValueError(f"layers must hold {self.n_layers} (W, b) pairs, got {len(layers)}")
        parts = []
        for l, ((W, b), (out, inp)) in enumerate(zip(layers, self.layer_shapes)):
            if np.shape(W) != (out, inp) or np.shape(b) != (out,):
                raise ValueError(f"layer {l}: expected W {(out, inp)} and b {(out,)}, got {np.shape(W)} and {np.shape(b)}")
            parts += [np.ravel(W), np.ravel(b)]
        return np.concatenate(parts).astype(self.dtype, copy=False)

    # ------------------------------------------------------------------ checks
    def check_theta(self, theta: np.ndarray) -> np.ndarray:
        if not isinstance(theta, np.ndarray) or theta.ndim != 1 or theta.shape[0] != self.n_params:
            raise ValueError(f"theta must be a 1-D array of length {self.n_params} for {self!r}, got shape {np.shape(theta)}")
        return theta

    def check_X(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.sizes[0]:
            raise ValueError(f"X must have shape (N, {self.sizes[0]}), got {X.shape}")
        if X.shape[0] == 0:
            raise ValueError("X must hold at least one row")
        check_finite("X", X)
        return X

    def check_labels(self, y: np.ndarray, n_rows: int) -> np.ndarray:
        y = np.asarray(y)
        if y.shape != (n_rows,):
            raise ValueError(f"y must have shape ({n_rows},) to match X, got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        if y.size and (y.min() < 0 or y.max() >= self.n_classes):
            raise ValueError(f"y must hold labels in [0, {self.n_classes}), got range [{y.min()}, {y.max()}]")
        return y

    # ------------------------------------------------------------------ forward
    def forward(self, theta: np.ndarray, X: np.ndarray) -> ForwardCache:
        """Forward pass keeping each layer's input activations and pre-activations."""
        X = self.check_X(X)
        layers = self.unflatten(theta)
        check_finite("theta", theta)
        a = X.astype(self.dtype, copy=False)
        inputs, preacts = [], []
        for l, (W, b) in enumerate(layers):
            inputs.append(a)
            u = self.backend.matmul(a, W.T)
            u += b
            preacts.append(u)
            if l < self.n_layers - 1:
                a = np.maximum(u, 0.0) if self.activation == "relu" else np.tanh(u)
        return ForwardCache(inputs, preacts)

    def logits(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        return self.forward(theta, X).logits

    def _act_derivative(self, u: np.ndarray, a_next: np.ndarray) -> np.ndarray:
        """act'(u_l), from u_l (ReLU) or from a_{l+1} = tanh(u_l) (tanh)."""
        if self.activation == "relu":
            return (u > 0).astype(u.dtype)
        return 1.0 - a_next * a_next

    # ------------------------------------------------------------------ backward
    def backward_deltas(self, theta: np.ndarray, cache: ForwardCache, dlogits: np.ndarray) -> list[np.ndarray]:
        """Backprop any per-sample cotangent d/d(logits) (N, C) to every layer's d/du_l.

        Returns one (N, out_l) array per layer; row i is J_{u_l}(x_i)^T-propagated dlogits[i].
        No forward pass is re-run, so sampled or expected labels cost one backward each.
        """
        layers = self.unflatten(theta)
        if dlogits.shape != cache.logits.shape:
            raise ValueError(f"dlogits must have shape {cache.logits.shape}, got {dlogits.shape}")
        deltas = [None] * self.n_layers
        delta = dlogits
        for l in range(self.n_layers - 1, -1, -1):
            deltas[l] = delta
            if l > 0:
                W = layers[l][0]
                delta = self.backend.matmul(delta, W) * self._act_derivative(cache.preacts[l - 1], cache.inputs[l])
        return deltas

    def gradient_from_deltas(self, cache: ForwardCache, deltas: list[np.ndarray]) -> np.ndarray:
        """sum over samples of the parameter gradient: dW_l = delta_l^T a_l, db_l = sum delta_l."""
        grad = np.empty(self.n_params, dtype=self.dtype)
        for l, (out, inp) in enumerate(self.layer_shapes):
            start = self.offsets[l]
            grad[start : start + out * inp] = self.backend.matmul(deltas[l].T, cache.inputs[l]).ravel()
            grad[start + out * inp : start + out * inp + out] = deltas[l].sum(axis=0)
        return grad

    def vjp(self, theta: np.ndarray, cache: ForwardCache, dlogits: np.ndarray) -> np.ndarray:
        """sum_i J(x_i)^T dlogits[i], J = d logits / d theta (the backward pass)."""
        return self.gradient_from_deltas(cache, self.backward_deltas(theta, cache, dlogits))

    def per_sample_gradients(self, cache: ForwardCache, deltas: list[np.ndarray]) -> np.ndarray:
        """Row r = the parameter gradient for cotangent row r alone (R, n), in theta layout."""
        rows = deltas[0].shape[0]
        out_arr = np.empty((rows, self.n_params), dtype=self.dtype)
        for l in range(self.n_layers):
            self.backend.per_sample_rows(deltas[l], cache.inputs[l], out_arr, self.offsets[l])
        return out_arr

    def jvp(self, theta: np.ndarray, cache: ForwardCache, v: np.ndarray) -> np.ndarray:
        """Forward-mode J(x_i) v for every row of the cached batch: (N, C)."""
        layers = self.unflatten(theta)
        dlayers = self.unflatten(self.check_theta(np.asarray(v, dtype=self.dtype)))
        da = np.zeros_like(cache.inputs[0])
        du = None
        for l, ((W, _), (dW, db)) in enumerate(zip(layers, dlayers)):
            du = self.backend.matmul(cache.inputs[l], dW.T) + db
            if l > 0:
                du += self.backend.matmul(da, W.T)
            if l < self.n_layers - 1:
                da = du * self._act_derivative(cache.preacts[l], cache.inputs[l + 1])
        return du

    # ------------------------------------------------------------------ loss
    def loss_and_grad(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean softmax cross-entropy L = mean_i -log p(y_i|x_i) (log-sum-exp) and its gradient."""
        loss, grad, _ = self.loss_grad_cache(theta, X, y)
        return loss, grad

    def loss_grad_cache(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray):
        """As :meth:`loss_and_grad`, also returning the forward cache for curvature reuse."""
        cache = self.forward(theta, X)
        y = self.check_labels(y, cache.logits.shape[0])
        losses, dlogits = self.backend.softmax_cross_entropy(cache.logits, y)
        n = y.shape[0]
        grad = self.vjp(theta, cache, dlogits) / n
        return float(losses.mean()), grad, cache

    def loss(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        logits = self.logits(theta, X)
        y = self.check_labels(y, logits.shape[0])
        return float(self.backend.softmax_cross_entropy(logits, y)[0].mean())

    def predict(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(theta, X), axis=1)

    def accuracy(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        X = self.check_X(X)
        y = self.check_labels(y, X.shape[0])
        return float(np.mean(self.predict(theta, X) == y))
