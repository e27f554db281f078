"""Train backends: where the policy's forward, backward and optimiser step run.

A backend is anything with the `TrainBackend` methods (a `typing.Protocol`). Backends are
named by string and imported only when chosen, so `import grpo` never imports DeepSpeed.
"""

from __future__ import annotations

import importlib
import math
from typing import Protocol, runtime_checkable

import torch

from grpo import distributed as dist
from grpo.core.logprobs import head_chunks, sequence_jsd, sequence_logprobs, vocab_size


@runtime_checkable
class TrainBackend(Protocol):
    model: torch.nn.Module  # the module whose forward the caller runs: log-probs (may be a wrapper), or `module`
    policy: torch.nn.Module  # the bare transformers model (for saving and weight sync)
    skipped_steps: int  # optimiser steps skipped so far for a non-finite loss or gradient (saved in state_dict)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of one micro-batch's loss."""
        ...

    def step(self, skip: bool = False) -> dict:
        """Clip, step the optimiser and scheduler, zero grads; returns `grad_norm`, `lr`, `skipped`.
        With `skip` (the caller saw a non-finite loss), or when the gradient norm is not finite, the
        gradient is discarded without touching the weights or optimiser moments, and counted."""
        ...

    def set_total_steps(self, total_steps: int) -> None:
        """The schedule's length, when the loop learns it after the backend is built (offline DPO: from its
        pairs); the steps taken so far and the current learning rate's position are kept."""
        ...

    def state_dict(self) -> dict:
        """Optimiser and scheduler state, for checkpoints."""
        ...

    def load_state_dict(self, state: dict) -> None: ...


class LogProbModel(torch.nn.Module):
    """The policy behind a forward that returns `(logprobs [B, T-1], entropy or None)`.

    Wrappers that hook a module's forward (DeepSpeed ZeRO-3 fetches parameters when the
    top-level forward starts) must see the log-prob computation as one forward call;
    `grpo.training.update.forward_logprobs` calls it through `computes_logprobs`.

    Under ZeRO-3 on several ranks every call of the output embedding gathers its partitioned weight (in forward, in
    the recomputation and in backward), so every rank must score as many chunks of positions, however many
    positions it holds: each forward takes the largest chunk count over ranks (one all-reduce) and pads with
    empty chunks. Every rank runs as many forwards already (`grpo.training.update.same_count_on_every_rank`).
    """

    computes_logprobs = True

    def __init__(self, policy: torch.nn.Module, device: torch.device | None = None):
        super().__init__()
        self.policy = policy
        self.device = device  # where the policy runs; inputs go there, outputs come back

    def forward(self, input_ids, attention_mask, jsd: dict | None = None, **kwargs):
        """`(logprobs, entropy)`; with `jsd` (`sequence_jsd`'s keyword arguments, `grpo.core.logprobs.forward_jsd`)
        the generalised JSD to a teacher [B, T-1] instead."""
        home = input_ids.device
        device = self.device or home
        if jsd is not None:
            jsd = self.as_many_chunks(attention_mask, jsd)
            return sequence_jsd(self.policy, input_ids.to(device), attention_mask.to(device), **jsd).to(home)
        kwargs = self.as_many_chunks(attention_mask, kwargs)
        logp, entropy = sequence_logprobs(self.policy, input_ids.to(device), attention_mask.to(device), **kwargs)
        return logp.to(home), None if entropy is None else entropy.to(home)

    def as_many_chunks(self, attention_mask: torch.Tensor, options: dict) -> dict:
        """`options` (the scoring function's keyword arguments) with `num_chunks`, the largest chunk count over
        ranks, where ZeRO-3 manages the output embedding and there are several ranks; else as they are."""
        head = self.policy.get_output_embeddings()
        if not hasattr(head.weight, "ds_id") or dist.world_size() == 1:
            return options
        mine = head_chunks(attention_mask, options.get("logits_to_keep_from", 0), vocab_size(head),
                           options.get("chunk_size"))
        return {**options, "num_chunks": int(dist.all_reduce_max(mine))}


BACKENDS = {
    "torch": "grpo.backends.torch_backend:TorchBackend",
    "ddp": "grpo.backends.torch_backend:TorchBackend",
    "deepspeed_zero1": "grpo.backends.deepspeed_backend:DeepSpeedBackend",
    "deepspeed_zero2": "grpo.backends.deepspeed_backend:DeepSpeedBackend",
    "deepspeed_zero3": "grpo.backends.deepspeed_backend:DeepSpeedBackend",
}


def build_backend(name: str, **kwargs) -> TrainBackend:
    """Import the backend named in the config and build it (it receives its own name too)."""
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(name=name, **kwargs)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak learning rate at each optimiser step: linear warm-up, then
    constant, linear decay to 0, or cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def set_lr_factor(scheduler: torch.optim.lr_scheduler.LambdaLR, factor) -> None:
    """Give a `LambdaLR` a new multiplier from its current step on (its step count and base rates kept)."""
    groups = scheduler.optimizer.param_groups
    scheduler.lr_lambdas = [factor] * len(groups)
    for group, base in zip(groups, scheduler.base_lrs):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
