#!/usr/bin/env bash
# Single-node training with torchrun.
#   NPROC=2 launch/torchrun.sh --config configs/tiny-gpt.yaml --set train.steps=200
# Env: NPROC (processes, default 2), MASTER_PORT (default 29500), MAX_RESTARTS (default 0),
#      OMP_NUM_THREADS (default 1 on CPU). All arguments go to `dist8 train`
# (default --config configs/tiny-gpt.yaml when none is given).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-2}"
MASTER_PORT="${MASTER_PORT:-29500}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
args=("$@")
if [[ " ${args[*]-} " != *" --config "* && " ${args[*]-} " != *" -c "* ]]; then
  args=(--config configs/tiny-gpt.yaml "${args[@]}")
fi
if (( MAX_RESTARTS > 0 )); then
  # Restarts resume from the newest complete checkpoint.
  [[ " ${args[*]} " == *" --resume "* ]] || args+=(--resume auto)
fi
exec torchrun --nnodes=1 --nproc_per_node="$NPROC" --master_port="$MASTER_PORT" \
  --max-restarts="$MAX_RESTARTS" -m dist8.train "${args[@]}"
