#!/usr/bin/env bash
# Compile the CUDA kernels with nvcc for sm_80 and sm_90: object code only, no GPU and no
# linking needed. Skipped, with a message, where nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")"

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ]; then
    echo "check_cuda_build: nvcc not found, skipping the CUDA compile check"
    exit 0
fi
PYTHON="${PYTHON:-python}"
includes=$("$PYTHON" -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
print(' '.join('-isystem ' + p for p in include_paths() + [sysconfig.get_paths()['include']]))")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# A CPU-only torch ships the c10/cuda headers without the one its CUDA build generates; for this
# compile-only check, stand in for it (in a CUDA build it defines just this macro).
if ! "$PYTHON" -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
    mkdir -p "$out/shim/c10/cuda/impl"
    echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
    includes="$includes -isystem $out/shim"
fi
# shellcheck disable=SC2086
"$NVCC" -std=c++20 -O3 -c hnca_cuda.cu -o "$out/hnca_cuda.o" $includes \
    -DTORCH_EXTENSION_NAME=hnca_check -DTORCH_API_INCLUDE_EXTENSION_H \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    --expt-relaxed-constexpr \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
echo "check_cuda_build: hnca_cuda.cu compiles for sm_80 and sm_90"
