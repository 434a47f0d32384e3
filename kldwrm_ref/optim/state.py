"""What an optimiser is and what it carries between steps (optax style: a pair of pure functions
``init`` and ``step`` over an immutable state)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from kldwrm_ref.arrays import NUMPY_NAMESPACE, array_namespace, host_arrays, is_numpy_namespace
from kldwrm_ref.curvature.averaging import EAState
from kldwrm_ref.model.network import Network
from kldwrm_ref.optim.hyper import Hyper


class DivergenceError(FloatingPointError):
    """A training step produced a non-finite quantity; ``step`` and ``quantity`` say which."""

    def __init__(self, step: int, quantity: str, detail: str = "is not finite"):
        super().__init__(f"diverged at step {step}: {quantity} {detail}")
        self.step, self.quantity = step, quantity


def _leaves(value: Any) -> list:
    if isinstance(value, tuple):
        return [leaf for item in value for leaf in _leaves(item)]
    return [] if value is None else [value]


class StepReadout:
    """What a step needs to know on the host, read in one transfer: the finiteness of its
    quantities and the values its ``info`` reports.  On a GPU each read is a synchronisation, so
    a step queues them here and reads them once, at its end; a DivergenceError then names the
    first non-finite quantity in step order, as an immediate check would.  On the host (NumPy)
    checks are not deferred: each is made when queued, where it costs nothing and stops the step
    before non-finite values reach the next phase."""

    def __init__(self, step: int, xp: Any):
        self.step, self.xp = step, xp
        self.deferred = not is_numpy_namespace(xp)
        self._checks: list[tuple[str, str, Any]] = []  # (quantity, detail, 0-d bool array)
        self._values: dict[str, Any] = {}

    def finite(self, quantity: str, value: Any, detail: str = "is not finite") -> None:
        """Require every entry of ``value`` (numbers, arrays or tuples of them) to be finite."""
        leaves = _leaves(value)
        if not all(math.isfinite(n) for n in leaves if isinstance(n, numbers.Real)):
            self.read_checks()  # an earlier quantity's failure is named first
            raise DivergenceError(self.step, quantity, detail)
        arrays = [leaf for leaf in leaves if not isinstance(leaf, numbers.Real)]
        if arrays:
            xp = self.xp
            verdicts = [xp.all(xp.isfinite(a)) for a in arrays]
            self._checks.append((quantity, detail, verdicts[0] if len(verdicts) == 1 else xp.all(xp.stack(verdicts))))
        if not self.deferred:
            self.read_checks()

    def value(self, name: str, array: Any) -> None:
        """Read ``array`` (any shape, or a number) with the checks: :meth:`read` returns it as float64."""
        self._values[name] = array

    def read_checks(self) -> None:
        """Read the queued checks now (before a phase that must not see a non-finite value, such as a
        refresh's eigendecomposition) and raise on the first that fails."""
        self._raise_first(host_arrays(self.xp, *(v for _, _, v in self._checks)) if self._checks else [])

    def read(self) -> dict[str, np.ndarray]:
        """Everything queued, in one transfer: raises on the first failed check, else returns the values."""
        names, n_checks = list(self._values), len(self._checks)
        read = host_arrays(self.xp, *(v for _, _, v in self._checks), *self._values.values()) if (n_checks or names) else []
        self._raise_first(read[:n_checks])
        self._values = {}
        return dict(zip(names, read[n_checks:]))

    def _raise_first(self, verdicts: list[np.ndarray]) -> None:
        for (quantity, detail, _), ok in zip(self._checks, verdicts):
            if not ok:
                raise DivergenceError(self.step, quantity, detail)
        self._checks = []


def finite_or_raise(step: int, quantity: str, value: Any) -> None:
    """Raise :class:`DivergenceError` unless every entry of ``value`` (numbers, arrays or tuples of
    them) is finite; the arrays' verdicts are read to the host in one transfer."""
    arrays = [leaf for leaf in _leaves(value) if not isinstance(leaf, numbers.Real)]
    readout = StepReadout(step, array_namespace(*arrays) if arrays else NUMPY_NAMESPACE)
    readout.finite(quantity, value)
    readout.read_checks()


def step_size_or_raise(step_size, k: int) -> float:
    """alpha_k, or :class:`DivergenceError` when a schedule returns a non-finite or non-positive value."""
    from_schedule = step_size(k) if callable(step_size) else step_size
    if not isinstance(from_schedule, numbers.Real) or not math.isfinite(from_schedule) or from_schedule <= 0:
        raise DivergenceError(k, "step size", f"is {from_schedule!r}, not a finite number > 0")
    return float(from_schedule)


def checked_batch(net: Network, k: int, theta: Any, X: Any, y: Any) -> tuple[Any, Any]:
    """The step's batch, its values checked in one host read (:meth:`Network.checked_batch`): a
    batch with a NaN or an infinity ends the run as diverged at step k (quantity "batch")."""
    X, y, finite = net.checked_batch(theta, X, y)
    if not finite:
        raise DivergenceError(k, "batch", "holds a NaN or an infinity")
    return X, y


class Previous(NamedTuple):
    """What the wake correction of step k needs from step k-1 (docs/theory.md §4.2, §4.3, §7)."""

    alpha: float  # alpha_{k-1}
    gradient: np.ndarray  # g_{k-1}
    corrected: np.ndarray  # ghat_{k-1}, without weight decay
    direction: np.ndarray  # V_{k-1}: the clipped preconditioned direction, s_Q = -alpha V
    model_gradient: np.ndarray | None  # grad h_{k-1}(theta_k) = g_{k-1} + B_{k-1} s_{k-1} (Q, QE, exact)


class OptState(NamedTuple):
    """Optimiser state (immutable). Fields a method does not use stay None."""

    step: int
    ea: EAState | None = None
    inverse: Any = None  # cached (Mbar + eta I)^{-1}, or (key, (Mbar + eta I + alpha B)^{-1}) for Q / QE
    current: tuple | None = None  # the latest current curvature estimate (Q, QE)
    previous: Previous | None = None
    wake: tuple = ()  # QE: the last m iterates, oldest first
    velocity: np.ndarray | None = None  # SGD momentum


class StepTrace(NamedTuple):
    """What one curvature step computed, as references (nothing is copied): ``info["trace"]``,
    in the order of the phases (docs/theory.md §4, §6; docs/trajectory-format.md)."""

    alpha: float  # alpha_k
    masks: tuple[int, ...]  # the seed of the step's dropout masks: net.training_rng(masks)
    labels: tuple[int, ...]  # the seed of the Monte-Carlo labels' uniforms: default_rng(labels)
    g: np.ndarray  # g_k
    current: tuple | None  # M_k on a refresh step, else None
    averaged: tuple  # Mbar_k
    solver: Any  # the damped inverse P^{-1} applied to d
    damping: float  # eta' = eta + wd, the damping every solve adds
    ghat: np.ndarray  # ghat_k, without weight decay
    d: np.ndarray  # ghat_k + wd theta_k, the vector preconditioned
    unclipped: np.ndarray  # P^{-1} d
    direction: np.ndarray  # V_k, after the clips
    q_step: np.ndarray  # -alpha_k V_k
    inner_steps: list[np.ndarray] | None  # QE: theta^(i) - theta_k after each inner iteration; None without an inner solve
    step: np.ndarray  # s_k


class Optimizer(NamedTuple):
    """``init(theta) -> state`` and ``step(theta, state, X, y) -> (theta, state, info)``, with the
    resolved hyperparameters, where they apply and the network the step computes with."""

    name: str
    hyper: Hyper
    init: Callable[[np.ndarray], OptState]
    step: Callable[[np.ndarray, OptState, np.ndarray, np.ndarray], tuple[np.ndarray, OptState, dict]]
    platform: str = "dense"
    preset: str = "theory"
    backend: str = "numpy"
    network: Network | None = None

    def describe(self) -> dict:
        """Every resolved setting as plain values (for config files)."""
        return dict(self.hyper.as_dict(), platform=self.platform, preset=self.preset, backend=self.backend)
