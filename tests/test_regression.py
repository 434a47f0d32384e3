"""The optimisers' fixed-seed trajectories equal those stored before the package reorganisation.

The store is never written by a test run: it records the commit that computed it, and only a
deliberate ``python tests/regression_trajectories.py --regenerate REASON`` replaces it.
"""

import re
import subprocess
import sys

import numpy as np
import pytest

from regression_trajectories import CASES, PROVENANCE, STORE, read_provenance, trajectory


@pytest.mark.parametrize("key, name, platform, preset, overrides", CASES, ids=[case[0] for case in CASES])
def test_trajectory_unchanged(key, name, platform, preset, overrides):
    with np.load(STORE, allow_pickle=False) as stored:
        expected = stored[key]
    got = trajectory(name, platform, preset, overrides)
    scale = np.linalg.norm(np.diff(expected, axis=0), axis=1).max()  # relative to the longest step
    assert scale > 1e-3, key  # a trajectory that does not move would compare equal to anything that stands still
    assert np.max(np.abs(got - expected)) <= 1e-12 * max(scale, 1.0), key


def test_the_store_holds_every_case_and_says_how_it_was_made():
    with np.load(STORE, allow_pickle=False) as stored:
        assert sorted(stored.files) == sorted([case[0] for case in CASES] + [PROVENANCE])
    provenance = read_provenance()
    assert re.fullmatch(r"[0-9a-f]{40}", provenance["commit"]), provenance
    assert provenance["command"].startswith("python tests/regression_trajectories.py") and provenance["reason"].strip()


def test_the_store_is_not_rewritten_without_a_deliberate_regenerate(tmp_path):
    """Running the generator as before (no --regenerate REASON) refuses and leaves the store as it was."""
    before = STORE.read_bytes()
    done = subprocess.run([sys.executable, str(STORE.parents[1] / "regression_trajectories.py")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--regenerate" in done.stderr
    assert STORE.read_bytes() == before
