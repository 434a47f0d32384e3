"""Fixed-seed trajectories of every optimiser, stored once and compared on every test run.

``tests/data/trajectories.npz`` holds the iterates computed by the code as it was before the
package was reorganised into model / curvature / optim (and after the paper-preset fidelity fix);
``test_regression.py`` recomputes them through the public API and requires agreement to 1e-12.

The store says how it was made: its ``provenance`` entry (a JSON string) names the commit whose
code computed the arrays, the command and the reason.  Regenerating is a deliberate act that a
test run cannot do: only ``python tests/regression_trajectories.py --regenerate "REASON"`` writes
the store, and only from a clean working tree, so that the commit it records is the code that
computed the arrays.  Do it only when a change of numerics is intended, and say why.
"""

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from kldwrm_ref import MLP, optim
from kldwrm_ref.data import synthetic_classification

STORE = Path(__file__).parent / "data" / "trajectories.npz"
PROVENANCE = "provenance"  # the store's entry saying how it was made (a JSON object as a string)
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


def read_provenance(path: Path = STORE) -> dict:
    with np.load(path, allow_pickle=False) as stored:
        return json.loads(str(stored[PROVENANCE]))


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, check=True).stdout.strip()


def regenerate(reason: str) -> dict:
    """Recompute every trajectory with the code of the current commit and write the store with its provenance."""
    if _git("status", "--porcelain", "--untracked-files=no"):
        raise SystemExit("regression_trajectories: commit your changes first: the store records the commit whose code computed it")
    provenance = dict(
        commit=_git("rev-parse", "HEAD"), command=f"python tests/regression_trajectories.py --regenerate {reason!r}", reason=reason,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), numpy=np.__version__,
    )
    STORE.parent.mkdir(exist_ok=True)
    np.savez(STORE, **all_trajectories(), **{PROVENANCE: np.array(json.dumps(provenance))})
    return provenance


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regenerate", metavar="REASON", required=True, help="why the numerics changed on purpose (recorded in the store)")
    args = parser.parse_args()
    if not args.regenerate.strip():
        parser.error("--regenerate needs a reason")
    print(f"wrote {STORE}: {regenerate(args.regenerate)}", file=sys.stderr)
