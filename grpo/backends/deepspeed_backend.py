"""DeepSpeed backend: ZeRO stage 1, 2 or 3 through `deepspeed.initialize`.

The DeepSpeed config is built from ours (`deepspeed_config`), so there is no second file to
keep in step; `backend.deepspeed` entries are merged over it for expert settings.

How it fits the loop:
- The engine wraps a `LogProbModel` (the policy behind a forward that returns log-probs), so
  every forward goes through the engine's module and ZeRO-3's parameter hooks see it start.
  Another model trained beside the policy (PPO's critic) passes its own forward as `module`.
- Gradient accumulation is ours: the number of micro-batches varies with sequence lengths, so
  DeepSpeed runs with `managed_gradient_accumulation: false` (`backward` accumulates, `step`
  is the boundary: it reduces, clips and steps).
- Our loss is already normalised by the global token/sequence counts; ZeRO averages gradients
  over ranks, so `backward` scales the loss by the world size to make that average the sum.
- Rollout under ZeRO-3: `gathered_for_rollout` gathers the full parameters once for a whole
  `generate` call (DeepSpeed's `unwrap_model_for_generation`, which also lifts the ZeRO hooks
  so nothing is re-partitioned between tokens). The alternative, transformers' `synced_gpus`
  generation, keeps parameters sharded and all-gathers every layer at every new token; a
  separate inference copy would hold a full model all the time. Gathering costs one full copy
  of the weights per rank for the length of the rollout, which the memory planner counts.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from grpo import distributed as dist
from grpo.backends import LogProbModel, lr_lambda, set_lr_factor

CHECKPOINT_TAG = "zero"


def deepspeed_config(*, stage: int, max_grad_norm: float, bf16: bool, offload_optimizer: bool = False,
                     offload_params: bool = False, extra: dict | None = None) -> dict:
    """The DeepSpeed config for one of our runs; `extra` is merged over it (nested dicts merged)."""
    zero: dict = {"stage": stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        # One "sample" per backward and one step per `step()`: we batch and accumulate ourselves.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, extra or {})


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class DeepSpeedBackend:
    def __init__(self, policy: torch.nn.Module, *, name: str, lr: float, betas=(0.9, 0.99), eps=1e-8,
                 weight_decay=0.0, warmup_steps=0, schedule="constant", total_steps=1, max_grad_norm=1.0,
                 gradient_checkpointing=False, offload_optimizer=False, offload_params=False,
                 deepspeed_overrides: dict | None = None, module: torch.nn.Module | None = None, **_unused):
        """`module` is what the engine wraps and runs (it must hold `policy`): by default the policy's
        `LogProbModel`; PPO's critic passes its `ValueModel`."""
        import deepspeed

        self.stage = int(name.removeprefix("deepspeed_zero"))
        if offload_params and self.stage != 3:
            raise ValueError(f"backend.offload_params: needs ZeRO-3 (backend={name})")
        self.policy = policy
        if gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        policy.train()
        self.config = deepspeed_config(
            stage=self.stage, max_grad_norm=max_grad_norm, bf16=next(policy.parameters()).dtype == torch.bfloat16,
            offload_optimizer=offload_optimizer, offload_params=offload_params, extra=deepspeed_overrides,
        )
        params = [p for p in policy.parameters() if p.requires_grad]
        if offload_optimizer:  # ZeRO-Offload steps on the CPU with DeepSpeed's vectorised Adam
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                         adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        factor = lr_lambda(schedule, warmup_steps, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module if module is not None else LogProbModel(policy, dist.device()), optimizer=optimizer,
            config=self.config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        )
        self.model = self.engine
        self.schedule = (schedule, warmup_steps)
        self.skipped_steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * dist.world_size())

    def step(self, skip: bool = False) -> dict:
        """Reduce, clip and apply the accumulated gradient.

        `skip` (a rank saw a non-finite loss) stops the run instead: DeepSpeed holds the reduced
        gradient in its own partitioned buffers, with no public way to discard it, so the weights
        are left as they were and the run resumes from its last checkpoint. A non-finite gradient
        from a finite loss is reported in `skipped` but has already been applied by DeepSpeed; the
        next checkpoint then refuses the non-finite weights.
        """
        if skip:
            raise FloatingPointError("a rank's loss is not finite; the DeepSpeed backend cannot discard the "
                                     "accumulated gradient, so the run stops with its weights unchanged: "
                                     "resume from the last checkpoint (resume=auto), or lower optim.lr")
        lr = self.scheduler.get_last_lr()[0]
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        skipped = not torch.isfinite(torch.tensor(norm))
        self.skipped_steps += int(skipped)
        self.engine.zero_grad()
        return {"grad_norm": norm, "lr": lr, "skipped": skipped}

    def set_total_steps(self, total_steps: int) -> None:
        set_lr_factor(self.scheduler, lr_lambda(*self.schedule, total_steps))

    def gathered_for_rollout(self):
        """A context in which the policy holds its full parameters (ZeRO-3), for generate (and for reading
        the weights: a replica check, a test)."""
        if self.stage != 3:
            return contextlib.nullcontext()
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        return unwrap_model_for_generation(self.engine)

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Small state only; the optimiser and scheduler live in DeepSpeed's sharded files."""
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = state.get("skipped_steps", 0)

    def save_sharded(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint (every rank writes its shards); resumable on the same world size."""
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False)

    def load_sharded(self, directory: Path) -> None:
        """DeepSpeed's own checkpoint. A 4-bit base (QLoRA) saves its quantisation state (absmax, quant_map...)
        beside each packed weight, which the layers do not take back (the state is rebuilt when the base is
        loaded from model.path): those keys, and only under a 4-bit base, are not required to match."""
        strict = not getattr(self.policy, "is_loaded_in_4bit", False)
        path, _ = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_module_strict=strict)
        if path is None:
            raise RuntimeError(f"checkpoint {directory}: DeepSpeed found nothing to load")
