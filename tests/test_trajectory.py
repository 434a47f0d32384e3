"""Trajectories (docs/trajectory-format.md): the round trip through the format, the recorded
quantities against independent recomputations, the invariant comparison, refusals, and the
``kldwrm trajectory`` command lines."""

import dataclasses
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

from kldwrm_ref import MLP, optim
from kldwrm_ref.cli import main as kldwrm
from kldwrm_ref.data import load_mnist, synthetic_classification
from kldwrm_ref.experiments.runner import load_data
from kldwrm_ref.model import paper_cnn
from kldwrm_ref.optim.hyper import FIELDS
from kldwrm_ref.testing import assert_trajectory_close
from kldwrm_ref.trajectory import Trajectory, TrajectoryError, compare, kron_error, load, record, save, sign_invariant_error

import reference_net as ref

FORCED_CLIPS = dict(period=2, kl_clip=1e-3, rms_clip=0.1, step_size=0.05)  # every clip active, stale steps between refreshes


def batches(steps, n=32):
    X, y = synthetic_classification(steps * n, 6, 4, seed=7)
    return [(X[i * n : (i + 1) * n], y[i * n : (i + 1) * n]) for i in range(steps)]


def recorded(name, preset="paper", steps=6, eigen=False, **overrides):
    net = MLP([6, 5, 4], "tanh")
    return net, record(optim.make(name, net, platform="kfac", preset=preset, backend="numpy", **overrides), net.init(3), batches(steps), eigen=eigen)


@pytest.fixture(scope="module")
def paper_q():
    return recorded("q-kld-wrm", **FORCED_CLIPS)[1]


def edited(trajectory, edit):
    """A copy of ``trajectory`` with ``edit(k, step)`` applied to copies of its steps."""
    steps = tuple({key: value.copy() for key, value in step.items()} for step in trajectory.steps)
    for k, step in enumerate(steps):
        edit(k, step)
    return dataclasses.replace(trajectory, steps=steps)


# ---------------------------------------------------------------------------- round trip
def test_save_then_load_gives_the_record_back_exactly(paper_q, tmp_path):
    assert load(save(paper_q, tmp_path / "t")) == paper_q
    changed = edited(paper_q, lambda k, step: step.update(s=np.nextafter(step["s"], np.inf)) if k == 5 else None)
    assert changed != paper_q  # equality is bitwise


def test_cli_export_loads_back_equal_to_the_in_memory_record(tmp_path):
    args = ["--optimizer", "qe-kld-wrm", "--architecture", "6-5-10", "--preset", "paper", "--steps", "4", "--batch", "16", "--synthetic", "--seed", "2"]
    assert kldwrm(["trajectory", "export", *args, "--hyper", "period=2", "kl_clip=1e-3", "--out", str(tmp_path / "t")]) == 0
    loaded = load(tmp_path / "t")
    net = MLP([6, 5, 10])
    synthetic = load_data(dict(source="synthetic", n_train=None, n_test=None), 6, "float64")  # kldwrm mnist --synthetic's
    X, y = synthetic.X_train, synthetic.y_train
    rows = [np.random.default_rng([2, 1]).permutation(2000)[16 * k : 16 * (k + 1)] for k in range(4)]  # epoch 1 of seed 2
    opt = optim.make("qe-kld-wrm", net, platform="kfac", preset="paper", backend="numpy", seed=2, period=2, kl_clip=1e-3)
    assert loaded == record(opt, net.init(2), [(X[r], y[r]) for r in rows], data=loaded.manifest["data"])
    assert loaded.manifest["data"]["indices"] == [r.tolist() for r in rows]
    assert "inner_steps" in loaded.steps[3] and "inner_steps" not in loaded.steps[1]  # the paper's QE waits for a full wake


# ---------------------------------------------------------------------------- recorded = recomputed
def test_recorded_loss_gradient_and_step_equal_a_recomputation(paper_q):
    net = MLP([6, 5, 4], "tanh")
    for k, step in enumerate(paper_q.steps):
        loss, g = net.loss_and_grad(step["theta"], step["X"], step["y"])
        assert float(step["loss"]) == pytest.approx(loss, rel=1e-14)
        np.testing.assert_allclose(step["g"], g, rtol=1e-13, atol=1e-16)
        if k + 1 < len(paper_q.steps):
            taken = paper_q.steps[k + 1]["theta"] - step["theta"]
            np.testing.assert_allclose(step["s"], taken, rtol=0, atol=4e-16 * np.abs(step["theta"]).max())


def _independent_last_layer_factors(step, samples=None):
    """A and G of the output layer of a 6-5-4 tanh MLP, written out with numpy (§5.1): empirical
    cotangents pi - e_y, or Monte-Carlo ones from the recorded uniforms by inverse-CDF sampling."""
    theta, X, y = step["theta"], step["X"], step["y"]
    W0, b0, W1, b1 = theta[:30].reshape(5, 6), theta[30:35], theta[35:55].reshape(4, 5), theta[55:]
    h = np.tanh(X @ W0.T + b0)
    z = h @ W1.T + b1
    pi = np.exp(z - z.max(axis=1, keepdims=True))
    pi /= pi.sum(axis=1, keepdims=True)
    hbar = np.hstack([h, np.ones((len(y), 1))])
    labels = [y] if samples is None else [np.minimum((np.cumsum(pi, axis=1) <= u[:, None]).sum(axis=1), 3) for u in step["mc_uniforms"]]
    deltas = [(pi - np.eye(4)[lab]) / np.sqrt(len(labels)) for lab in labels]
    return hbar.T @ hbar / len(y), sum(d.T @ d for d in deltas) / len(y)


def test_kfac_quantities_equal_an_independent_dense_replay():
    """Paper-preset K-FAC: factors, average, d, the floored eigen-damped solve with separate bias
    blocks, the kl clip and s, replayed with dense numpy matrices from the recorded factors."""
    _, trajectory = recorded("kfac", period=2, kl_clip=1e-3, step_size=0.05)
    hyper = trajectory.manifest["hyper"]
    eta, rho = hyper["damping"] + hyper["weight_decay"], hyper["rho"]
    average = None
    for k, step in enumerate(trajectory.steps):
        if k % 2 == 0:
            A, G = _independent_last_layer_factors(step)
            np.testing.assert_allclose(step["current.1.A"], A, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(step["current.1.G"], G, rtol=1e-12, atol=1e-15)
            current = [step[f"current.{p}.{f}"] for p in (0, 1) for f in "AG"]
            average = current if average is None else [rho * a + (1 - rho) * c for a, c in zip(average, current)]
            for recorded_factor, expected in zip([step[f"averaged.{p}.{f}"] for p in (0, 1) for f in "AG"], average):
                np.testing.assert_allclose(recorded_factor, expected, rtol=1e-13, atol=1e-16)
        else:  # no fresh estimate, and the average, unchanged, is not stored again
            assert not any(key.startswith(("current.", "averaged.")) for key in step)
        d = step["g"] + hyper["weight_decay"] * step["theta"]
        np.testing.assert_allclose(step["d"], d, rtol=1e-14)
        matrix, start = np.zeros((55 + 4, 55 + 4)), 0
        for A, G in zip(average[0::2], average[1::2]):
            A, G = (_floored(m, hyper["eig_floor"]) for m in (A, G))
            n_in, out = A.shape[0] - 1, G.shape[0]
            matrix[start : start + out * n_in, start : start + out * n_in] = np.kron(G, A[:n_in, :n_in])  # W's block
            matrix[start + out * n_in : start + out * n_in + out, start + out * n_in : start + out * n_in + out] = G * A[n_in, n_in]  # b's block
            start += out * n_in + out
        v = np.linalg.solve(matrix + eta * np.eye(len(d)), d)
        np.testing.assert_allclose(step["v_unclipped"], v, rtol=1e-10)
        nu = min(1.0, np.sqrt(hyper["kl_clip"] / (0.05**2 * v @ d)))
        assert float(step["kl_clip_factor"]) == pytest.approx(nu, rel=1e-10)
        np.testing.assert_allclose(step["s"], -0.05 * nu * v, rtol=1e-10)
    assert min(float(step["kl_clip_factor"]) for step in trajectory.steps) < 1


def _floored(matrix, floor):
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.where(values <= floor, 0.0, values)) @ vectors.T


def test_monte_carlo_uniforms_reproduce_the_sampled_factor():
    _, trajectory = recorded("kfac", preset="theory", steps=2, fisher_type="mc", samples=3)
    for step in trajectory.steps:
        assert step["mc_uniforms"].shape == (3, 32)
        np.testing.assert_allclose(step["current.1.G"], _independent_last_layer_factors(step, samples=3)[1], rtol=1e-12, atol=1e-15)


def test_clip_factors_pi_and_inner_steps_are_the_ones_applied():
    net, trajectory = recorded("qe-kld-wrm", preset="theory", steps=3, damping_style="factored", kron_sum="factored", rms_clip=0.1, inner_steps=2)
    groups = trajectory.manifest["rms_clip_groups"]
    for step in trajectory.steps:
        rms = [np.linalg.norm(step["v_unclipped"][a:b]) / np.sqrt(b - a) for a, b in groups]
        np.testing.assert_allclose(step["rms_clip_factors"], np.minimum(1.0, 0.1 / np.array(rms)), rtol=1e-14)
        np.testing.assert_allclose(step["v"], np.concatenate([f * step["v_unclipped"][a:b] for f, (a, b) in zip(step["rms_clip_factors"], groups)]), rtol=1e-14)
        np.testing.assert_allclose(step["s_q"], -0.01 * step["v"], rtol=1e-14)
        assert step["inner_steps"].shape == (2, net.n_params) and np.array_equal(step["inner_steps"][-1], step["s"])
        # factored Kronecker sum: pi of (Abar + alpha A_k, Gbar + alpha G_k) per block (§5.2, §5.5)
        for p in (0, 1):
            A, G = (step[f"averaged.{p}.{f}"] + 0.01 * step[f"current.{p}.{f}"] for f in "AG")
            assert step["pi"][p] == pytest.approx(np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G))), rel=1e-13)


# ---------------------------------------------------------------------------- compare
def test_compare_passes_on_itself_and_names_the_first_perturbed_step_and_quantity(paper_q, tmp_path, capsys):
    save(paper_q, tmp_path / "ref")
    assert compare(paper_q, paper_q).first_failure(0.0) is None
    assert kldwrm(["trajectory", "compare", str(tmp_path / "ref"), str(tmp_path / "ref")]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and all(f"{k:>5}  ghat" in out for k in range(6))  # every step and quantity is printed
    save(edited(paper_q, lambda k, step: step.update(ghat=step["ghat"] * (1 + 1e-6)) if k == 3 else None), tmp_path / "cand")
    assert kldwrm(["trajectory", "compare", str(tmp_path / "ref"), str(tmp_path / "cand"), "--rtol", "1e-8"]) == 1
    assert "first exceeds rtol 1e-08 at step 3, quantity 'ghat'" in capsys.readouterr().out
    with pytest.raises(AssertionError, match=re.escape("at step 3, quantity 'ghat': relative error 1.000e-06")):
        assert_trajectory_close(tmp_path / "ref", tmp_path / "cand", rtol=1e-8)
    assert_trajectory_close(paper_q, tmp_path / "cand", rtol=1e-5)


def test_compare_fails_on_missing_steps_or_a_different_layout(paper_q):
    shorter = Trajectory(dict(paper_q.manifest, steps=4), paper_q.steps[:4])
    with pytest.raises(AssertionError, match="step 4, quantity 'steps'"):
        assert_trajectory_close(paper_q, shorter)
    layout = [dict(t, offset=t["offset"] + 1) for t in paper_q.manifest["theta_layout"]]
    with pytest.raises(AssertionError, match="quantity 'theta layout'"):
        assert_trajectory_close(paper_q, Trajectory(dict(paper_q.manifest, theta_layout=layout), paper_q.steps))


def _scale_factors(trajectory, a, g, pi=1.0):
    def edit(k, step):
        for key in step:
            if key.endswith(".0.A"):
                step[key] = a * step[key]
            elif key.endswith(".0.G"):
                step[key] = g * step[key]
        if "pi" in step:  # every block built from layer 0's factors (its weight and bias blocks)
            step["pi"][[b["factors"] == 0 for b in trajectory.manifest["blocks"]]] *= pi

    return edited(trajectory, edit)


def test_factors_compare_as_kronecker_products(paper_q):
    assert_trajectory_close(paper_q, _scale_factors(paper_q, 2.0, 0.5), rtol=1e-13)  # the scale moved between A and G
    assert_trajectory_close(paper_q, _scale_factors(paper_q, -1.0, -1.0), rtol=1e-13)
    with pytest.raises(AssertionError, match=re.escape("step 0, quantity 'current G(x)A layer 0 weight': relative error 1.000e+00")):
        assert_trajectory_close(paper_q, _scale_factors(paper_q, 2.0, 1.0))
    _, factored = recorded("kfac", steps=2, damping_style="factored")  # pi moves with the split: pi(2A, G/2) = 2 pi(A, G)
    assert_trajectory_close(factored, _scale_factors(factored, 2.0, 0.5, pi=2.0), rtol=1e-13)
    with pytest.raises(AssertionError, match="step 0, quantity 'pi'"):
        assert_trajectory_close(factored, _scale_factors(factored, 2.0, 0.5))


def test_eigenvectors_compare_up_to_sign_and_eigenvalues_as_products():
    _, trajectory = recorded("kfac", steps=2, eigen=True)
    flipped = edited(trajectory, lambda k, step: [step[key].__imul__(np.where(np.arange(step[key].shape[1]) % 2, -1.0, 1.0)) for key in step if key.endswith("vectors")])
    rescaled = edited(trajectory, lambda k, step: [step[key].__imul__(3.0 if ".A." in key else 1 / 3.0) for key in step if key.endswith("values")])
    assert_trajectory_close(trajectory, flipped, rtol=1e-14)
    assert_trajectory_close(trajectory, rescaled, rtol=1e-14)
    with pytest.raises(AssertionError, match=re.escape("step 0, quantity 'eigen.1.A.vectors'")):
        assert_trajectory_close(trajectory, edited(trajectory, lambda k, step: step["eigen.1.A.vectors"].__setitem__((0, 0), 2.0)))


def test_kron_error_equals_the_error_of_the_formed_products():
    rng = np.random.default_rng(0)
    A1, G1 = rng.standard_normal((4, 4)), rng.standard_normal((3, 3))
    for A2, G2 in [(A1 + 1e-3 * rng.standard_normal((4, 4)), G1 - 2e-3 * rng.standard_normal((3, 3))), (-0.5 * A1, 2 * G1 + 0.1), (rng.standard_normal((4, 4)), G1)]:
        direct = np.linalg.norm(np.kron(G1, A1) - np.kron(G2, A2)) / np.linalg.norm(np.kron(G1, A1))
        assert kron_error(A1, G1, A2, G2) == pytest.approx(direct, rel=1e-9)
    assert kron_error(A1, G1, -7.0 * A1, G1 / -7.0) < 1e-15
    Q = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    assert sign_invariant_error(Q, Q * np.array([1, -1, 1, -1, -1])) == 0.0
    assert sign_invariant_error(Q, Q[:, ::-1]) > 0.1


# ---------------------------------------------------------------------------- what the failures say
def test_a_different_theta_layout_names_the_tensor_and_both_shapes(paper_q):
    """A bias written as (5, 1) instead of (5,): the same offsets, another shape."""
    layout = [dict(name=f"{t['layer']}.{t['name']}", shape=t["shape"] + [1] if t["name"] == "bias" else t["shape"], offset=t["offset"]) for t in paper_q.manifest["theta_layout"]]
    cand = Trajectory(dict(paper_q.manifest, theta_layout=layout), paper_q.steps)
    expected = "tensor 1: '0.bias' shape (5, 1) at offset 30 in the candidate, 'bias' of layer 0 shape (5,) at offset 30 in the reference"
    with pytest.raises(AssertionError, match=re.escape(f"quantity 'theta layout': relative error inf > rtol 1e-08 ({expected})")):
        assert_trajectory_close(paper_q, cand)
    fewer = Trajectory(dict(paper_q.manifest, theta_layout=paper_q.manifest["theta_layout"][:3]), paper_q.steps)
    assert compare(paper_q, fewer).rows[0].detail == "3 tensors in the candidate, 4 in the reference"


def test_shape_mismatches_name_the_array_and_both_shapes(paper_q):
    no_homogeneous = edited(paper_q, lambda k, step: [step.__setitem__(key, step[key][:-1, :-1]) for key in list(step) if key.endswith(".0.A")])
    row = compare(paper_q, no_homogeneous).first_failure(1e-8)
    assert (row.step, row.quantity, row.detail) == (0, "current G(x)A layer 0 weight", "current.0.A: shape (6, 6) in the candidate, (7, 7) in the reference")
    column = edited(paper_q, lambda k, step: step.update(g=step["g"][:, None]))
    row = compare(paper_q, column).first_failure(1e-8)
    assert (row.step, row.quantity, row.detail) == (0, "g", "shape (59, 1) in the candidate, (59,) in the reference")
    late = edited(paper_q, lambda k, step: step.pop("kl_clip_factor") if k == 2 else None)
    row = compare(paper_q, late).first_failure(1e-8)
    assert (row.step, row.quantity, row.detail) == (2, "kl_clip_factor", "recorded at this step by the reference only")
    unrefreshed = edited(paper_q, lambda k, step: [step.pop(key) for key in list(step) if key.startswith("current.1")] if k == 2 else None)
    row = compare(paper_q, unrefreshed).first_failure(1e-8)
    assert (row.step, row.quantity, row.detail) == (2, "current G(x)A layer 1 weight", "the candidate does not record current.1.A and current.1.G at this step")
    with pytest.raises(AssertionError, match=re.escape("(current.0.A: shape (6, 6) in the candidate, (7, 7) in the reference)")):
        assert_trajectory_close(paper_q, no_homogeneous)


def test_candidate_quantities_the_reference_lacks_are_reported_with_a_guess(paper_q, tmp_path, capsys):
    renamed = edited(paper_q, lambda k, step: step.update(nu=step.pop("kl_clip_factor"), ghta=step["ghat"], eigen_values=np.ones(3)))
    notes = compare(paper_q, renamed).not_compared
    assert notes == (
        "unknown quantity 'eigen_values' in the candidate (not compared)",
        "unknown quantity 'ghta' in the candidate; did you mean 'ghat'? (not compared)",
        "unknown quantity 'nu' in the candidate; did you mean 'kl_clip_factor'? (not compared)",
    )
    with pytest.warns(UserWarning) as caught:
        assert_trajectory_close(paper_q, renamed)
    assert [str(warning.message) for warning in caught] == list(notes)
    with pytest.raises(AssertionError, match="unknown quantity 'nu'"):
        assert_trajectory_close(paper_q, renamed, strict=True)
    save(paper_q, tmp_path / "ref")
    save(renamed, tmp_path / "cand")
    assert kldwrm(["trajectory", "compare", str(tmp_path / "ref"), str(tmp_path / "cand")]) == 0
    assert "warning: unknown quantity 'nu' in the candidate; did you mean 'kl_clip_factor'?" in capsys.readouterr().out
    assert kldwrm(["trajectory", "compare", str(tmp_path / "ref"), str(tmp_path / "cand"), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "error: unknown quantity 'nu'" in out and "FAIL (--strict)" in out
    eigen_free, with_pi = recorded("kfac", steps=2)[1], recorded("kfac", steps=2, damping_style="factored")[1]
    assert compare(eigen_free, with_pi).not_compared == ("quantity 'pi' of the candidate is not recorded by the reference (not compared)",)


def test_the_average_holds_between_the_steps_that_record_it(paper_q):
    """kldwrm_ref stores Mbar on refresh steps only; a candidate that writes it every step is
    compared with the last stored one, and one whose average moves between refreshes fails there."""
    assert "averaged.0.A" not in paper_q.steps[1] and "averaged.0.A" in paper_q.steps[2]
    every_step = edited(paper_q, lambda k, step: step.update({key: value for key, value in paper_q.steps[k - k % 2].items() if key.startswith("averaged.")}))
    assert all("averaged.0.A" in step for step in every_step.steps)
    assert_trajectory_close(paper_q, every_step, rtol=0)
    drifting = edited(every_step, lambda k, step: step.update({"averaged.1.G": 1.01 * step["averaged.1.G"]}) if k == 3 else None)
    with pytest.raises(AssertionError, match=re.escape("at step 3, quantity 'averaged G(x)A layer 1 weight'")):
        assert_trajectory_close(paper_q, drifting)


def test_a_separately_recorded_bias_g_is_compared_when_present(paper_q):
    """A dense layer's bias block is G (x) A[k, k]; a candidate may record its own G_bias (and A_bias)."""
    def split(scale_g):
        def edit(k, step):
            for key in [key for key in step if key.endswith(".G") and key.startswith(("current.", "averaged."))]:
                prefix = key[:-2]
                step[f"{prefix}.G_bias"] = scale_g * 2.0 * step[key] * step[f"{prefix}.A"][-1, -1]
                step[f"{prefix}.A_bias"] = np.array([[0.5]])
        return edited(paper_q, edit)

    comparison = compare(paper_q, split(1.0))
    assert comparison.first_failure(1e-13) is None and comparison.not_compared == ()
    with pytest.raises(AssertionError, match=re.escape("at step 0, quantity 'current G(x)A layer 0 bias'")):
        assert_trajectory_close(paper_q, split(1.001))


# ---------------------------------------------------------------------------- refusals
def test_an_npz_holding_an_object_array_is_refused(paper_q, tmp_path, capsys):
    save(paper_q, tmp_path / "t")
    with open(tmp_path / "t" / "step-00001.npz", "wb") as fh:
        np.savez(fh, **paper_q.steps[1], bad=np.array([{"code": "runs on unpickling"}], dtype=object))
    with pytest.raises(TrajectoryError, match=r"step-00001\.npz: entry 'bad' holds Python objects .* allow_pickle=False"):
        load(tmp_path / "t")
    with pytest.raises(SystemExit) as exit_:
        kldwrm(["trajectory", "compare", str(tmp_path / "t"), str(tmp_path / "t")])
    assert exit_.value.code == 2 and "holds Python objects" in capsys.readouterr().err


def test_malformed_trajectories_are_refused(paper_q, tmp_path):
    with pytest.raises(TrajectoryError, match=re.escape("no manifest.json")):
        load(tmp_path)
    save(paper_q, tmp_path / "t")
    (tmp_path / "t" / "step-00002.npz").unlink()
    with pytest.raises(TrajectoryError, match=re.escape("step-00002.npz is missing")):
        load(tmp_path / "t")
    with pytest.raises(TrajectoryError, match=re.escape("step 0 lacks ['g']")):
        save(edited(paper_q, lambda k, step: step.pop("g")), tmp_path / "u")
    with pytest.raises(TrajectoryError, match="quantity 'name' must be a numeric"):
        save(edited(paper_q, lambda k, step: step.update(name=np.array("text"))), tmp_path / "u")
    save(paper_q, tmp_path / "t")
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(dict(manifest, format="other-1")))
    with pytest.raises(TrajectoryError, match="format 'other-1' is not 'kldwrm-trajectory-1'"):
        load(tmp_path / "t")
    save(paper_q, tmp_path / "v")
    step_file = tmp_path / "v" / "step-00001.npz"
    data = bytearray(step_file.read_bytes())
    central = data.index(b"PK\x01\x02")  # the first central-directory header; bytes 10-11: compression
    assert data[central + 10 : central + 12] == b"\x08\x00"
    data[central + 10] ^= 1  # deflate (8) becomes deflate64 (9), which zipfile cannot read
    step_file.write_bytes(bytes(data))
    with pytest.raises(TrajectoryError, match=r"step-00001\.npz: not a readable \.npz file"):
        load(tmp_path / "v")


def test_record_refuses_what_it_cannot_record():
    net = MLP([6, 5, 4])
    with pytest.raises(ValueError, match=r"opt must be a curvature optimiser \(.*\) to be recorded; got 'sgd'"):
        record(optim.make("sgd", net), net.init(0), batches(1))
    with pytest.raises(ValueError, match="batches must hold at least one"):
        record(optim.make("kfac", net), net.init(0), [])
    with pytest.raises(ValueError, match="eigen=True needs the K-FAC platform"):
        record(optim.make("ea-cm", net), net.init(0), batches(1), eigen=True)
    with pytest.raises(ValueError, match="data must be plain JSON values"):
        record(optim.make("kfac", net), net.init(0), batches(1), data={"rows": np.arange(3)})


def test_export_refuses_bad_arguments(tmp_path, capsys):
    base = ["trajectory", "export", "--optimizer", "kfac", "--architecture", "6-5-10", "--preset", "paper", "--synthetic", "--out", str(tmp_path / "t")]
    for extra, message in [(["--steps", "0"], "--steps must be an integer >= 1"), (["--steps", "1", "--hyper", "dampin=0.1"], "unknown hyperparameter(s) ['dampin']"), (["--steps", "1", "--batch", "5000"], "--batch must be in [1, 2000]")]:
        with pytest.raises(SystemExit) as exit_:
            kldwrm(base + extra)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------------------- command line
def _mlp_pass(sizes, theta, X, y, fisher):
    """Loss, gradient and every layer's K-FAC factors (A, G) of a ReLU MLP in plain numpy (§1.1,
    §5.1): A = mean [a; 1][a; 1]^T, G = mean delta delta^T over the per-sample pre-activation
    cotangents delta of the output cotangent pi - e_y (empirical), or sum_c pi_c delta_c delta_c^T
    over every class c (exact)."""
    layers, pos = [], 0
    for n_in, n_out in itertools.pairwise(sizes):
        layers.append((theta[pos : pos + n_in * n_out].reshape(n_out, n_in), theta[pos + n_in * n_out : pos + n_in * n_out + n_out]))
        pos += n_in * n_out + n_out
    a, inputs, preacts = X, [], []
    for l, (W, b) in enumerate(layers):
        inputs.append(a)
        preacts.append(a @ W.T + b)
        a = np.maximum(preacts[-1], 0.0) if l + 1 < len(layers) else preacts[-1]
    pi = np.exp(a - a.max(axis=1, keepdims=True))
    pi /= pi.sum(axis=1, keepdims=True)
    n, eye = len(y), np.eye(sizes[-1])

    def cotangents(top):  # per layer, the per-sample d loss_i / d u_l of the output cotangent ``top``
        deltas, delta = [], top
        for l in reversed(range(len(layers))):
            deltas.insert(0, delta)
            delta = (delta @ layers[l][0]) * (preacts[l - 1] > 0) if l else None
        return deltas

    empirical = cotangents(pi - eye[y])
    g = np.concatenate([part for d, x in zip(empirical, inputs) for part in ((d.T @ x).ravel() / n, d.sum(axis=0) / n)])
    factors = []
    for l, x in enumerate(inputs):
        xbar = np.hstack([x, np.ones((n, 1))])
        if fisher == "empirical":
            G = empirical[l].T @ empirical[l] / n
        else:
            G = sum((pi[:, c, None] * cotangents(pi - eye[c])[l]).T @ cotangents(pi - eye[c])[l] for c in range(sizes[-1])) / n
        factors.append((xbar.T @ xbar / n, G))
    return -np.mean(np.log(pi[np.arange(n), y])), g, factors


def _paper_cnn_spec(mask):
    return [("conv", 1, 5, 5, 1, 0), ("pool", 2), ("relu",), ("conv", 5, 7, 5, 1, 0), ("pool", 2), ("relu",), ("flatten",), ("dense", 112, 30), ("relu",), ("dropout", mask), ("dense", 30, 10)]


def _paper_cnn_pass(theta, X, y, mask, fisher, rng):
    """The paper CNN through tests/reference_net.py (its own convolution, pooling and unpacking):
    loss, three directional derivatives g.u by complex step, and the last layer's (A, G)."""
    spec = _paper_cnn_spec(mask)
    X = X.reshape(len(X), 1, 28, 28)
    loss = float(ref.cnn_mean_loss(spec, theta.astype(complex), X, y).real)
    directions = rng.standard_normal((3, theta.size))
    slopes = [ref.cnn_mean_loss(spec, theta + 1j * ref.H * u, X, y).imag / ref.H for u in directions]
    hidden = ref.cnn_logits(spec[:-1], theta[: theta.size - 310], X).real  # the last Dense(30, 10) takes 310 parameters
    z = hidden @ theta[-310:-10].reshape(10, 30).T + theta[-10:]
    pi = np.exp(z - z.max(axis=1, keepdims=True))
    pi /= pi.sum(axis=1, keepdims=True)
    n, eye = len(y), np.eye(10)
    hbar = np.hstack([hidden, np.ones((n, 1))])
    if fisher == "empirical":
        G = (pi - eye[y]).T @ (pi - eye[y]) / n
    else:
        G = sum((pi[:, c, None] * (pi - eye[c])).T @ (pi - eye[c]) for c in range(10)) / n
    return loss, directions, np.array(slopes), (hbar.T @ hbar / n, G)


def _dense_kfac_solve(factors, d, eta, floor):
    """(blockdiag of the separate-bias blocks + eta I)^{-1} d with dense matrices (§5.2, §5.3): per
    layer W's block G (x) A[:k, :k] and b's G A[k, k], the factors' eigenvalues <= floor set to 0."""
    blocks = []
    for A, G in factors:
        A, G = _floored(A, floor), _floored(G, floor)
        blocks += [np.kron(G, A[:-1, :-1]), G * A[-1, -1]]
    size = sum(len(m) for m in blocks)
    matrix, start = np.zeros((size, size)), 0
    for m in blocks:
        matrix[start : start + len(m), start : start + len(m)] = m
        start += len(m)
    return np.linalg.solve(matrix + eta * np.eye(size), d)


EXPORTS = [
    ("kfac", "20-8-10", "paper", 4), ("so-kld-wrm", "20-8-10", "paper", 4), ("q-kld-wrm", "20-8-10", "paper", 4), ("qe-kld-wrm", "20-8-10", "paper", 4),
    ("q-kld-wrm", "20-8-10", "theory", 3), ("qe-kld-wrm", "20-8-10", "theory", 3), ("kfac", "paper-cnn", "paper", 2), ("qe-kld-wrm", "paper-cnn", "theory", 2),
]


@pytest.mark.parametrize("name, architecture, preset, steps", EXPORTS)
def test_cli_exports_hold_the_values_of_an_independent_recomputation(tmp_path, name, architecture, preset, steps):
    """Every export's loss, g and s against a recomputation from theta_k and the recorded batch
    (plain numpy, or tests/reference_net.py for the CNN); the fresh and averaged factors of the
    last layer; d, the clips and s from the recorded directions; SO's ghat from the recorded g;
    for K-FAC and SO the whole preconditioned direction, replayed with dense matrices."""
    out = tmp_path / "t"
    hyper = ["inner_steps=2", "period=2", "kl_clip=1e-3", "step_size=0.05"] + (["rms_clip=0.05"] if preset == "paper" else [])
    assert kldwrm(["trajectory", "export", "--optimizer", name, "--architecture", architecture, "--preset", preset, "--steps", str(steps), "--batch", "24", "--synthetic", "--hyper", *hyper, "--out", str(out)]) == 0
    trajectory = load(out)
    manifest, h = trajectory.manifest, trajectory.manifest["hyper"]
    assert manifest["steps"] == steps and manifest["optimizer"] == name and manifest["preset"] == preset
    assert set(h) - {"platform", "preset", "backend"} | set(manifest["hyper_ignored"]) == set(FIELDS) and not set(h) & set(manifest["hyper_ignored"])
    cnn = architecture == "paper-cnn"
    rho, wd, alpha, fisher = h["rho"], h["weight_decay"], h["step_size"], h["fisher_type"]
    last = 3 if cnn else 1  # the last Dense layer among the parametrised layers
    rng = np.random.default_rng(0)
    assert np.array_equal(trajectory.steps[0]["theta"], (paper_cnn() if cnn else MLP([20, 8, 10])).init(0))
    average = None
    for k, step in enumerate(trajectory.steps):
        theta, X, y = step["theta"], step["X"], step["y"]
        if cnn:
            loss, directions, slopes, factors = _paper_cnn_pass(theta, X, y, step["dropout.9"], fisher, rng)
            np.testing.assert_allclose(directions @ step["g"], slopes, rtol=1e-11, atol=1e-15)
            current = factors
        else:
            loss, g, layers = _mlp_pass([20, 8, 10], theta, X, y, fisher)
            np.testing.assert_allclose(step["g"], g, rtol=1e-12, atol=1e-16)
            current = layers[last]
        assert float(step["loss"]) == pytest.approx(loss, rel=1e-13)
        assert bool(step["refreshed"]) == (k % 2 == 0)
        if k % 2 == 0:  # refresh: the fresh estimate, and the average Mbar = rho Mbar + (1 - rho) M_k (§2.1)
            for f, expected in zip("AG", current):
                np.testing.assert_allclose(step[f"current.{last}.{f}"], expected, rtol=1e-11, atol=1e-15)
            if not cnn:
                average = layers if average is None else [(rho * A + (1 - rho) * Ac, rho * G + (1 - rho) * Gc) for (A, G), (Ac, Gc) in zip(average, layers)]
                for p, pair in enumerate(average):
                    for f, expected in zip("AG", pair):
                        np.testing.assert_allclose(step[f"averaged.{p}.{f}"], expected, rtol=1e-11, atol=1e-15)
        else:
            assert not any(key.startswith(("current.", "averaged.")) for key in step)
        if name == "so-kld-wrm":  # ghat_k = g_k - rho g_{k-1} (constant alpha, §4.2)
            np.testing.assert_allclose(step["ghat"], step["g"] - (rho * trajectory.steps[k - 1]["g"] if k else 0), rtol=1e-13, atol=1e-17)
        elif name == "kfac":
            np.testing.assert_array_equal(step["ghat"], step["g"])
        np.testing.assert_allclose(step["d"], step["ghat"] + wd * theta, rtol=1e-14, atol=1e-18)
        if name in ("kfac", "so-kld-wrm") and not cnn:
            assert h["bias"] == "separate"
            np.testing.assert_allclose(step["v_unclipped"], _dense_kfac_solve(average, step["d"], h["damping"] + wd, h["eig_floor"]), rtol=1e-9)
        v = step["v_unclipped"].copy()
        if "rms_clip_factors" in step:
            for factor, (a, b) in zip(step["rms_clip_factors"], manifest["rms_clip_groups"]):
                assert factor == pytest.approx(min(1.0, 0.05 / (np.linalg.norm(v[a:b]) / np.sqrt(b - a))), rel=1e-12)
                v[a:b] *= factor
        np.testing.assert_allclose(step["v"], v * float(step.get("kl_clip_factor", 1.0)), rtol=1e-14, atol=1e-18)
        q_step = -alpha * step["v"]
        if "inner_steps" in step:
            np.testing.assert_allclose(step["s_q"], q_step, rtol=1e-14, atol=1e-18)
            np.testing.assert_array_equal(step["s"], step["inner_steps"][-1])
        else:
            np.testing.assert_allclose(step["s"], q_step, rtol=1e-14, atol=1e-18)
        if k + 1 < steps:
            np.testing.assert_allclose(step["s"], trajectory.steps[k + 1]["theta"] - theta, rtol=0, atol=4e-16 * np.abs(theta).max())
    assert ("inner_steps" in trajectory.steps[-1]) == (name == "qe-kld-wrm")
    assert max(float(step["kl_clip_factor"]) for step in trajectory.steps) < 1  # the clip was active


def test_the_docs_show_the_worked_example_verbatim():
    source = (Path(__file__).parent / "test_trajectory_torch.py").read_text()
    start, end = "# --- worked example: start\n", "# --- worked example: end"
    example = source[source.index(start) + len(start) : source.index(end)].strip()
    assert example in (Path(__file__).parents[1] / "docs" / "trajectory-format.md").read_text()


@pytest.mark.mnist
def test_cli_export_on_mnist_records_the_rows_it_describes(tmp_path):
    assert kldwrm(["trajectory", "export", "--optimizer", "kfac", "--architecture", "784-8-10", "--preset", "paper", "--steps", "2", "--batch", "64", "--seed", "1", "--out", str(tmp_path / "t")]) == 0
    trajectory, mnist = load(tmp_path / "t"), load_mnist()
    assert trajectory.manifest["data"]["source"] == "mnist"
    order = np.random.default_rng([1, 1]).permutation(60000)  # epoch 1 of seed 1
    for k, step in enumerate(trajectory.steps):
        rows = order[64 * k : 64 * (k + 1)]
        assert trajectory.manifest["data"]["indices"][k] == rows.tolist()
        np.testing.assert_array_equal(step["X"], mnist.X_train[rows])
        np.testing.assert_array_equal(step["y"], mnist.y_train[rows])


def test_pi_of_the_exact_kronecker_sum_is_that_of_the_averaged_factors():
    _, trajectory = recorded("q-kld-wrm", preset="theory", steps=2)  # kron_sum="exact" damps Mbar with pi (§5.5)
    for step in trajectory.steps:
        for p in (0, 1):
            A, G = step[f"averaged.{p}.A"], step[f"averaged.{p}.G"]
            assert step["pi"][p] == pytest.approx(np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G))), rel=1e-13)
