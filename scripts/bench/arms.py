"""The arms of `scripts.bench.realistic`: each side's trainer, driven one way per arm.

Training phase (log-probs + loss + backward + optimiser step on one fixed batch). Each side holds one model and one
optimiser that all its arms step (the weights move by the learning rate between arms; the timing does not depend on
them, and a real-model run would not fit ten copies in memory):

- ours: `grpo.training.update.update_policy` on the batch, the torch backend, in each `backend.packing` layout
  (`padded`, `sequences`, `groups`, and `auto` where the config accepts it: resolved as a run resolves it), and one
  arm with activation checkpointing (`backend.gradient_checkpointing`: `gradient_checkpointing_enable()` on the
  policy, what the backend does when built with it, here for that arm's steps only).
- TRL: a `GRPOTrainer` per arm, all on the one model and optimiser, each built from its own `GRPOConfig`. A step is
  what its training loop (`Trainer._inner_training_loop`) does for one optimiser step: it sets
  `current_gradient_accumulation_steps`, calls `training_step` once per micro-batch with `sync_gradients` on the
  last, then `_clip_grad_norm`, the optimiser's and the scheduler's steps and `zero_grad`. `training_step` runs
  TRL's own `_prepare_inputs`, which shuffles the generation batch and splits it into `steps_per_generation`
  micro-batches (`shuffle_sequence_dict`, `split_tensor_dict`), and its `compute_loss`, whose dapo loss divides by
  `num_items_in_batch` x `current_gradient_accumulation_steps` / `steps_per_generation`: the loss as TRL scales it.
  Only generation is replaced: `_generate_and_score_completions` returns the batch's tensors (prompt left-padded,
  completions right-padded, split at the prompt width, advantages given) instead of sampling and scoring.
  Arms: all sequences in one micro-batch; gradient accumulation (micro-batches of B*G/4 and B*G/2 sequences: 8 x 4
  and 16 x 2 at 32); `gradient_checkpointing=True` (enabled on the model as `Trainer.train()` enables it, for that
  arm's steps only); and a DIAGNOSTIC arm, `trl_gpu_head`: on CPU TRL's fused head scores every position (prompt
  and padding too) because `trl.trainer.utils` gates its compact path on `_use_triton(device)` (imported there from
  `trl.kernels.chunked_logprob`), true on CUDA/XPU only. The arm patches that imported name to true, so the head
  takes only the completion positions as on a GPU, while the kernel module's own `_use_triton` stays false and runs
  its CPU tile code. It is what TRL would cost on CPU without its CPU-only head work, not a configuration a user
  can choose, so it is never "TRL's best".

Whole step: `SteppedTrainer` runs TRL's own `train()` on a thread of its own, paused after each optimiser step, so
its steps alternate with ours and with another TRL arm's (its continuous-batching generation) in one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

import torch
import trl.trainer.utils as trl_utils
from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback

import grpo.core.logprobs as core_logprobs
import grpo.training.update as update
from grpo.config import BackendConfig
from grpo.core.batch import RolloutBatch
from grpo.errors import ConfigError
from grpo.model.loading import load_policy
from grpo.training.run import build_policy_backend, check_packing
from scripts.bench.common import Timers, build_trl
from scripts.bench.flops import Meter

TRAIN_PHASES = ("logprobs", "update", "optimiser", "other")  # update: backward


@dataclass
class Arm:
    """One way of running one side's training step: `step()` runs one optimiser step and returns its gradient
    norm. `timers` and `meter` are the side's (shared by its arms, read after each step)."""

    name: str
    side: str  # ours or trl
    step: Callable[[], float]
    timers: Timers
    meter: Meter
    settings: dict = field(default_factory=dict)  # what the arm sets (layout, micro-batches, checkpointing)
    diagnostic: str = ""  # why the arm is not a configuration users run; never TRL's best


# ---------------------------------------------------------------- ours

def our_arm_name(packing: str, checkpointing: bool) -> str:
    return f"ours_{packing}" + ("_checkpointing" if checkpointing else "")


def our_arms(cfg, model_path: str, batch: RolloutBatch, device: str,
             variants: list[tuple[str, bool]]) -> tuple[list[Arm], dict]:
    """Ours in each `(backend.packing, activation checkpointing)` of `variants`; returns the arms and
    {arm name: why it was left out} (a layout the model's attention cannot take)."""
    policy, _ = load_policy(model_path, cfg)
    policy.to(device)
    backend = build_policy_backend(cfg, policy)
    timers, meter = Timers(device), Meter(policy, "ours")
    backend.backward = timers.wrap("update", backend.backward)
    backend.step = timers.wrap("optimiser", backend.step)
    logprobs = timers.wrap("logprobs", core_logprobs.sequence_logprobs)
    kwargs = dict(temperature=cfg.rollout.temperature, micro_batch_tokens=cfg.backend.micro_batch_tokens,
                  max_new_tokens=cfg.rollout.max_new_tokens)

    def arm(packing: str, checkpointing: bool):
        def step() -> float:
            if checkpointing:
                policy.gradient_checkpointing_enable()  # as the backend does when built with it
            try:  # the update's forwards go through core.logprobs.forward_logprobs -> sequence_logprobs
                with mock.patch.object(core_logprobs, "sequence_logprobs", logprobs):
                    metrics = update.update_policy(backend, batch, cfg.algorithm, packing=packing, **kwargs)
            finally:
                if checkpointing:
                    policy.gradient_checkpointing_disable()
            return metrics["optim/grad_norm"]
        return step

    arms, skipped = [], {}
    for packing, checkpointing in variants:
        name = our_arm_name(packing, checkpointing)
        try:
            layout = resolve_packing(cfg, policy, packing)
        except ConfigError as err:
            skipped[name] = str(err)
            continue
        settings = {"packing": packing, "layout": layout, "gradient_checkpointing": checkpointing}
        arms.append(Arm(name, "ours", arm(layout, checkpointing), timers, meter, settings))
    return arms, skipped


def resolve_packing(cfg, policy, packing: str) -> str:
    """The layout `backend.packing=packing` runs on `policy`, as a run resolves and checks it when built."""
    probe = dataclasses.replace(cfg.backend, packing=packing)
    probe.validate()
    trial = dataclasses.replace(cfg, backend=probe)
    check_packing(trial, policy)
    return trial.backend.packing


def accepts_auto() -> bool:
    """Whether this checkout's `backend.packing` takes `auto` (a layout chosen when the run is built)."""
    try:
        BackendConfig(packing="auto").validate()
    except ConfigError:
        return False
    return True


# ---------------------------------------------------------------- TRL

def trl_inputs(batch: RolloutBatch, device: str) -> dict:
    """The generation batch `_generate_and_score_completions` would return, from the same tensors (split at the
    prompt width): what TRL's `_prepare_inputs` shuffles and splits into micro-batches."""
    P, mask = batch.prompt_width, batch.attention_mask
    inputs = {"prompt_ids": batch.input_ids[:, :P], "prompt_mask": mask[:, :P],
              "completion_ids": batch.input_ids[:, P:], "completion_mask": mask[:, P:],
              "advantages": batch.advantages, "num_items_in_batch": mask[:, P:].sum()}
    return {k: v.to(device) for k, v in inputs.items()}


@dataclass
class TrlArmSpec:
    name: str
    micro_batch: int  # sequences per micro-batch (per_device_train_batch_size)
    checkpointing: bool = False
    gpu_head: bool = False


def trl_arm_specs(sequences: int, device: str) -> tuple[list[TrlArmSpec], dict]:
    """TRL's arms for a batch of `sequences`, and {arm: why left out}."""
    specs, skipped = [TrlArmSpec("trl", sequences)], {}
    for parts in (4, 2):  # 8 x 4 and 16 x 2 at 32 sequences
        if sequences % parts:
            skipped[f"trl_accumulation_{parts}"] = f"{sequences} sequences do not split into {parts} equal parts"
        else:
            specs.append(TrlArmSpec(f"trl_accumulation_{sequences // parts}x{parts}", sequences // parts))
    specs.append(TrlArmSpec("trl_checkpointing", sequences, checkpointing=True))
    why = gpu_head_refusal(device)
    if why:
        skipped["trl_gpu_head"] = why
    else:
        specs.append(TrlArmSpec("trl_gpu_head", sequences, gpu_head=True))
    return specs, skipped


def gpu_head_refusal(device: str) -> str | None:
    """Why the diagnostic arm cannot run with the installed TRL on `device`; None when it can."""
    gate = getattr(trl_utils, "_use_triton", None)
    if gate is None or "_use_triton" not in inspect.getsource(trl_utils.add_fused_lm_head):
        return ("trl.trainer.utils has no `_use_triton` gate in add_fused_lm_head: this TRL version chooses its "
                "head's positions some other way")
    if gate(torch.device(device)):
        return f"on {device} TRL's head already scores completion positions only"
    return None


def trl_arms(cfg, model_path: str, batch: RolloutBatch, device: str, rows: list[dict],
             specs: list[TrlArmSpec]) -> list[Arm]:
    """A `GRPOTrainer` per spec on one model and one optimiser (module docstring)."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.model.dtype))
    timers, meter, inputs = Timers(device), Meter(model, "trl"), trl_inputs(batch, device)
    arms, first = [], None
    for spec in specs:
        trainer = build_trl(cfg, model_path, device, 100, timers, [], rows, model=model,
                            micro_batch=spec.micro_batch, accumulation=len(batch) // spec.micro_batch,
                            gradient_checkpointing=spec.checkpointing)
        if first is None:
            first = trainer
            trainer.create_optimizer_and_scheduler(num_training_steps=100)
            fused_forward = model.forward
        else:  # the one optimiser; the first trainer's fused head (each trainer patched the forward again)
            trainer.optimizer, trainer.lr_scheduler = first.optimizer, first.lr_scheduler
            model.forward = fused_forward
        settings = {"micro_batch": spec.micro_batch, "accumulation": len(batch) // spec.micro_batch,
                    "gradient_checkpointing": spec.checkpointing}
        diagnostic = ("DIAGNOSTIC: TRL's head on completion positions only, as on its GPU path "
                      "(trl.trainer.utils._use_triton patched to true; CPU tile kernel)") if spec.gpu_head else ""
        arms.append(Arm(spec.name, "trl", trl_step(trainer, inputs, timers, spec.gpu_head), timers, meter,
                        settings, diagnostic))
    return arms


def trl_step(trainer, inputs: dict, timers: Timers, gpu_head: bool) -> Callable[[], float]:
    """One optimiser step as TRL's training loop runs it (module docstring); returns the gradient norm."""
    model, args = trainer.model, trainer.args
    accumulation = args.gradient_accumulation_steps
    trainer._generate_and_score_completions = lambda generation_batch: dict(inputs)

    def step() -> float:
        with contextlib.ExitStack() as stack:
            if args.gradient_checkpointing:  # as Trainer.train() enables it
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
                stack.callback(model.gradient_checkpointing_disable)
            if gpu_head:
                stack.enter_context(mock.patch.object(trl_utils, "_use_triton", lambda device: True))
            trainer.current_gradient_accumulation_steps = accumulation  # set by the loop per optimiser step
            for i in range(accumulation):
                trainer.accelerator.gradient_state._set_sync_gradients(i == accumulation - 1)
                trainer.training_step(model, {}, None)  # `_prepare_inputs` generates (here: hands over the batch)
        timers.sync()
        start = time.perf_counter()
        norm = trainer._clip_grad_norm(model)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        timers.sync()
        timers.acc["optimiser"] += time.perf_counter() - start
        return float(norm)
    return step


# ---------------------------------------------------------------- TRL's own loop, one step at a time

class SteppedTrainer:
    """`trainer.train()` on a thread of its own, paused after each optimiser step; `step()` runs the next one (the
    fetch of its prompts, generation, scoring, the update, TRL's callbacks). Only one thread runs at a time."""

    def __init__(self, trainer, timers: Timers):
        self.resume, self.paused = threading.Semaphore(0), threading.Semaphore(0)
        self.error, self.finished, self.stopping = None, False, False
        trainer.add_callback(_Pause(self, timers))
        trainer.remove_callback(PrinterCallback)  # its summary of train() would land in the middle of the report
        self.thread = threading.Thread(target=self._train, args=(trainer, torch.get_num_threads()), daemon=True)
        self.thread.start()
        self._wait()  # until the loop begins: its setup is not timed

    def step(self) -> None:
        if self.finished:
            raise RuntimeError("TRL's train() has already run its max_steps")
        self.resume.release()
        self._wait()

    def close(self) -> None:
        """Let `train()` end (after at most one more step, if any remain) and join its thread."""
        self.stopping = True
        while not self.finished:
            self.resume.release()
            self.paused.acquire()
        self.thread.join()

    def _train(self, trainer, threads: int) -> None:
        torch.set_num_threads(threads)
        try:
            trainer.train()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            self.error = e
        finally:
            self.finished = True
            self.paused.release()

    def _wait(self) -> None:
        self.paused.acquire()
        if self.error is not None:
            raise RuntimeError(f"TRL's train() failed: {self.error!r}") from self.error


class _Pause(TrainerCallback):
    """Hands control back after each step; adds the optimiser step to the update phase (as `run_alternating`)."""

    def __init__(self, stepper: SteppedTrainer, timers: Timers):
        self.stepper, self.timers, self.start = stepper, timers, 0.0

    def on_train_begin(self, args, state, control, **k):
        return self._pause(control)

    def on_pre_optimizer_step(self, *a, **k):
        self.timers.sync()
        self.start = time.perf_counter()

    def on_optimizer_step(self, *a, **k):
        self.timers.sync()
        self.timers.acc["update"] += time.perf_counter() - self.start

    def on_step_end(self, args, state, control, **k):
        return self._pause(control)

    def _pause(self, control):
        self.stepper.paused.release()
        self.stepper.resume.acquire()
        if self.stepper.stopping:  # closed early (an error elsewhere): no more steps
            control.should_training_stop = True
        return control
