#!/usr/bin/env bash
# Multi-node training: run once per node with the same MASTER_ADDR/MASTER_PORT.
#   node 0: NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multinode.sh --config configs/small-gpt.yaml
#   node 1: NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/multinode.sh --config configs/small-gpt.yaml
# Env: NNODES (default 2), NODE_RANK (required), NPROC (per node; default: GPUs on this node, else 1),
#      MASTER_ADDR (required), MASTER_PORT (default 29500), RDZV (static|c10d, default static),
#      MAX_RESTARTS (default 0; restarts resume from the newest checkpoint).
# Extra arguments go to `dist8 train`. checkpoint.dir must be on storage every node can read.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0)}"
NNODES="${NNODES:-2}"
MASTER_PORT="${MASTER_PORT:-29500}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
RDZV="${RDZV:-static}"
if [[ -z "${NPROC:-}" ]]; then
  NPROC="$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
args=("$@")
if (( MAX_RESTARTS > 0 )); then
  [[ " ${args[*]-} " == *" --resume "* ]] || args+=(--resume auto)
fi
if [[ "$RDZV" == c10d ]]; then
  rdzv=(--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${RDZV_ID:-dist8-train}")
else
  rdzv=(--node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")
fi
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" "${rdzv[@]}" \
  --max-restarts="$MAX_RESTARTS" -m dist8.train "${args[@]}"
