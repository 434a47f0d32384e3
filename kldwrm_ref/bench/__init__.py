"""Benchmarks that print numbers: :mod:`.curvature`, :mod:`.kernels`, :mod:`.step` (``kldwrm bench``)."""
