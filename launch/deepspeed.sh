#!/usr/bin/env bash
# Train with DeepSpeed + dist8's 8-bit optimizer:  launch/deepspeed.sh [GPUS] [NODES] [CONFIG] [extra dist8.train args]
#   GPUS (default 1), NODES (default 1; >1 needs a DeepSpeed hostfile: HOSTFILE=/path), CONFIG a dist8 YAML
#   training config with `sharding.mode: deepspeed` and `sharding.deepspeed_config: configs/deepspeed-zero2.json`.
# CPU only: DS_ACCELERATOR=cpu launch/deepspeed.sh 2   (gloo backend).
set -euo pipefail
GPUS=${1:-1}; NODES=${2:-1}; CONFIG=${3:-configs/tiny-gpt.yaml}; shift $(( $# < 3 ? $# : 3 ))
exec deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} --num_nodes "$NODES" --num_gpus "$GPUS" --no_local_rank --module dist8.train --config "$CONFIG" "$@"
