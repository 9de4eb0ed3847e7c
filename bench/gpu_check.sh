#!/usr/bin/env bash
# GPU check for the dist8 CUDA kernels: build, bit-exactness tests, step benchmark.
# Usage: bench/gpu_check.sh OUTDIR      (finishes in well under 8 minutes)
set -u
OUT="${1:?usage: bench/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export DIST8_BUILD_DIR="${DIST8_BUILD_DIR:-/tmp/dist8-build}"  # keep OUTDIR to a few result files
PY="${PYTHON:-python3}"  # the GPU image's torch is under python3 (there may be no `python`)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Comparison anchors carried as wheels (bench/gpu_wheels.sh; the GPU machine cannot download).
if ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/wheels.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  echo "anchor wheels: $(ls .whl | tr '\n' ' ')" | tee -a "$OUT/wheels.log"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" > "$OUT/env.txt" 2>&1

echo "== build"
start=$(date +%s)
timeout 200 "$PY" -c "
from dist8.kernels import native
b = native.load_backend('cuda'); print('loaded', b.name)
" > "$OUT/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - start ))s" | tee -a "$OUT/build.log"

echo "== tests"
timeout 180 "$PY" -m pytest tests/test_kernels.py -k cuda- -q --maxfail=5 -p no:cacheprovider > "$OUT/test_kernels_cuda.log" 2>&1
echo "tests rc=$?" | tee -a "$OUT/test_kernels_cuda.log"
tail -3 "$OUT/test_kernels_cuda.log"

echo "== bench"
timeout 150 "$PY" bench/step.py --device cuda --sizes 16M,64M,256M --dtypes fp32,bf16 --reps 10 \
  --out "$OUT/step-cuda.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/bench.log"
tail -30 "$OUT/bench.log"

echo "== bench: GPT-2 small's 148 tensors (multi-tensor update: one launch per 24 tensors)"
timeout 45 "$PY" bench/step.py --device cuda --sizes gpt2 --dtypes fp32 --reps 10 --only dist8,fused,bitsandbytes \
  --out "$OUT/step-cuda-gpt2.json" > "$OUT/bench-gpt2.log" 2>&1
echo "bench gpt2 rc=$?" | tee -a "$OUT/bench-gpt2.log"
tail -8 "$OUT/bench-gpt2.log"
