#!/usr/bin/env bash
# GPU check for the dist8 CUDA kernels: load (or build), bit-exactness tests, step and memory benchmarks.
# Usage: bench/gpu_check.sh OUTDIR [flows|profile|tests|bench|memory|phases|cpu ...]
#   (default: all but phases, about 11 minutes; phases adds about 4). One device call runs at most 10
#   minutes, so a lease runs it in two: `flows tests cpu` (about 4 minutes on 2026-12-04's H200) and
#   `profile bench memory` (about 7).
#
# Made for a short GPU lease (issue 20): the kernels come prebuilt when .prebuilt/ is carried
# (bench/gpu_prebuild.sh, against the GPU machine's exact torch wheel; else they build here, ~1 min),
# the anchors' wheels come from .whl/ (bench/gpu_wheels.sh), and OUTDIR receives at most 8 files
# (the device tool returns 8): check.log (environment, build, test summary, tables), flows.log
# (tests/test_cuda_flows.py: optimizers, checkpoints, gradient release, FSDP2 and ShardedOptimizer over
# NCCL, HF Trainer and accelerate on the GPU), train.log (`dist8 train` on the GPU, stopped and resumed),
# ncu.txt (Nsight Compute on the update kernels), tests.log, results.tar (step-cuda-16M.json,
# step-cuda-256M.json, step-cuda-gpt2.json, gpu-memory.json, release-chunks-cuda.json (bench/release_chunks.py),
# ablation-host.json (part phases: bench/step_phases.py on the host CPU),
# clocks.csv: SM/memory clocks sampled during the benchmarks,
# step-cpu-host.json: the host CPU's step, issue 15), and dist8_cuda.so(.sources) when built here
# (carry them back as .prebuilt/ for a rerun).
set -u
OUT="${1:?usage: bench/gpu_check.sh OUTDIR [profile|tests|bench|memory|cpu ...]}"
shift
PARTS="${*:-flows profile tests bench memory cpu}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
LOG="$OUT/check.log"
export DIST8_BUILD_DIR="${DIST8_BUILD_DIR:-/tmp/dist8-build}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"  # the GPU image's torch is under python3 (there may be no `python`)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
say() { echo "$@" | tee -a "$LOG"; }
# Comparison anchors carried as wheels (the GPU machine cannot download).
if ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  say "anchor wheels: $(ls .whl | tr '\n' ' ')"
fi
nvidia-smi >> "$LOG" 2>&1 || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

say "== kernels"
start=$(date +%s)
LOAD="from dist8.kernels import native; b = native.load_backend('cuda'); print('loaded', b.name)"
rc=1
if [ -f .prebuilt/dist8_cuda.so ]; then  # one load: it is the check (a refused or broken library fails it)
  export DIST8_CUDA_PREBUILT="$PWD/.prebuilt/dist8_cuda.so"
  timeout 60 "$PY" -c "$LOAD" >> "$LOG" 2>&1 && rc=0 ||
    { say "prebuilt kernels refused or failed to load (above); building here"; unset DIST8_CUDA_PREBUILT; }
fi
if [ $rc -ne 0 ]; then
  timeout 300 "$PY" -c "$LOAD" >> "$LOG" 2>&1
  rc=$?
fi
say "kernels rc=$rc in $(( $(date +%s) - start ))s (DIST8_CUDA_PREBUILT=${DIST8_CUDA_PREBUILT:-unset})"
if [ -z "${DIST8_CUDA_PREBUILT:-}" ]; then  # built here: send it back for a rerun
  so=$(ls "$DIST8_BUILD_DIR"/dist8_cuda_*/dist8_cuda_*.so 2>/dev/null | head -1)
  [ -n "$so" ] && cp "$so" "$OUT/dist8_cuda.so" && "$PY" -c "from dist8.kernels.build import cuda_sources_digest as d; print(d())" > "$OUT/dist8_cuda.so.sources"
fi

if [[ " $PARTS " == *" flows "* ]]; then
  say "== flows: whole optimizers, checkpoints, gradient release, FSDP2 / ShardedOptimizer (NCCL, one rank), HF Trainer, accelerate"
  start=$(date +%s)
  timeout 180 "$PY" -m pytest tests/test_cuda_flows.py -q -rfE -n 0 -p no:cacheprovider > "$OUT/flows.log" 2>&1
  say "flows rc=$? in $(( $(date +%s) - start ))s"
  grep -E "^(FAILED|ERROR)|passed|failed|^E  " "$OUT/flows.log" | head -40 | tee -a "$LOG"
  # The reference training job on the GPU (NCCL world of one): its default config (dist8-zero2, fp32) and
  # the bf16 + 24-bit master + gradient release config, each stopped at step 20 and resumed from its checkpoint.
  for cfg in tiny-gpt tiny-gpt-bf16-release; do
    for half in "--stop-at 20" "--resume auto"; do
      start=$(date +%s)
      timeout 90 "$PY" -m dist8 train --config "configs/$cfg.yaml" --set train.steps=40 --set train.eval_every=20 \
        --set train.eval_batches=2 --set checkpoint.every=20 --set "checkpoint.dir=/tmp/gpu-train/$cfg/ck" \
        --set "output.dir=/tmp/gpu-train/$cfg/run" $half >> "$OUT/train.log" 2>&1
      say "train $cfg $half: rc=$? in $(( $(date +%s) - start ))s"
    done
  done
  grep -E "resumed from|final (train|val) loss|peak memory|opt state|Error|error" "$OUT/train.log" | tee -a "$LOG"
fi

if [[ " $PARTS " == *" profile "* ]]; then
  say "== profile: Nsight Compute on the fused update (16M values, block then warp kernel)"
  NCU="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
  timeout 90 "$NCU" --clock-control none -k regex:fused_update --launch-skip 2 --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    "$PY" bench/gpu_profile.py > "$OUT/ncu.txt" 2>&1
  say "profile rc=$?"
  grep -E "fused_update|Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Theoretical Occupancy|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|SM Frequency" \
    "$OUT/ncu.txt" | tee -a "$LOG"
fi

if [[ " $PARTS " == *" tests "* ]]; then
  say "== tests (every cuda-block / cuda-warp case: kernels, master weights, optimizers end to end vs the CPU)"
  start=$(date +%s)
  timeout 140 "$PY" -m pytest tests/test_kernels.py tests/test_kernels_master.py -k cuda- -q -rfE --maxfail=40 \
    -p no:cacheprovider > "$OUT/tests.log" 2>&1
  say "tests rc=$? in $(( $(date +%s) - start ))s"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -45 | tee -a "$LOG"
fi

if [[ " $PARTS " == *" bench "* ]]; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu --format=csv \
    -lms 500 > "$OUT/clocks.csv" 2>&1 &
  CLOCKS=$!
  for size in 16M 256M; do  # one file per size: a timeout keeps what finished
    say "== bench: one tensor of $size values, fp32 and bf16"
    timeout 90 "$PY" bench/step.py --device cuda --sizes $size --dtypes fp32,bf16 --reps 10 \
      --out "$OUT/step-cuda-$size.json" >> "$LOG" 2>&1
    say "bench $size rc=$?"
  done
  say "== bench: GPT-2 small's 148 tensors (multi-tensor update: one launch per 24 tensors)"
  timeout 50 "$PY" bench/step.py --device cuda --sizes gpt2 --dtypes fp32,bf16 --reps 10 \
    --only dist8,fused,bitsandbytes,FlashOptim --out "$OUT/step-cuda-gpt2.json" >> "$LOG" 2>&1
  say "bench gpt2 rc=$?"
  kill $CLOCKS 2>/dev/null
  say "SM clock during the benchmarks (MHz, min/median/max of samples): $(awk -F', ' 'NR>1{print $2+0}' "$OUT/clocks.csv" | sort -n | awk '{a[NR]=$1} END{print a[1], a[int((NR+1)/2)], a[NR]}')"
fi

if [[ " $PARTS " == *" memory "* ]]; then
  say "== memory: bytes/param during a training step (CUDA allocator peak)"
  timeout 60 "$PY" bench/gpu_memory.py --out "$OUT/gpu-memory.json" >> "$LOG" 2>&1
  say "memory rc=$?"
  say "== memory: what weight_grad_chunk costs in iteration time (8 x 4096 bf16, 4096 tokens)"
  timeout 60 "$PY" bench/release_chunks.py --device cuda --width 4096 --tokens 4096 --rounds 10 \
    --chunks 1048576 4194304 --out "$OUT/release-chunks-cuda.json" >> "$LOG" 2>&1
  say "release chunks rc=$?"
fi
if [[ " $PARTS " == *" phases "* ]]; then
  # What the conversions cost on the host CPU (bench/step_phases.py: ablation builds vs torch fused AdamW).
  say "== phases: the CPU step without its 8-bit conversions, host CPU, 2 threads"
  start=$(date +%s)
  OMP_NUM_THREADS=2 timeout 300 "$PY" bench/step_phases.py --maps dynamic --rounds 3 --out "$OUT/ablation-host.json" \
    >> "$LOG" 2>&1
  say "phases rc=$? in $(( $(date +%s) - start ))s"
fi
if [[ " $PARTS " == *" cpu "* ]]; then
  # Issue 15's CPU line measured on this host's CPU (model and ISA recorded in the file), held to 2
  # threads like the dev VM: one more CPU for the decision between judging the line on AVX-512
  # CPUs and changing the format. The dist8 kernels are compiled here for it (-march=native, ~20 s).
  say "== cpu: dist8 AdamW8bit step vs torch fused AdamW on the host CPU, 2 threads"
  grep -m1 "model name" /proc/cpuinfo | tee -a "$LOG"
  start=$(date +%s)
  OMP_NUM_THREADS=2 timeout 170 "$PY" bench/step.py --device cpu --sizes 16M,64M,gpt2 --dtypes fp32 --reps 10 \
    --only "dist8.optim.AdamW8bit,torch AdamW fused" --out "$OUT/step-cpu-host.json" >> "$LOG" 2>&1
  say "cpu rc=$? in $(( $(date +%s) - start ))s"
fi
# The device tool returns at most 8 files: the result files travel as one tar.
( cd "$OUT" && files=$(ls step-*.json ablation-*.json release-chunks-*.json gpu-memory.json clocks.csv 2>/dev/null; true) && [ -n "$files" ] &&
  tar -cf results.tar $files && rm -f $files )
grep -E "^ +(16M|64M|256M|GPT2|gpt2)|copy bandwidth|bytes/param|error" "$LOG" | tail -70
