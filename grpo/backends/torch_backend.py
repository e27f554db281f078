"""Plain-torch backend: one process, or data parallel over several (`backend=ddp`).

AdamW, schedule, gradient clipping. Gradient accumulation is the caller's: it calls `backward`
once per micro-batch with a loss already normalised by the whole (global) batch's counts, then
`step` once.

Data parallel (`ddp`): every rank holds the whole model and optimiser; `step` sums the
gradients over ranks in one flattened all-reduce, then every rank takes the same step, so
the replicas stay identical. We do not wrap the policy in `DistributedDataParallel`: its
reducer is armed by the wrapper's forward, which the chunked log-prob computation does not
call, and it would all-reduce after every micro-batch; one all-reduce per optimiser step
does the same arithmetic once (without overlapping communication with the backward pass).
"""

from __future__ import annotations

import contextlib

import torch

from grpo import distributed as dist
from grpo.backends import LogProbModel, lr_lambda, set_lr_factor


class TorchBackend:
    def __init__(self, policy: torch.nn.Module, *, lr: float, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                 warmup_steps=0, schedule="constant", total_steps=1, max_grad_norm=1.0,
                 gradient_checkpointing=False, name="torch", module: torch.nn.Module | None = None, **_unused):
        """`module`, when given, is the forward the caller runs (holding `policy`), e.g. PPO's `ValueModel`;
        by default the bare policy on one process and its `LogProbModel` under ddp."""
        # One rank (no process group) is plain single-process training.
        self.data_parallel = name == "ddp" and torch.distributed.is_initialized()
        self.policy = policy
        self.model = policy
        if self.data_parallel:
            policy.to(dist.device())
            self.model = LogProbModel(policy, dist.device())
        if module is not None:
            self.model = module
        if gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        policy.train()
        params = [p for p in policy.parameters() if p.requires_grad]
        # The fused kernel updates each parameter in one pass (CPU and CUDA): 4x less time than the
        # per-tensor loop on the tiny model (python -m scripts.bench.step_vs_trl, "update" phase).
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                           fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(schedule, warmup_steps, total_steps)
        )
        self.schedule = (schedule, warmup_steps)
        self.max_grad_norm = max_grad_norm
        self.skipped_steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, skip: bool = False) -> dict:
        """Clip and apply the accumulated gradient; `skip` (a non-finite loss) or a non-finite
        gradient norm discards it instead: the weights and the optimiser's moments stay as they were."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.data_parallel:
            sum_gradients(params)
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in params if p.grad is not None] or [torch.zeros(())])
            )
        lr = self.scheduler.get_last_lr()[0]
        skipped = skip or not torch.isfinite(norm)
        if skipped:  # a non-finite gradient never reaches the weights
            self.skipped_steps += 1
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm), "lr": lr, "skipped": skipped}

    def set_total_steps(self, total_steps: int) -> None:
        set_lr_factor(self.scheduler, lr_lambda(*self.schedule, total_steps))

    def gathered_for_rollout(self):
        return contextlib.nullcontext()  # every rank holds the whole model

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_steps = state.get("skipped_steps", 0)


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Sum each parameter's gradient over ranks, in one flattened all-reduce (a missing grad is 0)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).to(dist.device())  # [total params]
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).to(p.device, p.dtype)
        offset += g.numel()
