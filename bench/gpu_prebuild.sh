#!/usr/bin/env bash
# Build the CUDA kernels here, for a GPU machine whose short lease should not pay the 3-5 minute
# nvcc compile: against the exact torch wheel the GPU machine runs (its headers to compile, its
# libraries to link), for one architecture. Writes .prebuilt/dist8_cuda.so and, beside it,
# dist8_cuda.so.sources (the hash of csrc/ and of dist8's nvcc flags); dist8 loads it when
# DIST8_CUDA_PREBUILT names it and refuses it if either changed since (dist8/kernels/build.py).
#
#   bash bench/gpu_prebuild.sh path/to/torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl [arch=90]
#
# The wheel: `pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
# --platform manylinux_2_28_x86_64 torch==<the GPU machine's version> -d DIR`. .prebuilt/ is
# git-ignored; carry it with the GPU call (bench/gpu_check.sh falls back to a build there).
set -euo pipefail
WHEEL="${1:?usage: bench/gpu_prebuild.sh TORCH_CUDA_WHEEL [ARCH]}"
ARCH="${2:-90}"
cd "$(dirname "$0")/.."
ROOT="$PWD"
[ -f "$WHEEL" ] || { echo "gpu_prebuild.sh: $WHEEL: no such file (a torch wheel, see the header)" >&2; exit 2; }
unzip -l "$WHEEL" 'torch/lib/libtorch_cuda.so' > /dev/null 2>&1 ||
  { echo "gpu_prebuild.sh: $WHEEL is not a CUDA build of torch (no torch/lib/libtorch_cuda.so)" >&2; exit 2; }
TORCH_DIR="${DIST8_PREBUILD_CACHE:-/tmp/dist8-prebuild}/$(basename "$WHEEL" .whl)"
if [ ! -f "$TORCH_DIR/torch/lib/libtorch_cuda.so" ]; then
  mkdir -p "$TORCH_DIR"
  unzip -q -o "$WHEEL" 'torch/include/*' 'torch/lib/libc10.so' 'torch/lib/libc10_cuda.so' \
    'torch/lib/libtorch.so' 'torch/lib/libtorch_cpu.so' 'torch/lib/libtorch_cuda.so' -d "$TORCH_DIR"
fi
INC="$TORCH_DIR/torch/include"
grep -q "C++20 or later" "$INC/ATen/ATen.h" && STD=c++20 || STD=c++17
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$NVCC")")")}"
CUDART_DIR="$(dirname "$(find "$CUDA_HOME/lib64/" "$CUDA_HOME/lib/" /usr/local/cuda/lib64/ -name 'libcudart.so' 2>/dev/null | head -1)")"
mkdir -p .prebuilt
OBJ=.prebuilt/dist8_cuda.o
SO=.prebuilt/dist8_cuda.so
BUILD="import sys; sys.path.insert(0, '$ROOT'); from dist8.kernels import build"
# The CUDA build's own nvcc flags (torch's extension defaults + dist8's), as torch.utils.cpp_extension
# passes them to nvcc for a .cu source, with the ABI torch's wheels use.
read -r -a FLAGS <<< "$(python3 -c "$BUILD; print(' '.join(build.cuda_nvcc_flags()))")"
time "$NVCC" -c csrc/cuda/dist8_cuda.cu -o "$OBJ" -std="$STD" "${FLAGS[@]}" -D_GLIBCXX_USE_CXX11_ABI=1 \
  -DTORCH_API_INCLUDE_EXTENSION_H -Xcompiler -fPIC -gencode "arch=compute_${ARCH},code=sm_${ARCH}" \
  -diag-suppress 3306 -isystem "$INC" -isystem "$INC/torch/csrc/api/include" -I csrc/include
c++ "$OBJ" -shared -o "$SO" -L"$TORCH_DIR/torch/lib" -lc10 -lc10_cuda -ltorch_cpu -ltorch_cuda -ltorch \
  -L"$CUDART_DIR" -lcudart
rm -f "$OBJ"
python3 -c "$BUILD; print(build.cuda_sources_digest())" > "$SO.sources"
echo "$(basename "$WHEEL") sm_${ARCH}" >> "$SO.sources"
ls -la .prebuilt
