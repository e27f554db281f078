"""Measure per-rank optimiser-state memory under DeepSpeed ZeRO-0/1/2/3 on 2 ranks, same model.

    python -m scripts.bench.zero_memory  # launches the 4 stages (deepspeed --num_gpus 2), prints a table
    python -m scripts.bench.zero_memory --dtype bfloat16
    python -m scripts.bench.zero_memory --lora-r 16  # LoRA adapters of rank 16 trained, the base frozen

Each rank builds the same random Qwen2-architecture model (about 17M parameters), wraps it in our
DeepSpeed backend, takes one optimiser step on a fixed batch (Adam allocates its states lazily), then
counts the bytes of the tensors that are optimiser state on this rank: Adam's two moments, and the
fp32 master copy of the weights that ZeRO keeps for its partition (stage 1-3). Counting tensors is
exact and works on CPU and GPU alike; the planner's prediction (grpo/model/memory.py, per trained parameter)
is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: the ranks run this module from it


def tensor_bytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def optimizer_state_bytes(backend) -> dict:
    """Adam moments and fp32 master weights held by this rank."""
    opt = backend.engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimiser
    moments = sum(tensor_bytes(state) for state in inner.state.values())
    master = 0
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        master += tensor_bytes(getattr(opt, name, None) or [])
    return {"moments": moments, "master": master}


def rank_main(stage: int, dtype: str, lora_r: int) -> None:
    import torch

    from grpo import distributed as dist
    from grpo.backends.deepspeed_backend import DeepSpeedBackend
    from grpo.builtin.tiny import build_tiny_model
    from grpo.config import AlgorithmConfig, LoraOptions
    from grpo.core.batch import layout_batch
    from grpo.model.lora import add_adapters
    from grpo.training.update import update_policy

    torch.set_num_threads(1)
    dist.init_distributed(deepspeed=True, timeout_s=300)
    model = build_tiny_model(100, hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048, seed=0)
    model.to(getattr(torch, dtype))
    num_params = sum(p.numel() for p in model.parameters())
    if lora_r:
        model = add_adapters(model, LoraOptions(r=lora_r, alpha=2.0 * lora_r))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backend = DeepSpeedBackend(model, name=f"deepspeed_zero{stage}", lr=1e-4)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 90, (5,), generator=g).tolist() for _ in range(2)]
    completions = [torch.randint(3, 90, (6,), generator=g).tolist() for _ in range(4)]
    batch = layout_batch(dist.shard(prompts), dist.shard(completions), 2, 0)
    batch.advantages = torch.randn(len(batch), generator=g)
    update_policy(backend, batch, AlgorithmConfig(group_size=2), temperature=1.0, micro_batch_tokens=10_000,
                  max_new_tokens=8)
    measured = optimizer_state_bytes(backend)
    rows = dist.all_gather_objects({"rank": dist.rank(), **measured})
    if dist.is_main():
        print("RESULT " + json.dumps({"stage": stage, "dtype": dtype, "num_params": num_params, "trainable": trainable,
                                      "world_size": dist.world_size(), "ranks": rows}), flush=True)


def launch_all(dtype: str, lora_r: int) -> None:
    from grpo.model.memory import training_bytes_per_param

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = []
    for stage in range(4):
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(29600 + stage), "--module", __spec__.name,
               "--rank-main", "--stage", str(stage), "--dtype", dtype, "--lora-r", str(lora_r)]
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"stage {stage} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        results.append(json.loads(line[len("RESULT "):]))
    P = results[0]["trainable"]  # the optimiser's parameters: all of them, or the adapters alone
    print(f"{results[0]['num_params']:,} parameters, {P:,} trained"
          f"{f' (LoRA r={lora_r})' if lora_r else ''}, {dtype}, 2 ranks; optimiser state per rank (MiB) after one step")
    print(f"{'stage':<8}{'rank':<6}{'Adam m+v':>10}{'fp32 master':>13}{'total':>9}{'planned':>9}{'B/param':>9}")
    for r in results:
        _, _, planned = training_bytes_per_param(r["stage"], 2, mixed_precision=dtype == "bfloat16")
        for row in r["ranks"]:
            total = row["moments"] + row["master"]
            print(f"ZeRO-{r['stage']:<3}{row['rank']:<6}{row['moments'] / 2**20:>10.2f}{row['master'] / 2**20:>13.2f}"
                  f"{total / 2**20:>9.2f}{planned * P / 2**20:>9.2f}{total / P:>9.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    parser.add_argument("--rank-main", action="store_true", help="(internal) run as one launched rank")
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--lora-r", type=int, default=0, help="train LoRA adapters of this rank; 0 = every weight")
    args, _ = parser.parse_known_args()  # the launcher appends --local_rank
    if args.rank_main:
        rank_main(args.stage, args.dtype, args.lora_r)
    else:
        launch_all(args.dtype, args.lora_r)
