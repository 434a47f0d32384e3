"""Compare two trajectories quantity by quantity, invariantly where implementations legitimately
differ (docs/trajectory-format.md, "Comparing").

Every error is relative, |cand - ref|_F / |ref|_F (0 when both are 0, inf when only ref is), except:

- K-FAC factors, compared per block as the Kronecker product G (x) A[rows, rows] (§5.1, §5.3), so a
  scale moved between A and G does not count: with the scale moved into G (A of unit norm, signs
  aligned), G1 (x) A1 - G2 (x) A2 = dG (x) A1 + G2 (x) dA, whose Frobenius norm needs no product.
  A candidate's bias block of a dense layer takes its own ``G_bias`` (and ``A_bias``) when it
  records them; the averaged factors hold from the step that records them to the next that does;
- eigenvalues, compared as the products d_G d_A^T of a block; eigenvectors column by column up to sign;
- pi (§5.2), which moves with the scale of A, compared as pi sqrt(|G|_F / |A|_F) of the block.

A quantity only one trajectory records at a step, among those both record somewhere, is an
infinite error; one that only the reference records anywhere is listed as skipped; one that only
the candidate records is reported as not compared (with a guess at the name meant).  Every
infinite error says why: both shapes, the tensor of theta whose layout differs, or which side
lacks the quantity.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from kldwrm_ref.trajectory.format import QUANTITIES, Trajectory, family
from kldwrm_ref.validation import check_nonnegative

FACTOR_PREFIXES = ("current", "averaged")
DEFAULT_RTOL = 1e-8  # float64 implementations that differ in summation order and eigensolver
# Names another implementation may use for a recorded quantity
SYNONYMS = {
    "nu": "kl_clip_factor", "kl_factor": "kl_clip_factor", "eta": "damping", "lambda": "damping", "lr": "alpha",
    "step_size": "alpha", "params": "theta", "grad": "g", "gradient": "g", "direction": "v", "step": "s", "update": "s",
}


class Row(NamedTuple):
    """The relative error of one quantity at one step, and why it is infinite where it is."""

    step: int
    quantity: str
    error: float
    detail: str = ""


class Comparison(NamedTuple):
    """Every (step, quantity) error in pipeline order, the reference's quantities the candidate
    never records, and the candidate's quantities that are not compared (one message each)."""

    rows: list[Row]
    skipped: list[str]
    not_compared: tuple[str, ...] = ()

    def first_failure(self, rtol: float) -> Row | None:
        """The first row whose error exceeds ``rtol`` (a NaN error exceeds every tolerance)."""
        rtol = check_nonnegative(rtol, "rtol")
        return next((row for row in self.rows if not row.error <= rtol), None)

    def passed(self, rtol: float, strict: bool = False) -> bool:
        """No error above ``rtol`` and, when ``strict``, no candidate quantity left uncompared."""
        return self.first_failure(rtol) is None and not (strict and self.not_compared)

    def report(self, rtol: float, strict: bool = False) -> str:
        """A table of every step and quantity with its relative error, the notes, and the verdict."""
        lines = [f"{'step':>5}  {'quantity':<36} {'relative error':>14}"]
        lines += [f"{row.step:>5}  {row.quantity:<36} {row.error:>14.3e}{'  > rtol' if not row.error <= rtol else ''}{'  ' + row.detail if row.detail else ''}" for row in self.rows]
        if self.skipped:
            lines.append(f"not in the candidate (skipped): {', '.join(self.skipped)}")
        lines += [f"{'error' if strict else 'warning'}: {note}" for note in self.not_compared]
        failure = self.first_failure(rtol)
        if failure is not None:
            lines.append(f"FAIL: first exceeds rtol {rtol:g} at step {failure.step}, quantity {failure.quantity!r} (relative error {failure.error:.3e}){': ' + failure.detail if failure.detail else ''}")
        elif strict and self.not_compared:
            lines.append(f"FAIL (--strict): {len(self.not_compared)} candidate quantities are not compared")
        else:
            lines.append(f"OK: {len(self.rows)} comparisons within rtol {rtol:g}")
        return "\n".join(lines)


def shape_difference(ref: np.ndarray, cand: np.ndarray, name: str = "") -> str:
    """"" for equal shapes, else both shapes, prefixed with ``name``."""
    if np.shape(ref) == np.shape(cand):
        return ""
    return f"{name + ': ' if name else ''}shape {np.shape(cand)} in the candidate, {np.shape(ref)} in the reference"


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


def _rank(quantity: str) -> tuple[int, str]:
    name = family(quantity.split()[0])
    return (QUANTITIES.index(name) if name in QUANTITIES else len(QUANTITIES), quantity)


def _factor_keys(step: Mapping[str, np.ndarray], prefix: str, block: Mapping[str, Any], own_bias: bool) -> tuple[str, str, bool]:
    """(key of A, key of G, whether A is sliced to the block's rows): the block's fields of the
    manifest, or, with ``own_bias``, a dense layer's separately recorded ``G_bias`` (and ``A_bias``)."""
    p = block["factors"]
    a_key, g_key, sliced = f"{prefix}.{p}.{block['A']}", f"{prefix}.{p}.{block['G']}", True
    if own_bias and block["G"] == "G" and block["name"].endswith(" bias") and f"{prefix}.{p}.G_bias" in step:
        g_key = f"{prefix}.{p}.G_bias"
        if f"{prefix}.{p}.A_bias" in step:
            a_key, sliced = f"{prefix}.{p}.A_bias", False
    return a_key, g_key, sliced


def _block_factors(step: Mapping[str, np.ndarray], prefix: str, block: Mapping[str, Any], own_bias: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """(A[rows, rows], G) of ``block`` from ``prefix`` (current / averaged); None if not recorded."""
    a_key, g_key, sliced = _factor_keys(step, prefix, block, own_bias)
    if a_key not in step or g_key not in step:
        return None
    start, stop = block["a_rows"]
    A = step[a_key]
    return (A[start:stop, start:stop] if sliced else A), step[g_key]


def _block_row(k: int, ref_step: Mapping[str, np.ndarray], cand_step: Mapping[str, np.ndarray], prefix: str, block: Mapping[str, Any]) -> Row | None:
    name = f"{prefix} G(x)A {block['name']}"
    keys = (_factor_keys(ref_step, prefix, block, False), _factor_keys(cand_step, prefix, block, True))
    present = [a in step and g in step for (a, g, _), step in zip(keys, (ref_step, cand_step))]
    if not any(present):
        return None
    if not all(present):
        side, (a, g, _), step = ("candidate", keys[1], cand_step) if present[0] else ("reference", keys[0], ref_step)
        return Row(k, name, float("inf"), f"the {side} does not record {' and '.join(key for key in (a, g) if key not in step)} at this step")
    (ref_a, ref_g, _), (cand_a, cand_g, cand_sliced) = keys
    start, stop = block["a_rows"]
    ref_A = ref_step[ref_a] if cand_sliced else ref_step[ref_a][start:stop, start:stop]  # A whole, or the block's rows to match A_bias
    detail = shape_difference(ref_A, cand_step[cand_a], cand_a) or shape_difference(ref_step[ref_g], cand_step[cand_g], cand_g)
    if detail:
        return Row(k, name, float("inf"), detail)
    pair_ref, pair_cand = _block_factors(ref_step, prefix, block), _block_factors(cand_step, prefix, block, own_bias=True)
    assert pair_ref is not None and pair_cand is not None
    return Row(k, name, kron_error(*pair_ref, *pair_cand))


def _carried_average(steps: Sequence[Mapping[str, np.ndarray]]) -> list[Mapping[str, np.ndarray]]:
    """The steps with the averaged factors of the last step that records them added where a step
    records none (the average changes only on refresh steps; kldwrm_ref stores it only then)."""
    carried: list[Mapping[str, np.ndarray]] = []
    last: dict[str, np.ndarray] = {}
    for step in steps:
        own = {key: value for key, value in step.items() if family(key) == "averaged"}
        if own:
            last = own
        carried.append(step if own or not last else {**step, **last})
    return carried


def _quantities(ref: Trajectory, cand: Trajectory) -> tuple[list[str], list[str], tuple[str, ...]]:
    """(the quantities compared, the reference's quantities the candidate never records, a note on
    every candidate quantity that is not compared)."""
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
    return sorted(compared, key=_rank), sorted(skipped, key=_rank), _not_compared(ref_keys, cand_keys, blocks)


def _not_compared(ref_keys: set[str], cand_keys: set[str], blocks: Sequence[Mapping[str, Any]] | None) -> tuple[str, ...]:
    """A note for every candidate quantity the reference does not record, with the likely name meant."""
    bias_slots = {f"{prefix}.{b['factors']}.{field}" for b in blocks or () if b["G"] == "G" and b["name"].endswith(" bias") for prefix in FACTOR_PREFIXES for field in ("G_bias", "A_bias")}
    notes = []
    for key in sorted(cand_keys - ref_keys - bias_slots, key=_rank):
        guess = SYNONYMS.get(key) or next(iter(difflib.get_close_matches(key, sorted((ref_keys | set(QUANTITIES)) - {key}), n=1)), None)
        hint = f"; did you mean {guess!r}?" if guess else ""
        if family(key) in QUANTITIES:
            notes.append(f"quantity {key!r} of the candidate is not recorded by the reference{hint} (not compared)")
        else:
            notes.append(f"unknown quantity {key!r} in the candidate{hint} (not compared)")
    return tuple(notes)


def _recorded(cand_keys: set[str], quantity: str) -> bool:
    """Whether the candidate records ``quantity`` at some step."""
    if quantity.endswith(" factors"):
        prefix = quantity.split()[0]
        return any(family(key) == prefix for key in cand_keys)
    if quantity.startswith("eigen."):
        b, kind = quantity.split(".")[1:]
        return f"eigen.{b}.G.{kind}" in cand_keys and f"eigen.{b}.A.{kind}" in cand_keys
    return quantity in cand_keys


def _eigen_rows(k: int, ref_step: Mapping[str, np.ndarray], cand_step: Mapping[str, np.ndarray], quantity: str) -> Iterator[Row]:
    b, kind = quantity.split(".")[1:]
    keys = [f"eigen.{b}.{side}.{kind}" for side in "GA"]
    present = [all(key in step for key in keys) for step in (ref_step, cand_step)]
    if not any(present):
        return
    if not all(present):
        yield Row(k, quantity, float("inf"), f"the {'candidate' if present[0] else 'reference'} does not record {' and '.join(keys)} at this step")
        return
    detail = shape_difference(ref_step[keys[0]], cand_step[keys[0]], keys[0]) or shape_difference(ref_step[keys[1]], cand_step[keys[1]], keys[1])
    if detail:
        yield Row(k, quantity, float("inf"), detail)
    elif kind == "vectors":
        yield Row(k, f"eigen.{b}.G.vectors", sign_invariant_error(ref_step[keys[0]], cand_step[keys[0]]))
        yield Row(k, f"eigen.{b}.A.vectors", sign_invariant_error(ref_step[keys[1]], cand_step[keys[1]]))
    else:
        yield Row(k, f"eigen.{b} d_G d_A^T", kron_error(ref_step[keys[1]], ref_step[keys[0]], cand_step[keys[1]], cand_step[keys[0]]))


def _step_errors(k: int, ref_step: Mapping[str, np.ndarray], cand_step: Mapping[str, np.ndarray], quantities: list[str], blocks) -> Iterator[Row]:
    for quantity in quantities:
        if quantity.endswith(" factors"):
            rows = (_block_row(k, ref_step, cand_step, quantity.split()[0], block) for block in blocks)
            yield from (row for row in rows if row is not None)
        elif quantity.startswith("eigen."):
            yield from _eigen_rows(k, ref_step, cand_step, quantity)
        elif quantity not in ref_step and quantity not in cand_step:
            continue
        elif quantity not in ref_step or quantity not in cand_step:
            yield Row(k, quantity, float("inf"), f"recorded at this step by the {'reference' if quantity in ref_step else 'candidate'} only")
        elif shape_difference(ref_step[quantity], cand_step[quantity]):
            yield Row(k, quantity, float("inf"), shape_difference(ref_step[quantity], cand_step[quantity]))
        elif quantity == "pi" and blocks is not None:
            yield Row(k, quantity, relative_error(_normalised_pi(ref_step, blocks, False), _normalised_pi(cand_step, blocks, True)))
        else:
            yield Row(k, quantity, relative_error(ref_step[quantity], cand_step[quantity]))


def _normalised_pi(step: Mapping[str, np.ndarray], blocks, own_bias: bool) -> np.ndarray:
    """pi sqrt(|G|_F / |A|_F) per block (averaged factors): unchanged when A -> c A, G -> G / c."""
    pi = np.asarray(step["pi"], dtype=np.float64)
    pairs = [pair for block in blocks if (pair := _block_factors(step, "averaged", block, own_bias)) is not None]
    if pi.shape != (len(blocks),) or len(pairs) != len(blocks):
        return pi
    return np.array([p * np.sqrt(np.linalg.norm(G) / np.linalg.norm(A)) for p, (A, G) in zip(pi, pairs)])


def layout_difference(ref: Trajectory, cand: Trajectory) -> str:
    """"" when theta's tensors have the same shapes and offsets, else the first that differs, by
    position, with both names, shapes and offsets (names alone may differ)."""
    layouts = [trajectory.manifest["theta_layout"] for trajectory in (ref, cand)]
    for i, (r, c) in enumerate(zip(*layouts)):
        if [list(r["shape"]), r["offset"]] != [list(c["shape"]), c["offset"]]:
            return f"tensor {i}: {_tensor(c)} in the candidate, {_tensor(r)} in the reference"
    if len(layouts[0]) != len(layouts[1]):
        return f"{len(layouts[1])} tensors in the candidate, {len(layouts[0])} in the reference"
    return ""


def _tensor(entry: Mapping[str, Any]) -> str:
    name = f"{entry.get('name')!r}" + (f" of layer {entry['layer']}" if "layer" in entry else "")
    return f"{name} shape {tuple(entry['shape'])} at offset {entry['offset']}"


def compare(ref: Trajectory, cand: Trajectory) -> Comparison:
    """Every step's relative errors of ``cand`` against ``ref`` (module docstring)."""
    layout = layout_difference(ref, cand)
    if layout:
        return Comparison([Row(0, "theta layout", float("inf"), layout)], [])
    quantities, skipped, not_compared = _quantities(ref, cand)
    blocks = ref.manifest.get("blocks")
    rows = []
    for k, (ref_step, cand_step) in enumerate(zip(_carried_average(ref.steps), _carried_average(cand.steps))):
        rows += list(_step_errors(k, ref_step, cand_step, quantities, blocks))
    if len(ref.steps) != len(cand.steps):
        rows.append(Row(min(len(ref.steps), len(cand.steps)), "steps", float("inf"), f"{len(cand.steps)} steps in the candidate, {len(ref.steps)} in the reference"))
    return Comparison(rows, skipped, not_compared)
