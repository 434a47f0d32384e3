"""kldwrm_ref: reference implementation of "Rethinking Exponential Averaging of the Fisher".

The mathematics is in docs/theory.md (docstrings cite its sections as §N.M) and the conventions an
implementer must match in docs/conventions.md.  The package follows the pipeline:

- :mod:`kldwrm_ref.backends` - the array kernels (NumPy twins, Numba-CPU, numba-cuda);
- :mod:`kldwrm_ref.model` - layers and networks with hand-written backprop (:class:`MLP`, :class:`Network`);
- :mod:`kldwrm_ref.curvature` - Fisher, K-FAC, inverses, exponential averaging, estimators;
- :mod:`kldwrm_ref.optim` - the optimisers (optax-style ``init`` / ``step``);
- :mod:`kldwrm_ref.theory`, :mod:`kldwrm_ref.experiments`, :mod:`kldwrm_ref.bench` - the checks,
  the MNIST experiments and the benchmarks; :mod:`kldwrm_ref.data` - MNIST without internet;
- :mod:`kldwrm_ref.trajectory`, :mod:`kldwrm_ref.testing` - per-step reference trajectories and the
  assertion that compares another implementation's with them (docs/trajectory-format.md).
"""

__version__ = "0.2.0"

from kldwrm_ref.model import MLP, Network

__all__ = ["MLP", "Network", "__version__"]
