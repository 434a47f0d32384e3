"""The worked example of docs/trajectory-format.md: a K-FAC written from scratch in PyTorch (the
paper preset's K-FAC: empirical Fisher, eigen damping with the eigenvalue floor, separate bias
blocks, weight decay, kl clip) writes its own trajectory in the format, which must match an
exported kldwrm_ref reference step by step.  Skipped when torch is not installed."""

import itertools
import json

import numpy as np
import pytest

from kldwrm_ref.cli import main as kldwrm
from kldwrm_ref.testing import assert_trajectory_close
from kldwrm_ref.trajectory import load

torch = pytest.importorskip("torch")


# --- worked example: start
def eigen_solve(G, A, V, eta, floor):
    """(G (x) A + eta I)^{-1} vec(V) in the factors' eigenbases, eigenvalues <= floor set to 0."""
    (dg, qg), (da, qa) = torch.linalg.eigh(G), torch.linalg.eigh(A)
    dg, da = torch.where(dg <= floor, 0.0, dg), torch.where(da <= floor, 0.0, da)
    return qg @ ((qg.T @ V @ qa) / (torch.outer(dg, da) + eta)) @ qa.T


def torch_kfac(manifest, batches, theta):
    """The reference's K-FAC with its resolved hyperparameters: (named parameters, one dict per step)."""
    h, sizes = manifest["hyper"], manifest["network"]["architecture"]
    alpha, rho, eta, wd = h["step_size"], h["rho"], h["damping"] + h["weight_decay"], h["weight_decay"]
    layers = [torch.nn.Linear(i, o, dtype=torch.float64) for i, o in itertools.pairwise(sizes)]
    named = [(f"{2 * i}.{name}", p) for i, layer in enumerate(layers) for name, p in layer.named_parameters()]  # nn.Sequential names
    params = [p for _, p in named]  # W, b layer by layer: theta's layout
    torch.nn.utils.vector_to_parameters(torch.from_numpy(theta), params)
    average, steps = None, []
    for k, (X, y) in enumerate(batches):
        theta, a, inputs, outputs = torch.nn.utils.parameters_to_vector(params).detach(), torch.from_numpy(X), [], []
        for i, layer in enumerate(layers):
            inputs.append(a)
            outputs.append(layer(a))
            a = torch.relu(outputs[-1]) if i < len(layers) - 1 else outputs[-1]
        loss, n = torch.nn.functional.cross_entropy(a, torch.from_numpy(y)), len(y)
        grads = torch.autograd.grad(loss, params + outputs)
        g = torch.cat([t.reshape(-1) for t in grads[: len(params)]])
        step = dict(theta=theta, loss=loss.detach(), g=g)
        if k % h["period"] == 0:  # refresh: A = mean abar abar^T, G = mean of per-sample delta delta^T
            abars = [torch.cat([x.detach(), torch.ones(n, 1, dtype=x.dtype)], 1) for x in inputs]
            current = [(ab.T @ ab / n, (n * du).T @ (n * du) / n) for ab, du in zip(abars, grads[len(params):])]
            average = current if average is None else [(rho * A + (1 - rho) * Ac, rho * G + (1 - rho) * Gc) for (A, G), (Ac, Gc) in zip(average, current)]
            step |= {f"current.{i}.{f}": m for i, pair in enumerate(current) for f, m in zip("AG", pair)}
        step |= {f"averaged.{i}.{f}": m for i, pair in enumerate(average) for f, m in zip("AG", pair)}
        d, v, offset = g + wd * theta, torch.empty_like(g), 0
        for A, G in average:  # separate bias blocks: W gets G (x) A[:in, :in], b gets G (x) [1]
            out, inp = G.shape[0], A.shape[0] - 1
            for rows, size in ((slice(0, inp), out * inp), (slice(inp, inp + 1), out)):
                v[offset : offset + size] = eigen_solve(G, A[rows, rows], d[offset : offset + size].reshape(out, -1), eta, h["eig_floor"]).reshape(-1)
                offset += size
        vd = float(alpha**2 * (v @ d))
        nu = min(1.0, (h["kl_clip"] / vd) ** 0.5) if vd > 0 else 1.0
        s = -alpha * nu * v
        torch.nn.utils.vector_to_parameters(theta + s, params)
        steps.append(step | dict(ghat=g, d=d, v_unclipped=v, kl_clip_factor=torch.tensor(nu, dtype=torch.float64), v=nu * v, s=s))
    return named, steps


def write_trajectory(directory, named, steps):
    """The format without kldwrm_ref: one .npz per step and manifest.json."""
    directory.mkdir(parents=True)
    for k, step in enumerate(steps):
        np.savez(directory / f"step-{k:05d}.npz", **{key: t.detach().numpy() for key, t in step.items()})
    offsets = np.cumsum([0] + [p.numel() for _, p in named])
    layout = [dict(name=name, shape=list(p.shape), offset=int(o)) for (name, p), o in zip(named, offsets)]
    (directory / "manifest.json").write_text(json.dumps(dict(format="kldwrm-trajectory-1", steps=len(steps), theta_layout=layout)))
# --- worked example: end


def test_pytorch_kfac_matches_the_exported_reference(tmp_path):
    ref_dir = tmp_path / "ref"
    assert kldwrm(["trajectory", "export", "--optimizer", "kfac", "--architecture", "20-16-10", "--preset", "paper", "--steps", "6", "--batch", "64", "--synthetic", "--hyper", "period=2", "kl_clip=1e-5", "--out", str(ref_dir)]) == 0
    ref = load(ref_dir)
    named, steps = torch_kfac(ref.manifest, [(s["X"], s["y"]) for s in ref.steps], ref.steps[0]["theta"])
    write_trajectory(tmp_path / "torch", named, steps)
    assert_trajectory_close(ref_dir, tmp_path / "torch", rtol=1e-10)
    assert kldwrm(["trajectory", "compare", str(ref_dir), str(tmp_path / "torch"), "--rtol", "1e-10"]) == 0
    # the path covers averaging, steps between refreshes and an active kl clip
    assert any(s["refreshed"] for s in ref.steps[1:]) and not all(s["refreshed"] for s in ref.steps)
    assert max(float(s["kl_clip_factor"]) for s in ref.steps) < 1
    # a mistake is named where it starts: weight decay left out of d (same total damping eta + wd)
    h = ref.manifest["hyper"]
    wrong = dict(ref.manifest, hyper=dict(h, weight_decay=0.0, damping=h["damping"] + h["weight_decay"]))
    write_trajectory(tmp_path / "wrong", *torch_kfac(wrong, [(s["X"], s["y"]) for s in ref.steps], ref.steps[0]["theta"]))
    with pytest.raises(AssertionError, match="at step 0, quantity 'd'"):
        assert_trajectory_close(ref_dir, tmp_path / "wrong")

