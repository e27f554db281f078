#!/usr/bin/env bash
# Launch grpo-train on the GPUs of this machine with the DeepSpeed launcher.
#   bash scripts/launch_deepspeed.sh 8 experiment=qwen2.5-7b_gsm8k_8gpu run_dir=runs/7b
# Several nodes: put them in a hostfile (scripts/hostfile.example) and set HOSTFILE:
#   HOSTFILE=hostfile MASTER_ADDR=node1 bash scripts/launch_deepspeed.sh 8 experiment=...
set -euo pipefail
gpus=${1:?number of GPUs per node}; shift
if [ -n "${HOSTFILE:-}" ]; then
  exec deepspeed --hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?MASTER_ADDR: the first node}" \
    --master_port "${MASTER_PORT:-29500}" --num_gpus "$gpus" --module grpo.train "$@"
fi
exec deepspeed --num_gpus "$gpus" --master_port "${MASTER_PORT:-29500}" --module grpo.train "$@"
