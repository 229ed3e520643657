#!/usr/bin/env bash
# One pass on a GPU machine: build the extension with its CUDA kernels, run the backend tests on
# the GPU (Triton compiled, not interpreted; CUDA against the reference), then the benchmark grid.
# Logs go to $OUT (default /tmp/hnca-gpu); the end of each part is printed.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/hnca-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  nvcc --version | tail -2
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

echo "== build"
SECONDS=0
timeout 240 $PY -c "
from hnca_kernels.ops import _extension
from hnca_kernels import backends
print('extension:', _extension.load())
print('available on cuda:', [b for b in ('reference', 'triton', 'cuda') if backends.is_available(b, 'cuda')])
" 2>&1 | tee "$OUT/build.txt"
echo "build took ${SECONDS}s"

# (on a GPU the tests compile each Triton kernel at one tile per dtype and coding: ~30 compiles)
echo "== tests"
timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -p no:cacheprovider --maxfail=20 -rfE \
  tests/test_cpp.py tests/test_triton.py 2>&1 | tee "$OUT/tests.txt" | tail -25

echo "== benchmarks"
timeout "${BENCH_TIMEOUT:-240}" $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench.py --benchmark-enable \
  --benchmark-json="$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" | sed -n '/## hnca benchmark medians/,/peak RSS/p'
