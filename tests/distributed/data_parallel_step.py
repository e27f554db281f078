"""One policy update on a fixed batch, run by a real launcher on 1 or 2 ranks (test_distributed.py).

The batch is the same `num_groups` groups whatever the world size (generated from a seed); each
rank takes its contiguous share, runs `grpo.training.update.update_policy` through the chosen backend, and
rank 0 writes the loss, the gradient norm and the full gradient that reached the optimiser, so the
test can check that 2 ranks x B groups give what 1 rank x 2B groups gives.

    deepspeed --num_gpus 2 tests/distributed/data_parallel_step.py --backend deepspeed_zero2 --out out.pt
    torchrun --nproc_per_node 2 tests/distributed/data_parallel_step.py --backend ddp --out out.pt

With `--lora-r R` the model trains LoRA adapters of rank R (tests/integration/test_lora.py); their B matrices are
drawn at random rather than zero, so that A gets a gradient in this one step too; with `--qlora` as well,
the base under them is loaded in 4-bit NF4 (grpo.model.lora.quantization_config), the same on every rank.

With `--partition-all` ZeRO-3 partitions every parameter (`stage3_param_persistence_threshold` 0: by default
DeepSpeed keeps tensors under 1e5 values whole on every rank, which is all of the tiny model's, and a real model's
output embedding never is); `--head-chunk N` scores N positions per call of the output embedding (the default
chunk of a 150k vocabulary is ~110 positions), so the ranks' chunk counts differ. Rank 0 also writes how many
parameters each rank held partitioned, and each rank's calls of the output embedding: `(scoring, all)`, those
with positions to score and those in all.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from grpo import distributed as dist
from grpo.backends import build_backend
from grpo.builtin.tiny import build_char_tokenizer, build_tiny_model, save_tiny
from grpo.cli import drop_launcher_args
from grpo.config import AlgorithmConfig, LoraOptions
from grpo.core import logprobs
from grpo.core.batch import layout_batch
from grpo.model.lora import add_adapters, prepare_quantized, quantization_config
from grpo.training.update import update_policy


def fixed_batch(num_groups: int, group_size: int, seed: int = 0):
    """Prompts [num_groups], completions [num_groups * G] (token ids) and advantages, from a seed."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 60, (int(k),), generator=g).tolist()
               for k in torch.randint(2, 9, (num_groups,), generator=g)]
    completions = [torch.randint(3, 60, (int(k),), generator=g).tolist()
                   for k in torch.randint(1, 9, (num_groups * group_size,), generator=g)]
    advantages = torch.randn(num_groups * group_size, generator=g)
    return prompts, completions, advantages


def gradient_from_adam_step(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The gradient of AdamW's first step with lr=1, eps=1, no weight decay.

    Bias-corrected, the first step is d = -g / (|g| + eps): a monotone function of g that keeps
    its scale (with the usual eps=1e-8 it would be -sign(g)), so g = -d / (1 - |d|).
    """
    d = (after - before).double()
    return (-d / (1 - d.abs())).float()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--groups", type=int, default=8, help="groups in the whole batch (all ranks)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--micro-batch-tokens", type=int, default=40)
    parser.add_argument("--loss-agg", default="token_mean")
    parser.add_argument("--poison-rank", type=int, default=-1, help="this rank's loss is made infinite")
    parser.add_argument("--lora-r", type=int, default=0, help="train LoRA adapters of this rank; 0 = every weight")
    parser.add_argument("--qlora", action="store_true", help="with --lora-r: the base in 4-bit NF4")
    parser.add_argument("--packing", default="padded", help="backend.packing of the log-prob forward")
    parser.add_argument("--partition-all", action="store_true", help="ZeRO-3 partitions every parameter")
    parser.add_argument("--head-chunk", type=int, default=0, help="positions per output-embedding call; 0: default")
    parser.add_argument("--timeout-s", type=float, default=120, help="how long a collective waits for a peer")
    args = parser.parse_args(drop_launcher_args(__import__("sys").argv[1:]))
    torch.set_num_threads(1)
    dist.init_distributed(deepspeed=args.backend.startswith("deepspeed"), timeout_s=args.timeout_s)

    tok = build_char_tokenizer()
    if args.head_chunk:  # the default chunk of this vocabulary is then `head_chunk` positions
        logprobs.LOGITS_CHUNK_ELEMENTS = args.head_chunk * len(tok)
    model = build_tiny_model(len(tok), seed=0)  # the same initial weights on every rank
    head_calls = [0, 0]  # (with positions to score, in all), forward recomputations included
    model.get_output_embeddings().register_forward_hook(lambda _m, inputs, _out: count_call(head_calls, inputs[0]))
    if args.qlora:  # the same model, its linear layers in 4-bit
        model = quantized_tiny_model(Path(args.out).with_suffix(".model"))
    if args.lora_r:
        model = with_random_adapters(model, args.lora_r)
    prompts, completions, advantages = fixed_batch(args.groups, args.group_size)
    G = args.group_size
    my_prompts = dist.shard(prompts)
    my_completions = dist.shard(completions)
    my_advantages = torch.stack(dist.shard(list(advantages)))
    batch = layout_batch(my_prompts, my_completions, G, tok.pad_token_id)
    batch.advantages = my_advantages
    if dist.rank() == args.poison_rank:
        batch.advantages[0] = float("inf")  # inf * ratio: this rank's loss is not finite, the others' are

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    overrides = {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if args.partition_all else None
    backend = build_backend(args.backend, policy=model, lr=1.0, eps=1.0, betas=(0.9, 0.99), max_grad_norm=0.0,
                            deepspeed_overrides=overrides)
    sharded = dist.all_gather_objects(partitioned(model))
    algo = AlgorithmConfig(group_size=G, loss_agg=args.loss_agg)
    metrics = update_policy(backend, batch, algo, temperature=1.0, micro_batch_tokens=args.micro_batch_tokens,
                            max_new_tokens=8, packing=args.packing)
    with backend.gathered_for_rollout():  # ZeRO-3: the full weights
        trained = [(n, p) for n, p in model.named_parameters() if n in before]
        grads = {n: gradient_from_adam_step(before[n], p.detach().float()) for n, p in trained}
        moved = max(float((p.detach() - before[n]).abs().max()) for n, p in trained)
        frozen_moved = max((float((p.detach().float() - frozen[n].float()).abs().max())  # 4-bit: uint8
                            for n, p in model.named_parameters() if n in frozen), default=0.0)
    head_calls = dist.all_gather_objects(tuple(head_calls))
    if dist.is_main():
        torch.save({"loss": metrics["train/loss"], "grad_norm": metrics["optim/grad_norm"],
                    "entropy": metrics["train/entropy"], "grads": grads, "world_size": dist.world_size(),
                    "skipped": metrics["optim/skipped_steps"],
                    "moved": moved, "frozen_moved": frozen_moved, "partitioned": sharded,
                    "parameters": len(list(model.parameters())), "head_calls": head_calls},
                   args.out)
    dist.close_distributed()


def count_call(calls: list[int], rows: torch.Tensor) -> None:
    calls[0] += int(rows.shape[0] > 0)
    calls[1] += 1


def partitioned(model: torch.nn.Module) -> int:
    """How many of `model`'s parameters ZeRO-3 holds partitioned now (a DeepSpeed parameter not available on this
    rank); 0 for a module DeepSpeed does not manage."""
    return sum(int(getattr(p, "ds_status", None) is not None and p.ds_status.name == "NOT_AVAILABLE")
               for p in model.parameters())


def quantized_tiny_model(directory: Path) -> torch.nn.Module:
    """The tiny model of seed 0 with its linear layers in 4-bit NF4, prepared for adapters: saved to `directory`
    by rank 0 (under torch.distributed transformers writes on rank 0 alone), then read by every rank."""
    if dist.is_main():
        save_tiny(directory, seed=0)
    dist.barrier()
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization_config(torch.float32))
    return prepare_quantized(model, gradient_checkpointing=False)


def with_random_adapters(model: torch.nn.Module, r: int) -> torch.nn.Module:
    """`model` with LoRA adapters of rank r whose B matrices are random (the same on every rank)."""
    model = add_adapters(model, LoraOptions(r=r, alpha=2.0 * r))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


if __name__ == "__main__":
    main()
