"""Fixed-seed trajectories of every optimiser, stored once and compared on every test run.

``tests/data/trajectories.npz`` holds the iterates computed by the code as it was before the
package was reorganised into model / curvature / optim (and after the paper-preset fidelity fix);
``test_regression.py`` recomputes them through the public API and requires agreement to 1e-12.
Run ``python tests/regression_trajectories.py`` only when a change of numerics is intended.
"""

from pathlib import Path

import numpy as np

from kldwrm_ref import MLP, optim
from kldwrm_ref.data import synthetic_classification

STORE = Path(__file__).parent / "data" / "trajectories.npz"
STEPS = 8
FORCED_CLIPS = dict(period=3, kl_clip=1e-3, rms_clip=0.1, step_size=0.05)

# (key, optimiser name, platform, preset, overrides)
CASES = [
    ("paper-kfac", "kfac", "kfac", "paper", FORCED_CLIPS),
    ("paper-so", "so-kld-wrm", "kfac", "paper", FORCED_CLIPS),
    ("paper-q", "q-kld-wrm", "kfac", "paper", FORCED_CLIPS),
    ("paper-qe", "qe-kld-wrm", "kfac", "paper", FORCED_CLIPS),
    ("paper-q-exact-correction", "q-kld-wrm", "kfac", "paper", dict(FORCED_CLIPS, correction="exact", rms_clip_per="layer", clip_order="sequential")),
    ("theory-kfac", "kfac", "kfac", "theory", dict(step_size=0.1, damping=0.05)),
    ("theory-kfac-factored-explicit", "kfac", "kfac", "theory", dict(step_size=0.1, damping=0.05, damping_style="factored-explicit", bias="separate")),
    ("theory-so-kfac", "so-kld-wrm", "kfac", "theory", dict(step_size=0.1, damping=0.05, fisher_type="mc", samples=2)),
    ("theory-q-kfac", "q-kld-wrm", "kfac", "theory", dict(step_size=0.1, damping=0.05)),
    ("theory-qe-kfac", "qe-kld-wrm", "kfac", "theory", dict(step_size=0.1, damping=0.05, inner_steps=3)),
    ("dense-ea-cm", "ea-cm", "dense", "theory", dict(step_size=0.1, damping=0.05, rho=0.9)),
    ("dense-ea-cm-mc", "ea-cm", "dense", "theory", dict(step_size=0.1, damping=0.05, fisher_type="mc", samples=3)),
    ("dense-so", "so-kld-wrm", "dense", "theory", dict(step_size=lambda k: 0.1 * (1 + 0.5 * np.sin(k)), damping=0.05)),
    ("dense-q", "q-kld-wrm", "dense", "theory", dict(step_size=0.1, damping=0.05)),
    ("dense-qe", "qe-kld-wrm", "dense", "theory", dict(step_size=0.1, damping=0.05, inner_steps=3)),
    ("sgd", "sgd", "dense", "theory", dict(step_size=0.3, momentum=0.9, weight_decay=0.01)),
]


def batches():
    X, y = synthetic_classification(STEPS * 32, 6, 4, seed=7)
    return [(X[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32]) for i in range(STEPS)]


def trajectory(name, platform, preset, overrides) -> np.ndarray:
    mlp = MLP([6, 5, 4], "tanh")
    opt = optim.make(name, mlp, platform=platform, preset=preset, backend="numpy", **overrides)
    theta = mlp.init(3)
    state = opt.init(theta)
    thetas = [theta]
    for X, y in batches():
        theta, state, _ = opt.step(theta, state, X, y)
        thetas.append(theta)
    return np.array(thetas)


def all_trajectories() -> dict[str, np.ndarray]:
    return {key: trajectory(name, platform, preset, overrides) for key, name, platform, preset, overrides in CASES}


if __name__ == "__main__":
    STORE.parent.mkdir(exist_ok=True)
    np.savez(STORE, **all_trajectories())
    print(f"wrote {STORE}")
