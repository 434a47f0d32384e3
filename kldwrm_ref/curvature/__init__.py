"""The curvature engine (docs/theory.md §1-§2, §5).

- :mod:`~kldwrm_ref.curvature.fisher`: the dense Fisher (exact / Monte-Carlo / empirical) and its
  matrix-free operator;
- :mod:`~kldwrm_ref.curvature.kfac`: K-FAC factors, computed by looping over the layers, and blocks;
- :mod:`~kldwrm_ref.curvature.inverses`: the damped inverses and Kronecker-sum inverses;
- :mod:`~kldwrm_ref.curvature.linalg`: robust eigendecompositions and dense damped solves;
- :mod:`~kldwrm_ref.curvature.averaging`: exponential averaging and the wake weights;
- :mod:`~kldwrm_ref.curvature.estimators`: the dense and K-FAC platforms behind one protocol.
"""
