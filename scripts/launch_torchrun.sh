#!/usr/bin/env bash
# Launch grpo-train with torchrun: one node, or several with a rendezvous.
#   bash scripts/launch_torchrun.sh 8 backend=ddp experiment=qwen2.5-0.5b_gsm8k_8gpu
# Several nodes: run the same command on every node with NNODES and RDZV_ENDPOINT (host:port of one node):
#   NNODES=2 RDZV_ENDPOINT=node1:29500 bash scripts/launch_torchrun.sh 8 experiment=qwen2.5-7b_math_8gpu
set -euo pipefail
gpus=${1:?number of GPUs per node}; shift
if [ "${NNODES:-1}" -gt 1 ]; then
  exec torchrun --nnodes "$NNODES" --nproc_per_node "$gpus" --rdzv_backend c10d \
    --rdzv_endpoint "${RDZV_ENDPOINT:?RDZV_ENDPOINT: host:port of one node}" --rdzv_id "${RDZV_ID:-grpo}" \
    -m grpo.train "$@"
fi
exec torchrun --standalone --nproc_per_node "$gpus" -m grpo.train "$@"
