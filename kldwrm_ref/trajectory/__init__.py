"""Per-step trajectories for checking another implementation against this one
(docs/trajectory-format.md).

- :func:`record` runs a curvature optimiser and keeps every step's quantities (theta_k, the loss,
  g_k, ghat_k, the factors, the damping, the directions, the clip factors, s_k), all or a choice;
  :func:`expected_size` says how large that record will be before it is made;
- :func:`save` / :func:`load`: the on-disk format, a directory of ``manifest.json`` and one
  compressed ``.npz`` per step, read without pickle;
- :func:`compare`: relative errors per step and quantity, invariant where implementations may
  legitimately differ, each infinite one with what differs (:mod:`kldwrm_ref.testing` asserts on it);
- ``kldwrm trajectory export`` / ``compare``: the same from the command line (:mod:`.cli`).
"""

from kldwrm_ref.trajectory.compare import Comparison, Row, compare, kron_error, relative_error, sign_invariant_error
from kldwrm_ref.trajectory.format import FORMAT, Trajectory, TrajectoryError, load, save
from kldwrm_ref.trajectory.record import expected_size, record

__all__ = ["FORMAT", "Comparison", "Row", "Trajectory", "TrajectoryError", "compare", "expected_size", "kron_error", "load", "record", "relative_error", "save", "sign_invariant_error"]
