"""Train backends: where the policy's forward, backward and optimiser step run.

A backend is anything with the `TrainBackend` methods (a `typing.Protocol`). Backends are
named by string and imported only when chosen, so `import grpo` never imports DeepSpeed.
"""

from __future__ import annotations

import importlib
import math
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainBackend(Protocol):
    model: torch.nn.Module  # the module whose forward computes log-probs (may be a wrapper)
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

    def state_dict(self) -> dict:
        """Optimiser and scheduler state, for checkpoints."""
        ...

    def load_state_dict(self, state: dict) -> None: ...


BACKENDS = {
    "torch": "grpo.backends.torch_backend:TorchBackend",
    "ddp": "grpo.backends.torch_backend:TorchBackend",
    "deepspeed_zero1": "grpo.backends.deepspeed_backend:DeepSpeedBackend",
    "deepspeed_zero2": "grpo.backends.deepspeed_backend:DeepSpeedBackend",
    "deepspeed_zero3": "grpo.backends.deepspeed_backend:DeepSpeedBackend",
}


def build_backend(name: str, **kwargs) -> TrainBackend:
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)


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
