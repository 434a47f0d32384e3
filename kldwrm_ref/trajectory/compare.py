"""Compare two trajectories quantity by quantity, invariantly where implementations legitimately
differ (docs/trajectory-format.md, "Comparing").

Every error is relative, |cand - ref|_F / |ref|_F (0 when both are 0, inf when only ref is), except:

- K-FAC factors, compared per block as the Kronecker product G (x) A[rows, rows] (§5.1, §5.3), so a
  scale moved between A and G does not count: with the scale moved into G (A of unit norm, signs
  aligned), G1 (x) A1 - G2 (x) A2 = dG (x) A1 + G2 (x) dA, whose Frobenius norm needs no product;
- eigenvalues, compared as the products d_G d_A^T of a block; eigenvectors column by column up to sign;
- pi (§5.2), which moves with the scale of A, compared as pi sqrt(|G|_F / |A|_F) of the block.

A quantity only one trajectory records at a step, among those both record somewhere, is an
infinite error; one that only the reference records anywhere is listed as skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from kldwrm_ref.trajectory.format import Trajectory, layout_of
from kldwrm_ref.validation import check_nonnegative

# Pipeline order of the quantities (docs/trajectory-format.md): the first failure is the earliest.
ORDER = (
    "X", "y", "dropout", "theta", "alpha", "loss", "g", "refreshed", "mc_uniforms", "current", "averaged", "damping", "pi", "eigen",
    "ghat", "d", "v_unclipped", "rms_clip_factors", "kl_clip_factor", "v", "s_q", "inner_steps", "s",
)
FACTOR_PREFIXES = ("current", "averaged")
DEFAULT_RTOL = 1e-8  # float64 implementations that differ in summation order and eigensolver


class Row(NamedTuple):
    """The relative error of one quantity at one step."""

    step: int
    quantity: str
    error: float


class Comparison(NamedTuple):
    """Every (step, quantity) error in pipeline order, and the reference's quantities the candidate never records."""

    rows: list[Row]
    skipped: list[str]

    def first_failure(self, rtol: float) -> Row | None:
        """The first row whose error exceeds ``rtol`` (a NaN error exceeds every tolerance)."""
        rtol = check_nonnegative(rtol, "rtol")
        return next((row for row in self.rows if not row.error <= rtol), None)

    def report(self, rtol: float) -> str:
        """A table of every step and quantity with its relative error, and the verdict."""
        lines = [f"{'step':>5}  {'quantity':<36} {'relative error':>14}"]
        lines += [f"{row.step:>5}  {row.quantity:<36} {row.error:>14.3e}{'  > rtol' if not row.error <= rtol else ''}" for row in self.rows]
        if self.skipped:
            lines.append(f"not in the candidate (skipped): {', '.join(self.skipped)}")
        failure = self.first_failure(rtol)
        if failure is None:
            lines.append(f"OK: {len(self.rows)} comparisons within rtol {rtol:g}")
        else:
            lines.append(f"FAIL: first exceeds rtol {rtol:g} at step {failure.step}, quantity {failure.quantity!r} (relative error {failure.error:.3e})")
        return "\n".join(lines)


def relative_error(ref: np.ndarray, cand: np.ndarray) -> float:
    """|cand - ref|_F / |ref|_F in float64; inf for different shapes or a nonzero difference from 0."""
    ref, cand = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    if ref.shape != cand.shape:
        return float("inf")
    return _ratio(float(np.linalg.norm(cand - ref)), float(np.linalg.norm(ref)))


def _ratio(difference: float, scale: float) -> float:
    if scale > 0:
        return difference / scale
    return 0.0 if difference == 0 else float("inf")


def kron_error(A1: np.ndarray, G1: np.ndarray, A2: np.ndarray, G2: np.ndarray) -> float:
    """|G1 (x) A1 - G2 (x) A2|_F / |G1 (x) A1|_F without forming either product (module docstring)."""
    A1, G1, A2, G2 = (np.asarray(m, dtype=np.float64) for m in (A1, G1, A2, G2))
    if A1.shape != A2.shape or G1.shape != G2.shape:
        return float("inf")
    a1, a2 = float(np.linalg.norm(A1)), float(np.linalg.norm(A2))
    ref_norm, cand_norm = a1 * float(np.linalg.norm(G1)), a2 * float(np.linalg.norm(G2))
    if ref_norm == 0 or cand_norm == 0:
        return _ratio(cand_norm, ref_norm) if ref_norm == 0 else 1.0
    sign = 1.0 if float(np.vdot(A1, A2)) >= 0 else -1.0
    A1, G1 = A1 / a1, G1 * a1
    A2, G2 = sign * (A2 / a2), sign * (G2 * a2)
    dA, dG = A1 - A2, G1 - G2
    squared = float(np.vdot(dG, dG)) + float(np.vdot(G2, G2)) * float(np.vdot(dA, dA)) + 2.0 * float(np.vdot(dG, G2)) * float(np.vdot(A1, dA))
    return float(np.sqrt(max(squared, 0.0))) / float(np.linalg.norm(G1))


def sign_invariant_error(ref: np.ndarray, cand: np.ndarray) -> float:
    """Relative error of eigenvector matrices with every column compared up to its sign."""
    ref, cand = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    if ref.shape != cand.shape or ref.ndim != 2:
        return float("inf")
    closest = np.minimum(np.sum((ref - cand) ** 2, axis=0), np.sum((ref + cand) ** 2, axis=0))
    return _ratio(float(np.sqrt(closest.sum())), float(np.linalg.norm(ref)))


def family(key: str) -> str:
    """The first dotted part of a quantity's name (``averaged.0.A`` -> ``averaged``)."""
    return key.split(".", 1)[0]


def _rank(quantity: str) -> tuple[int, str]:
    name = family(quantity.split()[0])
    return (ORDER.index(name) if name in ORDER else len(ORDER), quantity)


def _block_factors(step: Mapping[str, np.ndarray], prefix: str, block: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(A[rows, rows], G) of ``block`` from ``prefix`` (current / averaged); None if not recorded."""
    keys = (f"{prefix}.{block['factors']}.{block['A']}", f"{prefix}.{block['factors']}.{block['G']}")
    if not all(key in step for key in keys):
        return None
    start, stop = block["a_rows"]
    return step[keys[0]][start:stop, start:stop], step[keys[1]]


def _quantities(ref: Trajectory, cand: Trajectory) -> tuple[list[str], list[str]]:
    """(the quantities compared, the reference's quantities the candidate never records)."""
    blocks = ref.manifest.get("blocks")
    ref_keys = set().union(*(step.keys() for step in ref.steps))
    cand_keys = set().union(*(step.keys() for step in cand.steps))
    compared: set[str] = set()
    skipped: set[str] = set()
    for key in ref_keys:
        name = family(key)
        if blocks is not None and name in FACTOR_PREFIXES:
            key = f"{name} factors"
        elif name == "eigen":
            key = ".".join(key.split(".")[:2] + (["vectors"] if key.endswith("vectors") else ["values"]))
        (compared if _recorded(cand_keys, key) else skipped).add(key)
    return sorted(compared, key=_rank), sorted(skipped, key=_rank)


def _recorded(cand_keys: set[str], quantity: str) -> bool:
    """Whether the candidate records ``quantity`` at some step."""
    if quantity.endswith(" factors"):
        prefix = quantity.split()[0]
        return any(family(key) == prefix for key in cand_keys)
    if quantity.startswith("eigen."):
        b, kind = quantity.split(".")[1:]
        return f"eigen.{b}.G.{kind}" in cand_keys and f"eigen.{b}.A.{kind}" in cand_keys
    return quantity in cand_keys


def _step_errors(k: int, ref_step: Mapping[str, np.ndarray], cand_step: Mapping[str, np.ndarray], quantities: list[str], blocks) -> Iterator[Row]:
    for quantity in quantities:
        if quantity.endswith(" factors"):
            prefix = quantity.split()[0]
            for block in blocks:
                pair_ref, pair_cand = _block_factors(ref_step, prefix, block), _block_factors(cand_step, prefix, block)
                if pair_ref is not None or pair_cand is not None:
                    error = float("inf") if pair_ref is None or pair_cand is None else kron_error(*pair_ref, *pair_cand)
                    yield Row(k, f"{prefix} G(x)A {block['name']}", error)
            continue
        if quantity.startswith("eigen."):
            b, kind = quantity.split(".")[1:]
            keys = [f"eigen.{b}.{side}.{kind}" for side in "GA"]
            present = [all(key in step for key in keys) for step in (ref_step, cand_step)]
            if any(present):
                if not all(present):
                    yield Row(k, quantity, float("inf"))
                elif kind == "vectors":
                    yield Row(k, f"eigen.{b}.G.vectors", sign_invariant_error(ref_step[keys[0]], cand_step[keys[0]]))
                    yield Row(k, f"eigen.{b}.A.vectors", sign_invariant_error(ref_step[keys[1]], cand_step[keys[1]]))
                else:
                    yield Row(k, f"eigen.{b} d_G d_A^T", kron_error(ref_step[keys[1]], ref_step[keys[0]], cand_step[keys[1]], cand_step[keys[0]]))
            continue
        if quantity not in ref_step and quantity not in cand_step:
            continue
        if quantity not in ref_step or quantity not in cand_step:
            yield Row(k, quantity, float("inf"))
        elif quantity == "pi" and blocks is not None:
            yield Row(k, quantity, relative_error(_normalised_pi(ref_step, blocks), _normalised_pi(cand_step, blocks)))
        else:
            yield Row(k, quantity, relative_error(ref_step[quantity], cand_step[quantity]))


def _normalised_pi(step: Mapping[str, np.ndarray], blocks) -> np.ndarray:
    """pi sqrt(|G|_F / |A|_F) per block (averaged factors): unchanged when A -> c A, G -> G / c."""
    pi = np.asarray(step["pi"], dtype=np.float64)
    pairs = [pair for block in blocks if (pair := _block_factors(step, "averaged", block)) is not None]
    if pi.shape != (len(blocks),) or len(pairs) != len(blocks):
        return pi
    return np.array([p * np.sqrt(np.linalg.norm(G) / np.linalg.norm(A)) for p, (A, G) in zip(pi, pairs)])


def compare(ref: Trajectory, cand: Trajectory) -> Comparison:
    """Every step's relative errors of ``cand`` against ``ref`` (module docstring)."""
    if layout_of(ref) != layout_of(cand):
        return Comparison([Row(0, "theta layout", float("inf"))], [])
    quantities, skipped = _quantities(ref, cand)
    blocks = ref.manifest.get("blocks")
    rows = []
    for k, (ref_step, cand_step) in enumerate(zip(ref.steps, cand.steps)):
        rows += list(_step_errors(k, ref_step, cand_step, quantities, blocks))
    if len(ref.steps) != len(cand.steps):
        rows.append(Row(min(len(ref.steps), len(cand.steps)), "steps", float("inf")))
    return Comparison(rows, skipped)
