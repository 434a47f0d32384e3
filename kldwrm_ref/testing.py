"""Assertions for an implementer's test suite: compare a trajectory with a kldwrm_ref reference
(docs/trajectory-format.md, "Comparing")."""

from __future__ import annotations

import os
import warnings

from kldwrm_ref.trajectory import Trajectory, compare, load
from kldwrm_ref.trajectory.compare import DEFAULT_RTOL


def assert_trajectory_close(ref: Trajectory | str | os.PathLike, cand: Trajectory | str | os.PathLike, rtol: float = DEFAULT_RTOL, strict: bool = False) -> None:
    """Raise AssertionError naming the first step and quantity of ``cand`` whose relative error
    against ``ref`` exceeds ``rtol`` (each a :class:`~kldwrm_ref.trajectory.Trajectory` or a
    trajectory directory), with what differs and the errors of that step.  A candidate quantity
    that is not compared (unknown to the reference) is a ``UserWarning``, or with ``strict`` an
    AssertionError."""
    ref_t = ref if isinstance(ref, Trajectory) else load(ref)
    cand_t = cand if isinstance(cand, Trajectory) else load(cand)
    comparison = compare(ref_t, cand_t)
    failure = comparison.first_failure(rtol)
    if failure is not None:
        step_rows = "\n".join(f"  {row.quantity:<36} {row.error:.3e}{'  ' + row.detail if row.detail else ''}" for row in comparison.rows if row.step == failure.step)
        detail = f" ({failure.detail})" if failure.detail else ""
        raise AssertionError(f"trajectories differ at step {failure.step}, quantity {failure.quantity!r}: relative error {failure.error:.3e} > rtol {rtol:g}{detail}\nstep {failure.step}:\n{step_rows}")
    if strict and comparison.not_compared:
        raise AssertionError("\n".join(comparison.not_compared))
    for note in comparison.not_compared:
        warnings.warn(note, UserWarning, stacklevel=2)
