#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the wheels the GPU machine lacks, for experiments/gpu-check.sh.
# That machine runs Python 3.12 with NumPy 2.5, beside which numba-cuda 0.30 does not import, and
# has no array-api-compat: carry NumPy 2.4 and array-api-compat (about 17 MB together).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "numpy>=2.4,<2.5" "array-api-compat>=1.9"
ls -l .whl
