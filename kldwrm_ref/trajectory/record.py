"""Record a trajectory: run an optimiser and copy, step by step, what its phases computed
(``info["trace"]``, :class:`~kldwrm_ref.optim.state.StepTrace`) into a
:class:`~kldwrm_ref.trajectory.format.Trajectory` (docs/trajectory-format.md names every quantity).

Only the dropout masks and the Monte-Carlo uniforms are drawn again here, from the seeds the step
used (docs/conventions.md); everything else is a copy of the step's own arrays.  The averaged
factors are kept on the steps where they change (step 0 and the refresh steps): in between they
are the last ones kept.  :func:`expected_size` tells the size of a record before it is made.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Collection, Iterable
from typing import Any

import numpy as np

import kldwrm_ref
from kldwrm_ref.model.conv import Dropout
from kldwrm_ref.model.mlp import MLP
from kldwrm_ref.model.network import Network
from kldwrm_ref.model.zoo import NAMED_NETWORKS, build_network
from kldwrm_ref.optim import SPECS, Optimizer, StepTrace
from kldwrm_ref.optim.clipping import clip_groups
from kldwrm_ref.optim.hyper import FIELDS
from kldwrm_ref.trajectory.format import FORMAT, QUANTITIES, REQUIRED_STEP, Trajectory, check_trajectory, family, npz_bytes

SEEDS = {
    "dropout": "step k's masks: the scaled mask m of Dropout layer i drawn by default_rng([seed, k, 1]) in the step's first forward pass",
    "mc_uniforms": "refresh step k with fisher_type='mc': default_rng([seed, k]).random((samples, N)), the uniforms of the sampled labels",
}


def select(only: Collection[str] | None = None, skip: Collection[str] = ()) -> frozenset[str]:
    """The quantity families to record: ``only`` these (all when None) less ``skip``; theta, loss,
    g and s are always recorded (every trajectory holds them).  Unknown names are refused."""
    for name in [*(only or ()), *skip]:
        if name not in QUANTITIES:
            close = difflib.get_close_matches(name, QUANTITIES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown quantity {name!r}{hint}; the quantities are {', '.join(QUANTITIES)}")
    required = [name for name in skip if name in REQUIRED_STEP]
    if required:
        raise ValueError(f"{', '.join(required)} cannot be skipped: every trajectory holds {', '.join(REQUIRED_STEP)}")
    chosen = set(QUANTITIES if only is None else only) | set(REQUIRED_STEP)
    return frozenset(chosen - set(skip))


def record(
    opt: Optimizer, theta: np.ndarray, batches: Iterable[tuple[np.ndarray, np.ndarray]], *,
    data: dict | None = None, eigen: bool = False, only: Collection[str] | None = None, skip: Collection[str] = (),
) -> Trajectory:
    """Run ``opt`` (a curvature optimiser from :func:`kldwrm_ref.optim.make`) from ``theta`` over
    ``batches`` of (X, y) and return every step's quantities.

    ``data``: a JSON description of where the batches come from, stored in the manifest;
    ``eigen``: also record the eigenpairs the K-FAC inverse is applied in (§5.2, §5.5);
    ``only`` / ``skip``: which quantity families to record (:func:`select`).
    """
    keep = select(only, skip)
    theta = _check_recordable(opt, theta, eigen, data)
    net = opt.network
    assert net is not None
    state = opt.init(theta)
    steps: list[dict[str, np.ndarray]] = []
    factors: tuple = ()  # step 0's averaged estimate: the factor fields and shapes of every block
    kept_average: dict[str, np.ndarray] = {}
    for X, y in batches:
        theta_next, state, info = opt.step(theta, state, X, y)
        arrays = _step_arrays(opt, net, theta, X, y, info, info["trace"], eigen)
        average = {key: value for key, value in arrays.items() if family(key) == "averaged"}
        if _same_arrays(average, kept_average):  # unchanged since the last refresh: not stored again
            arrays = {key: value for key, value in arrays.items() if key not in average}
        kept_average = average
        steps.append({key: value for key, value in arrays.items() if family(key) in keep})
        factors = factors or info["trace"].averaged
        theta = theta_next
    if not steps:
        raise ValueError("batches must hold at least one (X, y) batch")
    return check_trajectory(Trajectory(_manifest(opt, net, factors, len(steps), data, keep), tuple(steps)))


def _check_recordable(opt: Optimizer, theta: np.ndarray, eigen: bool, data: dict | None) -> np.ndarray:
    if opt.name not in SPECS:
        raise ValueError(f"opt must be a curvature optimiser ({', '.join(SPECS)}) to be recorded; got {opt.name!r}")
    if opt.network is None:
        raise ValueError("opt has no network: build it with kldwrm_ref.optim.make")
    if eigen and opt.platform != "kfac":
        raise ValueError(f"eigen=True needs the K-FAC platform (eigenpairs of the factors); opt runs on platform {opt.platform!r}")
    try:
        json.dumps(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"data must be plain JSON values (dicts, lists, strings, numbers, None); {error}") from None
    return opt.network.check_theta(np.asarray(theta))


def _same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return bool(a) and a.keys() == b.keys() and all(a[key].shape == b[key].shape and a[key].tobytes() == b[key].tobytes() for key in a)


REFRESH_FAMILIES = ("mc_uniforms", "current", "averaged")  # recorded on refresh steps only


def expected_size(opt: Optimizer, theta: np.ndarray, X: np.ndarray, y: np.ndarray, steps: int, *, eigen: bool = False, only: Collection[str] | None = None, skip: Collection[str] = ()) -> tuple[int, int]:
    """(compressed, uncompressed) bytes of the step files of a ``steps``-step :func:`record` from
    ``theta``, estimated by running one probe step on the batch (X, y) and counting how often each
    quantity is recorded: the refresh-step quantities every ``period`` steps, QE's inner steps on
    the steps with an inner solve, the rest every step.  The compressed size is step 0's
    compression ratio per quantity; later steps compress alike up to a few percent."""
    keep = select(only, skip)
    theta = _check_recordable(opt, theta, eigen, None)
    net, hyper = opt.network, opt.hyper
    assert net is not None
    _, _, info = opt.step(theta, opt.init(theta), X, y)
    arrays = {key: value for key, value in _step_arrays(opt, net, theta, X, y, info, info["trace"], eigen).items() if family(key) in keep}
    refreshes = -(-steps // hyper.period)
    inner = 0  # steps with an inner solve
    if SPECS[opt.name].inner_solve and hyper.inner_steps > 0:
        inner = max(0, steps - (hyper.m - 1)) if hyper.inner_after_full_wake else steps
    compressed = uncompressed = 0
    for key, value in arrays.items():
        if family(key) not in ("s_q", "inner_steps"):
            count = refreshes if family(key) in REFRESH_FAMILIES else steps
            compressed, uncompressed = compressed + count * npz_bytes({key: value}), uncompressed + count * value.nbytes
    rows = ("s_q" in keep) + ("inner_steps" in keep) * hyper.inner_steps  # QE's: vectors like s on the inner-solve steps
    s = arrays["s"]
    compressed, uncompressed = compressed + inner * rows * npz_bytes({"s": s}), uncompressed + inner * rows * s.nbytes
    return compressed, uncompressed


def _estimate(prefix: str, estimate: tuple) -> dict[str, np.ndarray]:
    """``prefix.i.FIELD`` per factor of layer i (K-FAC), ``prefix.i`` for a plain matrix (dense Fisher)."""
    arrays = {}
    for i, leaf in enumerate(estimate):
        if hasattr(leaf, "_fields"):
            arrays.update({f"{prefix}.{i}.{field}": np.array(getattr(leaf, field)) for field in leaf._fields})
        else:
            arrays[f"{prefix}.{i}"] = np.array(leaf)
    return arrays


def _step_arrays(opt: Optimizer, net: Network, theta: np.ndarray, X, y, info: dict, trace: StepTrace, eigen: bool) -> dict[str, np.ndarray]:
    hyper = opt.hyper
    arrays = {"X": np.array(X), "y": np.array(y), "theta": theta.copy(), "alpha": np.array(trace.alpha), "loss": np.array(info["loss"]), "g": trace.g.copy()}
    if net.stochastic:
        cache = net.forward(theta, X, net.training_rng(trace.masks))
        arrays.update({f"dropout.{i}": cache.caches[i] for i, layer in enumerate(net.layers) if isinstance(layer, Dropout)})
    arrays["refreshed"] = np.array(info["refreshed"])
    if trace.current is not None:
        if hyper.fisher_type == "mc":
            arrays["mc_uniforms"] = np.random.default_rng(trace.labels).random((hyper.samples, len(arrays["y"])))
        arrays.update(_estimate("current", trace.current))
    arrays.update(_estimate("averaged", trace.averaged))
    arrays["damping"] = np.array(trace.damping)
    if getattr(trace.solver, "pis", None) is not None:
        arrays["pi"] = np.array(trace.solver.pis)
    if eigen:
        for b, pair in enumerate(trace.solver.eigenpairs):
            for side, decomposition in zip("GA", pair):
                arrays[f"eigen.{b}.{side}.values"] = decomposition.values.copy()
                arrays[f"eigen.{b}.{side}.vectors"] = decomposition.vectors.copy()
    arrays.update(ghat=trace.ghat.copy(), d=trace.d.copy(), v_unclipped=trace.unclipped.copy())
    if "rms_clip_factors" in info:
        arrays["rms_clip_factors"] = info["rms_clip_factors"].copy()
    if "kl_clip_factor" in info:
        arrays["kl_clip_factor"] = np.array(info["kl_clip_factor"], dtype=np.float64)
    arrays["v"] = trace.direction.copy()
    if trace.inner_steps is not None:
        arrays["s_q"] = trace.q_step.copy()
        arrays["inner_steps"] = np.array(trace.inner_steps).reshape(len(trace.inner_steps), net.n_params)
    arrays["s"] = trace.step.copy()
    return arrays


def architecture_of(net: Network) -> tuple[list[int] | str | None, str | None]:
    """(MLP sizes or the name in NAMED_NETWORKS, MLP activation); (None, None) for another network."""
    if isinstance(net, MLP):
        return list(net.sizes), net.activation
    for name in NAMED_NETWORKS:
        named = build_network(name, dtype=net.dtype)
        if named.input_shape == net.input_shape and [repr(layer) for layer in named.layers] == [repr(layer) for layer in net.layers]:
            return name, None
    return None, None


def hyper_in_use(opt: Optimizer) -> frozenset[str]:
    """The hyperparameters that can change the steps of ``opt`` (a curvature optimiser); it
    ignores the others (docs/theory.md §2-§7, the phases of ``optim/curvature_method.py``)."""
    h, spec, net = opt.hyper, SPECS[opt.name], opt.network
    assert net is not None
    used = {"step_size", "rho", "damping", "weight_decay", "period", "fisher_type", "kl_clip", "rms_clip"}
    if h.fisher_type == "mc":
        used |= {"samples", "seed"}  # the sampled labels
    if net.stochastic:
        used.add("seed")  # the dropout masks
    if h.rms_clip is not None:
        used.add("rms_clip_per")
        if h.kl_clip is not None:
            used.add("clip_order")  # the order matters only with both clips
    if opt.platform == "kfac":
        used.add("bias")
        if spec.uses_current:
            used.add("kron_sum")
        # eigen / factored damping and the floor: every K-FAC inverse but the exact Kronecker sum (§5.2, §5.5),
        # and QE's preconditioned inner solve
        if not spec.uses_current or h.kron_sum == "factored" or (spec.inner_solve and h.inner == "preconditioned"):
            used |= {"damping_style", "eig_floor"}
    if spec.uses_current and h.period > 1:
        used.add("stale_current")  # B_k on the steps between refreshes
    if spec.correction == "model":
        used.add("correction")
    if spec.inner_solve:
        used |= {"m", "kl", "kappa", "proximal", "inner", "inner_steps", "inner_after_full_wake"}
        if h.inner == "sgd":
            used |= {"inner_step_factor", "inner_momentum"}
    return frozenset(used)


def _manifest(opt: Optimizer, net: Network, factors: tuple, n_steps: int, data: dict | None, keep: frozenset[str]) -> dict[str, Any]:
    architecture, activation = architecture_of(net)
    settings, used = opt.describe(), hyper_in_use(opt)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "package": "kldwrm_ref",
        "package_version": kldwrm_ref.__version__,
        "steps": n_steps,
        "dtype": net.dtype.name,
        "network": {
            "architecture": architecture, "activation": activation, "input_shape": list(net.input_shape),
            "layers": [repr(layer) for layer in net.layers], "n_params": net.n_params, "parametrised_layers": net.parametrised,
        },
        "theta_layout": [{"layer": t.layer, "name": t.name, "shape": list(t.shape), "offset": t.offset} for t in net.tensors],
        "optimizer": opt.name,
        "preset": opt.preset,
        "hyper": {key: value for key, value in settings.items() if key in used or key not in FIELDS},
        "hyper_ignored": {key: value for key, value in settings.items() if key in FIELDS and key not in used},
        "recorded": [name for name in QUANTITIES if name in keep],
        "data": data if data is not None else {"source": "batches passed to kldwrm_ref.trajectory.record"},
        "seeds": SEEDS,
    }
    if opt.platform == "kfac":
        manifest["blocks"] = _blocks(net, opt.hyper.bias, factors)
    if opt.hyper.rms_clip is not None:
        manifest["rms_clip_groups"] = [[sl.start, sl.stop] for sl in clip_groups(net, opt.hyper.rms_clip_per)]
    return json.loads(json.dumps(manifest))  # plain JSON values: what load() gives back


def _blocks(net: Network, bias: str, factors: tuple) -> list[dict[str, Any]]:
    """Every K-FAC block: which layer's factors (index among the parametrised layers), which fields,
    and the rows / columns [start, stop) of A it takes (§5.3, §5.6)."""
    blocks = []
    for p, spec in net.kfac_blocks(bias):
        fields = factors[p]._fields
        start, stop, _ = spec.a_rows.indices(factors[p][spec.a_factor].shape[0])
        blocks.append({"name": spec.name, "factors": p, "A": fields[spec.a_factor], "G": fields[spec.g_factor], "a_rows": [start, stop]})
    return blocks
