"""Exponential averaging of curvature and the wake weights it implies (docs/theory.md §2).

    Mbar_0 = M_0,   Mbar_k = rho Mbar_{k-1} + (1 - rho) M_k  =  sum_j w_{k,j} M_j

A curvature estimate is a tuple of arrays or of NamedTuples of arrays (one dense matrix, or one
:class:`~kldwrm_ref.curvature.kfac.KFACFactors` per layer); the average runs leaf by leaf.  With
a refresh period T the average advances only on calls whose step counter is a multiple of T;
k counts the *updates*.  ``zero_start=True`` is the bias-corrected variant (Adam style): Mbar
starts at 0 and is read as Mbar_k / (1 - rho^(k+1)).  The leaves are arrays of any namespace
(the blend runs through ``backend.ea_update``); the wake weights are small host NumPy vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from kldwrm_ref.arrays import array_namespace
from kldwrm_ref.backends import NUMPY, Backend
from kldwrm_ref.validation import check_positive_int, check_rho


def wake_weights(rho: float, k: int) -> np.ndarray:
    """w_{k,j}, j = 0..k (§2.2): w_{k,0} = rho^k, w_{k,j} = (1 - rho) rho^(k-j) for j >= 1."""
    rho = check_rho(rho)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    weights = (1.0 - rho) * rho ** np.arange(k, -1, -1, dtype=np.float64)
    weights[0] = rho**k
    return weights


def truncated_wake_weights(rho: float, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """QE's wake over the last m iterates (§4.4): (indices j, weights wtilde_{k,j}).

    The oldest kept iterate absorbs the tail mass rho^(m-1); for k < m - 1 the full wake.
    """
    m = check_positive_int(m, "m")
    if k < m - 1:
        return np.arange(k + 1), wake_weights(rho, k)
    first = k - m + 1
    weights = (1.0 - rho) * rho ** np.arange(k - first, -1, -1, dtype=np.float64)
    weights[0] = rho ** (m - 1)
    return np.arange(first, k + 1), weights


def is_leaf(tree: Any) -> bool:
    """Whether ``tree`` is an array (of any namespace: it has a shape and a dtype)."""
    return hasattr(tree, "shape") and hasattr(tree, "dtype")


def copy(m: Any) -> Any:
    """A fresh copy of the array ``m`` in its own namespace."""
    return array_namespace(m).asarray(m, copy=True)


def tree_map(fn: Callable[..., Any], tree: Any, *others: Any) -> Any:
    """Apply ``fn`` leaf by leaf to arrays nested in tuples / NamedTuples of the same structure."""
    if is_leaf(tree):
        return fn(tree, *others)
    if not isinstance(tree, tuple) or any(not isinstance(o, tuple) or len(o) != len(tree) for o in others):
        raise ValueError("curvature estimates must be tuples of arrays with the same structure as the running average")
    mapped = [tree_map(fn, *leaves) for leaves in zip(tree, *others)]
    return type(tree)(*mapped) if hasattr(tree, "_fields") else tuple(mapped)


class EAState(NamedTuple):
    """average: the running (uncorrected) average, None before the first update;
    updates: how many estimates it has absorbed (k + 1); calls: how many steps have been seen."""

    average: Any
    updates: int
    calls: int


class ExponentialAverage(NamedTuple):
    """Configuration; every method is a pure function of an :class:`EAState`."""

    rho: float
    period: int = 1
    zero_start: bool = False

    @classmethod
    def create(cls, rho: float, period: int = 1, zero_start: bool = False) -> ExponentialAverage:
        return cls(check_rho(rho), check_positive_int(period, "period"), bool(zero_start))

    def init(self) -> EAState:
        return EAState(None, 0, 0)

    def due(self, state: EAState) -> bool:
        """Whether the next call to :meth:`update` advances the average (a refresh step)."""
        return state.calls % self.period == 0

    def update(self, state: EAState, new: Any, backend: Backend = NUMPY) -> EAState:
        """Absorb ``new`` on a refresh step (it may be None otherwise); always count the call."""
        if not self.due(state):
            return state._replace(calls=state.calls + 1)
        if new is None:
            raise ValueError("new curvature must be given on a refresh step")
        if state.average is None:
            first = tree_map(lambda m: (1.0 - self.rho) * m if self.zero_start else copy(m), new)
            return EAState(first, 1, state.calls + 1)

        def blend(average: Any, m: Any) -> Any:
            if m.shape != average.shape:
                raise ValueError(f"new curvature has shape {m.shape}, the running average {average.shape}")
            return backend.ea_update(average, m, self.rho)

        return EAState(tree_map(blend, state.average, new), state.updates + 1, state.calls + 1)

    def value(self, state: EAState) -> Any:
        """The averaged curvature Mbar_k (bias-corrected when zero_start)."""
        if state.average is None:
            raise ValueError("the average is empty: call update() on a refresh step first")
        if not self.zero_start:
            return state.average
        scale = 1.0 / (1.0 - self.rho**state.updates)
        return tree_map(lambda a: scale * a, state.average)

    def weights(self, state: EAState) -> np.ndarray:
        """w_{k,j}, j = 0..k: Mbar_k = sum_j w_{k,j} M_j over the absorbed estimates M_j."""
        if state.updates == 0:
            raise ValueError("the average is empty: no weights yet")
        k = state.updates - 1
        if not self.zero_start:
            return wake_weights(self.rho, k)
        raw = (1.0 - self.rho) * self.rho ** np.arange(k, -1, -1, dtype=np.float64)
        return raw / (1.0 - self.rho ** (k + 1))
