"""Typed, validated hyperparameters and the presets, as data (docs/theory.md §2-§7).

:class:`Hyper` is a frozen dataclass: every field is checked once, when it is built by
:func:`resolve`, and the update rules read attributes instead of string keys.  A preset is a set
of overrides of :data:`DEFAULTS`, per optimiser where they differ (:data:`PRESETS`).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any, Literal

from kldwrm_ref.curvature.fisher import FISHER_TYPES
from kldwrm_ref.curvature.inverses import DAMPING_STYLES, KRON_SUM_MODES
from kldwrm_ref.model.layers import BIAS_MODES
from kldwrm_ref.model.losses import KL_KINDS
from kldwrm_ref.validation import check_choice, check_nonnegative, check_positive, check_positive_int, check_rho

NAMES = ("sgd", "ea-cm", "kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm")
PLATFORMS = ("dense", "kfac")
PRESETS_NAMES = ("theory", "paper")
STALE_CURRENT = ("last", "average")
INNER_SOLVERS = ("sgd", "preconditioned")
CORRECTIONS = ("exact", "authors")
RMS_CLIP_GROUPS = ("layer", "tensor")
CLIP_ORDERS = ("sequential", "joint")

StepSize = float | Callable[[int], float]


@dataclasses.dataclass(frozen=True)
class Hyper:
    """Every hyperparameter of every optimiser (fields a method does not use are ignored by it)."""

    step_size: StepSize = 0.01  # alpha, or a function of the step number k
    rho: float = 0.0  # EA decay (the preset sets it per method)
    damping: float = 0.01  # eta
    weight_decay: float = 0.0  # L2: added to the corrected gradient and to the damping (§6.1)
    momentum: float = 0.0  # SGD only
    period: int = 1  # curvature refresh period T (§2.3)
    fisher_type: Literal["exact", "mc", "empirical"] = "exact"
    samples: int = 1  # Monte-Carlo labels per input
    seed: int = 0  # Monte-Carlo labels: default_rng([seed, k])
    bias: Literal["joint", "separate"] = "joint"  # §5.3
    damping_style: Literal["eigen", "factored", "factored-explicit"] = "eigen"  # §5.2
    kron_sum: Literal["exact", "factored"] = "exact"  # §5.5 (Q, QE)
    eig_floor: float = 0.0  # eigenvalues <= floor set to 0 (§5.2)
    kl_clip: float | None = None  # trust region (§6.2)
    rms_clip: float | None = None  # RMS clip of the preconditioned direction (§6.3)
    rms_clip_per: Literal["layer", "tensor"] = "layer"
    clip_order: Literal["sequential", "joint"] = "sequential"
    stale_current: Literal["last", "average"] = "last"  # B_k on steps without refresh (Q, QE)
    correction: Literal["exact", "authors"] = "exact"  # Q/QE wake correction (§4.3, §7)
    m: int = 3  # QE wake capacity
    kl: Literal["forward", "symmetric"] = "forward"  # QE's divergence
    kappa: float = 1.0  # QE's KL scale
    proximal: bool = True  # QE: (eta/2)|theta - theta_j|^2 in every wake term (§4.4)
    inner: Literal["sgd", "preconditioned"] = "preconditioned"  # QE's inner solver
    inner_steps: int = 5
    inner_step_factor: float = 1.0
    inner_momentum: float = 0.0
    inner_after_full_wake: bool = False  # QE: plain Q steps until the wake holds m iterates

    def __post_init__(self) -> None:
        if not callable(self.step_size):
            check_positive(self.step_size, "step_size")
        check_rho(self.rho)
        check_nonnegative(self.damping, "damping")
        check_nonnegative(self.weight_decay, "weight_decay")
        _check_unit_interval(self.momentum, "momentum")
        check_positive_int(self.period, "period")
        check_choice(self.fisher_type, "fisher_type", FISHER_TYPES)
        check_positive_int(self.samples, "samples")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        check_choice(self.bias, "bias", BIAS_MODES)
        check_choice(self.damping_style, "damping_style", DAMPING_STYLES)
        check_choice(self.kron_sum, "kron_sum", KRON_SUM_MODES)
        check_nonnegative(self.eig_floor, "eig_floor")
        for clip in ("kl_clip", "rms_clip"):
            if getattr(self, clip) is not None:
                check_positive(getattr(self, clip), clip)
        check_choice(self.rms_clip_per, "rms_clip_per", RMS_CLIP_GROUPS)
        check_choice(self.clip_order, "clip_order", CLIP_ORDERS)
        check_choice(self.stale_current, "stale_current", STALE_CURRENT)
        check_choice(self.correction, "correction", CORRECTIONS)
        check_positive_int(self.m, "m")
        check_choice(self.kl, "kl", KL_KINDS)
        check_positive(self.kappa, "kappa")
        for flag in ("proximal", "inner_after_full_wake"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        check_choice(self.inner, "inner", INNER_SOLVERS)
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, numbers.Integral) or self.inner_steps < 0:
            raise ValueError(f"inner_steps must be an integer >= 0, got {self.inner_steps!r}")
        check_positive(self.inner_step_factor, "inner_step_factor")
        _check_unit_interval(self.inner_momentum, "inner_momentum")

    @property
    def total_damping(self) -> float:
        """eta + weight decay: the damping every curvature solve uses (§6.1)."""
        return self.damping + self.weight_decay

    def as_dict(self) -> dict[str, Any]:
        """Plain values (a callable step size as its repr) for config files and reports."""
        return {f.name: (repr(v) if callable(v) else v) for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


def _check_unit_interval(value: float, name: str) -> None:
    if not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


FIELDS = tuple(f.name for f in dataclasses.fields(Hyper))

# The decay of each method in the authors' runs (docs/reference.md); both presets use them.
AUTHORS_RHO = {"sgd": 0.0, "ea-cm": 0.95, "kfac": 0.95, "so-kld-wrm": 0.33, "q-kld-wrm": 0.5, "qe-kld-wrm": 0.5}

# preset -> optimiser name ("*" for all) -> overrides of the Hyper defaults, applied in order.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "theory": {
        "sgd": dict(step_size=0.1),
    },
    "paper": {
        "*": dict(weight_decay=0.001, period=30, fisher_type="empirical", bias="separate", eig_floor=1e-6, kl_clip=0.1),
        "sgd": dict(step_size=0.1),
        "q-kld-wrm": dict(rms_clip=2.0, kron_sum="factored", stale_current="average", correction="authors", rms_clip_per="tensor", clip_order="joint"),
        "qe-kld-wrm": dict(
            rms_clip=2.0, kron_sum="factored", stale_current="average", correction="authors", rms_clip_per="tensor", clip_order="joint",
            kl="symmetric", kappa=1.0 / 660.0, inner="sgd", inner_steps=7, inner_step_factor=0.1, inner_momentum=0.5,
            inner_after_full_wake=True, proximal=False,
        ),
    },
}


def preset_values(name: str, preset: str) -> dict[str, Any]:
    """The preset's values for optimiser ``name`` (before user overrides)."""
    preset = check_choice(preset, "preset", PRESETS_NAMES)
    values: dict[str, Any] = dict(rho=AUTHORS_RHO[name])
    table = PRESETS[preset]
    values.update(table.get("*", {}))
    values.update(table.get(name, {}))
    return values


def resolve(name: str, preset: str, overrides: dict[str, Any]) -> Hyper:
    """Hyper for ``name`` under ``preset`` with user ``overrides``; unknown keys are refused."""
    unknown = set(overrides) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)}; accepted: {sorted(FIELDS)}")
    hyper = Hyper(**{**preset_values(name, preset), **overrides})
    if name != "sgd" and hyper.momentum != 0:
        raise ValueError(f"momentum applies to 'sgd' only; {name!r} takes no momentum (got momentum={hyper.momentum!r})")
    return hyper
