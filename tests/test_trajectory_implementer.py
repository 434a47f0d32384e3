"""The implementer's path, end to end: a K-FAC written here from scratch in plain NumPy - its own
parameter layout (a dict of named layers), its own factors (A without the homogeneous coordinate
and a separate bias block with its own G_bias), its own loop - is driven from an exported
reference (the stored theta_0 and batches, the manifest's hyperparameters), writes its steps in
the trajectory format by hand, and is compared with the reference.  It passes; with a planted
mistake it fails, naming the step and the quantity where the mistake starts."""

import json
import re

import numpy as np
import pytest

from kldwrm_ref.cli import main as kldwrm
from kldwrm_ref.testing import assert_trajectory_close
from kldwrm_ref.trajectory import load


def unpack(layout, theta):
    """{"fc1": {"W": (out, in), "b": (out,)}, ...} from theta by the manifest's theta_layout."""
    tensors = [theta[t["offset"] : t["offset"] + int(np.prod(t["shape"]))].reshape(t["shape"]) for t in layout]
    return {f"fc{i + 1}": {"W": W.copy(), "b": b.copy()} for i, (W, b) in enumerate(zip(tensors[0::2], tensors[1::2]))}


def pack(params):
    return np.concatenate([part for layer in params.values() for part in (layer["W"].ravel(), layer["b"])])


def forward_backward(params, X, y):
    """Mean cross-entropy, its gradient, and per layer the inputs a and the per-sample cotangents
    delta = d loss_i / d u (N times those of the mean)."""
    names, a, inputs, pre = list(params), X, [], []
    for i, name in enumerate(names):
        inputs.append(a)
        pre.append(a @ params[name]["W"].T + params[name]["b"])
        a = np.maximum(pre[-1], 0) if i + 1 < len(names) else pre[-1]
    p = np.exp(a - a.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n = len(y)
    delta = p - np.eye(p.shape[1])[y]
    deltas = {}
    for i in reversed(range(len(names))):
        deltas[names[i]] = delta
        if i:
            delta = (delta @ params[names[i]]["W"]) * (pre[i - 1] > 0)
    grads = {name: {"W": deltas[name].T @ a_in / n, "b": deltas[name].mean(0)} for name, a_in in zip(names, inputs)}
    return -np.log(p[np.arange(n), y]).mean(), grads, dict(zip(names, inputs)), deltas


def damped_solve(G, A, V, eta, floor):
    """(G (x) A + eta I)^{-1} vec(V) in the eigenbases, eigenvalues <= floor set to 0."""
    dg, qg = np.linalg.eigh(G)
    da, qa = np.linalg.eigh(A)
    dg, da = np.where(dg <= floor, 0, dg), np.where(da <= floor, 0, da)
    return qg @ ((qg.T @ V @ qa) / (np.outer(dg, da) + eta)) @ qa.T


def numpy_kfac(manifest, batches, theta, mistake=None):
    """K-FAC as the manifest describes it (the hyperparameters the method uses); one dict per step
    in the format's names, the factors mapped onto the format's homogeneous A."""
    h = manifest["hyper"]
    eta = h["damping"] + (0.0 if mistake == "damping" else h["weight_decay"])
    params, average, steps = unpack(manifest["theta_layout"], theta), None, []
    for k, (X, y) in enumerate(batches):
        loss, grads, inputs, deltas = forward_backward(params, X, y)
        n, theta = len(y), pack(params)
        g = pack(grads)
        step = {"theta": theta, "loss": np.array(loss), "g": g, "damping": np.array(eta)}
        if k % h["period"] == 0:
            current = {}
            for name in params:
                d = deltas[name]
                G_bias = (d - d.mean(0)).T @ (d - d.mean(0)) / n if mistake == "bias G" else d.T @ d / n
                current[name] = {"A": inputs[name].T @ inputs[name] / n, "G": d.T @ d / n, "A_bias": np.ones((1, 1)), "G_bias": G_bias}
            average = current if average is None else {name: {f: h["rho"] * average[name][f] + (1 - h["rho"]) * current[name][f] for f in current[name]} for name in params}
            step |= format_factors("current", current)
        step |= format_factors("averaged", average)  # every step: the reference keeps it where it changes
        d_vec = g + h["weight_decay"] * theta
        d_tree, v_tree = unpack(manifest["theta_layout"], d_vec), {}
        for name, f in average.items():
            v_tree[name] = {"W": damped_solve(f["G"], f["A"], d_tree[name]["W"], eta, h["eig_floor"]),
                            "b": damped_solve(f["G_bias"], f["A_bias"], d_tree[name]["b"][:, None], eta, h["eig_floor"])[:, 0]}
        v = pack(v_tree)
        vd = h["step_size"] ** 2 * v @ d_vec
        nu = min(1.0, np.sqrt(h["kl_clip"] / vd)) if vd > 0 else 1.0
        s = -h["step_size"] * nu * v
        steps.append(step | {"ghat": g, "d": d_vec, "v_unclipped": v, "kl_clip_factor": np.array(nu), "v": nu * v, "s": s})
        params = unpack(manifest["theta_layout"], theta + s)
    return steps


def format_factors(prefix, factors):
    """Layer p's factors under the format's names: A with the homogeneous coordinate last (its
    entry A_bias; the W-b cross terms are never compared, so zeros), G, and the bias block's own G_bias."""
    out = {}
    for p, f in enumerate(factors.values()):
        k = len(f["A"])
        A = np.zeros((k + 1, k + 1))
        A[:k, :k], A[k, k] = f["A"], f["A_bias"][0, 0]
        out |= {f"{prefix}.{p}.A": A, f"{prefix}.{p}.G": f["G"], f"{prefix}.{p}.G_bias": f["G_bias"]}
    return out


def write_trajectory(directory, layout_names, manifest, steps):
    directory.mkdir()
    for k, step in enumerate(steps):
        np.savez(directory / f"step-{k:05d}.npz", **step)
    layout = [dict(name=name, shape=t["shape"], offset=t["offset"]) for name, t in zip(layout_names, manifest["theta_layout"])]
    (directory / "manifest.json").write_text(json.dumps({"format": "kldwrm-trajectory-1", "steps": len(steps), "theta_layout": layout}))


NAMES = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("implementer") / "ref"
    assert kldwrm(["trajectory", "export", "--optimizer", "kfac", "--architecture", "16-12-10", "--preset", "paper", "--steps", "7", "--batch", "40", "--synthetic", "--hyper", "period=3", "kl_clip=1e-4", "--out", str(out)]) == 0
    return out


def run_implementation(reference, out, mistake=None):
    ref = load(reference)
    steps = numpy_kfac(ref.manifest, [(step["X"], step["y"]) for step in ref.steps], ref.steps[0]["theta"], mistake)
    write_trajectory(out, NAMES, ref.manifest, steps)
    return ref


def test_an_independent_numpy_kfac_matches_the_export_step_by_step(reference, tmp_path, capsys):
    ref = run_implementation(reference, tmp_path / "mine")
    assert_trajectory_close(reference, tmp_path / "mine", rtol=1e-10, strict=True)  # every candidate quantity compared
    assert kldwrm(["trajectory", "compare", str(reference), str(tmp_path / "mine"), "--rtol", "1e-10", "--strict"]) == 0
    out = capsys.readouterr().out
    assert "averaged G(x)A layer 1 bias" in out and "warning" not in out
    # the run exercised a second refresh, the steps between refreshes and an active kl clip
    assert [bool(step["refreshed"]) for step in ref.steps] == [True, False, False, True, False, False, True]
    assert max(float(step["kl_clip_factor"]) for step in ref.steps) < 1


@pytest.mark.parametrize("mistake, where", [("damping", "at step 0, quantity 'damping'"), ("bias G", "at step 0, quantity 'current G(x)A layer 0 bias'")])
def test_a_planted_mistake_is_named_where_it_starts(reference, tmp_path, capsys, mistake, where):
    run_implementation(reference, tmp_path / "mine", mistake)
    with pytest.raises(AssertionError, match=re.escape(f"trajectories differ {where}")):
        assert_trajectory_close(reference, tmp_path / "mine", rtol=1e-10)
    assert kldwrm(["trajectory", "compare", str(reference), str(tmp_path / "mine"), "--rtol", "1e-10"]) == 1
    assert f"FAIL: first exceeds rtol 1e-10 {where}" in capsys.readouterr().out
