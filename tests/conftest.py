"""Test configuration.

- NUMBA_ENABLE_CUDASIM defaults to 1 so the numba-cuda kernels run on the simulator (set it to 0
  in the environment to run the same tests on a real GPU).  It must be set before numba is first
  imported, hence here.
- Hypothesis: the "ci" profile (selected when CI=true) is derandomised with bounded examples and
  no deadline; the "dev" profile is the same with more examples.
"""

import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=15, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
