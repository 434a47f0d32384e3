"""The optimisers' fixed-seed trajectories equal those stored before the package reorganisation."""

import numpy as np
import pytest

from regression_trajectories import CASES, STORE, trajectory


@pytest.mark.parametrize("key, name, platform, preset, overrides", CASES, ids=[case[0] for case in CASES])
def test_trajectory_unchanged(key, name, platform, preset, overrides):
    with np.load(STORE, allow_pickle=False) as stored:
        expected = stored[key]
    got = trajectory(name, platform, preset, overrides)
    scale = np.linalg.norm(np.diff(expected, axis=0), axis=1).max()  # relative to the longest step
    assert np.max(np.abs(got - expected)) <= 1e-12 * max(scale, 1.0), key
