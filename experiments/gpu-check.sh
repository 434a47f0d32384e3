#!/usr/bin/env bash
# The GPU checks in one run, for a session that is lent a GPU (docs/gpu.md, "Running the GPU checks").
#
# Run from the repository root on the GPU machine.  Wheels the machine lacks travel in .whl/, which
# experiments/gpu-wheels.sh fills on a machine with a package index; results go to $OUT (default
# /tmp/kldwrm-gpu).  Each part has its own time limit, so one that hangs leaves the others their
# share: the hardware tests (about 4 min at most), then `kldwrm bench step` on the GPU with
# numba-cuda's default stream synchronisation before every kernel launch on a CuPy array, and again
# without it (NUMBA_CUDA_ARRAY_INTERFACE_SYNC=0, safe while CuPy and numba-cuda share the default
# stream).  The two bench runs write JSON with every number; their text goes to stdout too.  They
# skip the operation pass, whose counts are the same on every device (docs/performance.md).
set -uo pipefail
OUT=${OUT:-/tmp/kldwrm-gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kldwrm-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/kldwrm-site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export NUMBA_ENABLE_CUDASIM=0 PYTHONUNBUFFERED=1
kldwrm() { python3 -c 'import sys; from kldwrm_ref.cli import main; raise SystemExit(main(sys.argv[1:]))' "$@"; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import numpy, scipy, numba, numba_cuda, cupy, array_api_compat; print(*(f"{m.__name__} {m.__version__}" for m in (numpy, scipy, numba, numba_cuda, cupy, array_api_compat)))'
} 2>&1 | tee "$OUT/versions.txt"

echo "== hardware tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_backend.py -k "gpu or cuda or hardware" 2>&1 | tee "$OUT/tests.log"

bench=(bench step --architectures 784-256-10 paper-cnn --presets paper --dtypes float32 --backends cuda --no-scaling --no-operations)
echo "== kldwrm bench step, cuda, default stream synchronisation"
timeout 150 kldwrm "${bench[@]}" --json "$OUT/bench-cuda.json" 2>&1 | tee "$OUT/bench-cuda.txt"
echo "== kldwrm bench step, cuda, NUMBA_CUDA_ARRAY_INTERFACE_SYNC=0"
NUMBA_CUDA_ARRAY_INTERFACE_SYNC=0 timeout 150 kldwrm "${bench[@]}" --json "$OUT/bench-cuda-nosync.json" 2>&1 | tee "$OUT/bench-cuda-nosync.txt"
