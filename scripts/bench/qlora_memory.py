"""Resident weight bytes and trained parameters of LoRA against QLoRA, on one model, measured.

    python -m scripts.bench.qlora_memory            # r=16 on the 16.8M model of scripts.bench.zero_memory
    python -m scripts.bench.qlora_memory --lora-r 8

Builds the random Qwen2-architecture model that `scripts.bench.zero_memory` uses (hidden 512, 4 layers,
intermediate 2048, a 100-token vocabulary), saves it, and loads it twice as `grpo-train` would with
`model.lora.r=R`: over the float32 base, and with `model.lora.qlora=true` over the 4-bit NF4 base
(`grpo.model.lora.quantization_config`, then `prepare_quantized`). It counts the bytes of every tensor the
policy holds (parameters, buffers, and the 4-bit layers' quantisation state: block absmax, its float32
scales, the code books), the trained parameters, and prints the memory plan's figure beside the measure
(`grpo.model.memory.base_weight_bytes` plus the adapters). CPU only; a few seconds.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM

from grpo.builtin.tiny import build_tiny_model
from grpo.config import LoraOptions
from grpo.model.lora import add_adapters, prepare_quantized, quantization_config, trainable_parameters
from grpo.model.memory import base_weight_bytes, quantized_params

MiB = 2**20


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors `model` holds: parameters, buffers, and each 4-bit weight's quantisation state."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            extra = [state.absmax, state.code, *((state.state2.absmax, state.state2.code) if state.nested else ())]
            tensors.update({id(t): t for t in extra})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure(directory: str, num_params: int, r: int, qlora: bool) -> dict:
    """The LoRA policy over the saved model, its base in 4-bit with `qlora`: bytes held, parameters trained."""
    if qlora:
        base = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization_config(torch.float32))
        base = prepare_quantized(base, gradient_checkpointing=False)
    else:
        base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    quantized = quantized_params(base.config) if qlora else 0
    policy = add_adapters(base, LoraOptions(r=r, alpha=2.0 * r))
    trained, _ = trainable_parameters(policy)
    planned = base_weight_bytes(num_params, quantized, 4) + 4 * trained  # float32 run: 4 bytes per adapter weight
    return {"held": held_bytes(policy), "planned": planned, "trained": trained, "quantized": quantized}


def main(argv: list[str] | None = None) -> None:
    """Print the table: LoRA and QLoRA, bytes held (measured and planned) and parameters trained."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--lora-r", type=int, default=16, help="adapter rank")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        model = build_tiny_model(100, hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048, seed=0)
        model.save_pretrained(directory)
        num_params = sum(p.numel() for p in model.parameters())
        rows = {name: measure(directory, num_params, args.lora_r, qlora)
                for name, qlora in (("LoRA", False), ("QLoRA", True))}
    print(f"r={args.lora_r}, float32 run: weights held by the policy (MiB), parameters trained")
    print("| base | held, measured | held, planned | trained | in 4-bit |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['held'] / MiB:.2f} | {row['planned'] / MiB:.2f} | {row['trained']:,} | "
              f"{row['quantized']:,} |")


if __name__ == "__main__":
    main()
