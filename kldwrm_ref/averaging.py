"""Exponential averaging of curvature (EA-CM, THEORY.md section 2) as a small piece of state.

    Mbar_0 = M_0,   Mbar_k = rho Mbar_{k-1} + (1 - rho) M_k

applied to a tuple of arrays (one dense matrix, or every K-FAC factor).  With a refresh period
T the average advances only on calls whose step counter is a multiple of T; k counts the
*updates*.  ``zero_start=True`` is the bias-corrected variant (Adam style): Mbar starts at 0 and
is read as Mbar_k / (1 - rho^(k+1)).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from kldwrm_ref import ops
from kldwrm_ref.validation import check_positive_int, check_rho
from kldwrm_ref.wake import wake_weights


class EAState(NamedTuple):
    """average: the running (uncorrected) average, None before the first update;
    updates: how many matrices it has absorbed (k + 1); calls: how many steps have been seen."""

    average: tuple[np.ndarray, ...] | None
    updates: int
    calls: int


class ExponentialAverage(NamedTuple):
    """Configuration; every method is a pure function of an :class:`EAState`."""

    rho: float
    period: int = 1
    zero_start: bool = False

    @classmethod
    def create(cls, rho: float, period: int = 1, zero_start: bool = False) -> "ExponentialAverage":
        return cls(check_rho(rho), check_positive_int(period, "period"), bool(zero_start))

    def init(self) -> EAState:
        return EAState(None, 0, 0)

    def due(self, state: EAState) -> bool:
        """Whether the next call to :meth:`update` advances the average (a refresh step)."""
        return state.calls % self.period == 0

    def update(self, state: EAState, new: Sequence[np.ndarray] | None, backend=ops) -> EAState:
        """Absorb ``new`` on a refresh step (it may be None otherwise); always count the call."""
        if not self.due(state):
            return state._replace(calls=state.calls + 1)
        if new is None:
            raise ValueError("new curvature must be given on a refresh step")
        new = tuple(new)
        if state.average is None:
            first = tuple((1.0 - self.rho) * m if self.zero_start else m.copy() for m in new)
            return EAState(first, 1, state.calls + 1)
        if len(new) != len(state.average) or any(m.shape != a.shape for m, a in zip(new, state.average)):
            raise ValueError("new curvature must have the same shapes as the running average")
        average = tuple(backend.ea_update(a, m, self.rho) for a, m in zip(state.average, new))
        return EAState(average, state.updates + 1, state.calls + 1)

    def value(self, state: EAState) -> tuple[np.ndarray, ...]:
        """The averaged curvature Mbar_k (bias-corrected when zero_start)."""
        if state.average is None:
            raise ValueError("the average is empty: call update() on a refresh step first")
        if not self.zero_start:
            return state.average
        scale = 1.0 / (1.0 - self.rho**state.updates)
        return tuple(scale * a for a in state.average)

    def weights(self, state: EAState) -> np.ndarray:
        """w_{k,j}, j = 0..k: Mbar_k = sum_j w_{k,j} M_j over the absorbed matrices M_j."""
        if state.updates == 0:
            raise ValueError("the average is empty: no weights yet")
        k = state.updates - 1
        if not self.zero_start:
            return wake_weights(self.rho, k)
        raw = (1.0 - self.rho) * self.rho ** np.arange(k, -1, -1, dtype=np.float64)
        return raw / (1.0 - self.rho ** (k + 1))
