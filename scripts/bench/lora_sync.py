"""Weight-sync time of the vLLM engine: the full model, and a LoRA policy synced merged or as adapters.

    .venv-vllm/bin/python -m scripts.bench.lora_sync                  # the demo's tiny model
    .venv-vllm/bin/python -m scripts.bench.lora_sync --size small     # a 34M-parameter random model
    OMP_NUM_THREADS=1 .venv-vllm/bin/python -m scripts.bench.lora_sync --rounds 2 --syncs 8

For each mode an engine is built from the same model directory (start-up not counted) and synced
`--syncs` times from the same policy; the figure is the median of `time/weight_sync_s` over all rounds.
`full`: a plain policy, every parameter pushed and the CPU kernels rebuilt; `merged`: the LoRA policy's
base weights with W + (alpha / r) B A pushed the same way; `adapter`: only the adapters saved and loaded
as a LoRA request. Modes take turns, round by round, so load from elsewhere hits all alike; on a shared
machine with several threads the figures spread widely (one thread is steadier).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from grpo.config import LoraOptions
from grpo.model.loading import load_tokenizer
from grpo.model.lora import add_adapters
from grpo.rollout.vllm import VLLMRolloutEngine
from scripts.bench.rollout_throughput import SIZES, model_dir

MODES = ("full", "merged", "adapter")


def sync_seconds(path: str, tokenizer, mode: str, rank: int, syncs: int) -> list[float]:
    """`syncs` weight-sync times of a fresh engine in `mode`, one generate after them (the engine works)."""
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if mode != "full":
        policy = add_adapters(policy, LoraOptions(r=rank, alpha=2 * rank))
    engine = VLLMRolloutEngine(policy, tokenizer, model_path=path, kv_cache_gb=0.0625, max_new_tokens=4,
                               lora_rank=0 if mode == "full" else rank,
                               lora_sync="merged" if mode == "merged" else "adapter")
    try:
        times = [engine.sync_weights(policy) for _ in range(syncs)]
        engine.generate(["12+34="], 2)
    finally:
        engine.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--rank", type=int, default=8, help="LoRA r")
    parser.add_argument("--syncs", type=int, default=8, help="syncs per engine")
    parser.add_argument("--rounds", type=int, default=2, help="engines per mode, the modes alternated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        path = model_dir(args.size, Path(workdir))
        tokenizer = load_tokenizer(path)
        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
        times = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                times[mode] += sync_seconds(path, tokenizer, mode, args.rank, args.syncs)
    print(f"{args.size} model, {params / 1e6:.1f}M parameters, LoRA r={args.rank}, torch threads "
          f"{torch.get_num_threads()}: median weight sync (ms, {args.rounds * args.syncs} syncs each)")
    for mode in MODES:
        ms = [t * 1000 for t in times[mode]]
        print(f"  {mode:8s} {statistics.median(ms):7.1f}   (min {min(ms):.1f}, max {max(ms):.1f})")


if __name__ == "__main__":
    main()
