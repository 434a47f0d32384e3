"""Record a trajectory: run an optimiser and copy, step by step, what its phases computed
(``info["trace"]``, :class:`~kldwrm_ref.optim.state.StepTrace`) into a
:class:`~kldwrm_ref.trajectory.format.Trajectory` (docs/trajectory-format.md names every quantity).

Only the dropout masks and the Monte-Carlo uniforms are drawn again here, from the seeds the step
used (docs/conventions.md); everything else is a copy of the step's own arrays.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np

import kldwrm_ref
from kldwrm_ref.model.conv import Dropout
from kldwrm_ref.model.mlp import MLP
from kldwrm_ref.model.network import Network
from kldwrm_ref.model.zoo import NAMED_NETWORKS, build_network
from kldwrm_ref.optim import SPECS, Optimizer, StepTrace
from kldwrm_ref.optim.clipping import clip_groups
from kldwrm_ref.trajectory.format import FORMAT, Trajectory, check_trajectory

SEEDS = {
    "dropout": "step k's masks: the scaled mask m of Dropout layer i drawn by default_rng([seed, k, 1]) in the step's first forward pass",
    "mc_uniforms": "refresh step k with fisher_type='mc': default_rng([seed, k]).random((samples, N)), the uniforms of the sampled labels",
}


def record(opt: Optimizer, theta: np.ndarray, batches: Iterable[tuple[np.ndarray, np.ndarray]], *, data: dict | None = None, eigen: bool = False) -> Trajectory:
    """Run ``opt`` (a curvature optimiser from :func:`kldwrm_ref.optim.make`) from ``theta`` over
    ``batches`` of (X, y) and return every step's quantities.

    ``data``: a JSON description of where the batches come from, stored in the manifest;
    ``eigen``: also record the eigenpairs the K-FAC inverse is applied in (§5.2, §5.5).
    """
    if opt.name not in SPECS:
        raise ValueError(f"opt must be a curvature optimiser ({', '.join(SPECS)}) to be recorded; got {opt.name!r}")
    net = opt.network
    if net is None:
        raise ValueError("opt has no network: build it with kldwrm_ref.optim.make")
    if eigen and opt.platform != "kfac":
        raise ValueError(f"eigen=True needs the K-FAC platform (eigenpairs of the factors); opt runs on platform {opt.platform!r}")
    try:
        json.dumps(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"data must be plain JSON values (dicts, lists, strings, numbers, None); {error}") from None
    theta = net.check_theta(np.asarray(theta))
    state = opt.init(theta)
    steps: list[dict[str, np.ndarray]] = []
    factors: tuple = ()  # step 0's averaged estimate: the factor fields and shapes of every block
    for X, y in batches:
        theta_next, state, info = opt.step(theta, state, X, y)
        steps.append(_step_arrays(opt, net, theta, X, y, info, info["trace"], eigen))
        factors = factors or info["trace"].averaged
        theta = theta_next
    if not steps:
        raise ValueError("batches must hold at least one (X, y) batch")
    return check_trajectory(Trajectory(_manifest(opt, net, factors, len(steps), data), tuple(steps)))


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


def _manifest(opt: Optimizer, net: Network, factors: tuple, n_steps: int, data: dict | None) -> dict[str, Any]:
    architecture, activation = architecture_of(net)
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
        "hyper": opt.describe(),
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
