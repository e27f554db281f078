"""The outer loop every algorithm shares: steps, evaluation, logging, samples, checkpoints.

An algorithm (each a module of `grpo.algorithms`: GRPO in `grpo`, PPO in `ppo`, offline DPO in `dpo`, online DPO in
`online_dpo`, RFT and SFT in `supervised`, on-policy distillation in `distill`, GKD in `gkd`) supplies one training
step; this loop runs it from the run's first step to `train.max_steps` (offline DPO: the steps its pairs make) and
around it does what every algorithm needs in the same way: the step-0 line (held-out accuracy, the data report, the warm
start), evaluation every `train.eval_every` steps and after the last, the best validation accuracy so far
(`checkpoint.keep_best`, `train.early_stop`), the metrics line, sample logging, the crash points of the fault-injection
tests, and checkpoints (with the algorithm's own state, e.g. PPO's critic). The guard against broken rewards
(`no_signal_reason`) and the replica check are here too, for every algorithm's step, and what the steps that sample
from a rollout engine share: their loop with the asynchronous pipeline (`run_rollout_loop`) and their end, from the
weight sync to the rollout metrics (`sync_and_finish`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from grpo import distributed as dist
from grpo.errors import MaskedRewardsError
from grpo.faults import crash_point
from grpo.training.checkpoint import save_best, save_checkpoint
from grpo.training.evaluate import evaluate_run
from grpo.training.pipeline import InlineRollout, RolloutPipeline
from grpo.training.run import Run
from grpo.training.sampling import Groups, rollout_metrics

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one training step hands the loop."""

    metrics: dict
    groups: Groups  # the step's sampled groups (every rank's), for sample logging
    skipped: str | None = None  # why the step made no update; None when it did


# One training step of an algorithm: (run, step number) -> what it did.
Step = Callable[[Run, int], StepResult]


def run_loop(run: Run, train_step: Step, extra_state: Callable[[], dict] = dict,
             extra_backends: dict | None = None, max_steps: int | None = None) -> list[dict]:
    """Run `train_step` from `run.start_step + 1` to `max_steps` (default `train.max_steps`; offline DPO
    derives its own from its pairs); returns the logged metrics. `extra_state` is what the algorithm keeps
    besides the policy (PPO: its critic), saved in checkpoints; `extra_backends` (name -> backend) are the
    backends of the other models it trains, whose DeepSpeed shards the checkpoints hold
    (`grpo.training.checkpoint.sharded_dir`)."""
    cfg = run.cfg
    last = max_steps or cfg.train.max_steps
    run.tracker.set_total_steps(last)
    history = []
    if run.start_step == 0:  # the starting point: held-out accuracy, the data report, the warm start
        evaluated = evaluate_and_record(run, 0) if cfg.train.eval_before else {}
        track_best(run, 0, evaluated)
        history.append({"step": 0, **evaluated, **run.setup_metrics})
        run.tracker.log(0, run.setup_metrics | evaluated)
    for step in range(run.start_step + 1, last + 1):
        start = time.perf_counter()
        result = train_step(run, step)
        metrics = result.metrics
        if result.skipped:
            log.warning("step %d: %s; no update", step, result.skipped)
            run.tracker.log(step, {**metrics, "time/step_s": time.perf_counter() - start})
            checkpoint_if_due(run, step, extra_state, last, extra_backends)
            continue
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 or step == last:
            metrics |= evaluate_and_record(run, step)
            track_best(run, step, metrics)
        metrics["time/step_s"] = dist.all_reduce_max(time.perf_counter() - start)
        run.tracker.log(step, metrics)  # rank 0 writes
        history.append({"step": step, **metrics})
        log_samples_if_due(run, step, result.groups)
        crash_point("after_metrics", step)
        stop = should_stop_early(run, step, last)
        checkpoint_if_due(run, step, extra_state, last, extra_backends, stopped=stop)
        if stop:
            break
    return history


def run_rollout_loop(run: Run, train_step: Callable[..., StepResult]) -> list[dict]:
    """`run_loop` over a step that takes its batch from a rollout, `train_step(run, step, rollout=...)`: sampled
    on the training thread, or ahead on a rollout thread when `rollout.max_staleness` > 0
    (`grpo.training.pipeline`). GRPO's loop and on-policy distillation's."""
    if not run.cfg.rollout.max_staleness:
        return run_loop(run, train_step)
    pipeline = RolloutPipeline(run)
    try:
        return run_loop(run, partial(train_step, rollout=pipeline))
    finally:
        pipeline.close()


def sync_and_finish(run: Run, step: int, rollout: RolloutPipeline | InlineRollout, metrics: dict, everyone: Groups,
                    valid: torch.Tensor) -> StepResult:
    """The end of a step whose optimiser step is taken: the mid-step crash point (the fault tests'), the new
    weights into the rollout engine (`rollout.sync_weights`; asynchronous: for the batches queued after it), the
    replica check, and the rollout metrics of the whole step's groups `everyone` (`valid` [N_all]: the samples
    that count). Returns the step's result with `metrics` (updated in place)."""
    crash_point("mid_step", step)
    metrics |= rollout.sync_weights(run.policy)
    metrics |= replica_check(run, step)
    if everyone.completion_ids:  # GKD with no on-policy share samples nothing
        metrics |= rollout_metrics(everyone, valid)
    return StepResult(metrics, everyone)


def evaluate_and_record(run: Run, step: int) -> dict:
    """The evaluation's metrics; which problems it solved go to the run's eval_outcomes.jsonl."""
    outcomes: dict[str, dict] = {}
    metrics = evaluate_run(run, outcomes)
    if outcomes:
        run.tracker.log_outcomes(step, outcomes)
    return metrics


def track_best(run: Run, step: int, metrics: dict) -> None:
    """Remember the best `val/accuracy` so far and how many evaluations ago it was; with
    `checkpoint.keep_best`, write a better policy to `checkpoints/best`."""
    if "val/accuracy" not in metrics:
        return
    accuracy = metrics["val/accuracy"]
    if not run.best or accuracy > run.best["accuracy"]:
        run.best = {"accuracy": accuracy, "step": step, "since": 0}
        if run.cfg.checkpoint.keep_best:
            record = {k: v for k, v in metrics.items() if k.startswith(("val/", "eval/"))}
            save_best(run.cfg.run_dir, step, policy=run.policy, tokenizer=run.tokenizer, record=record,
                      backend=run.backend, merge_lora=run.cfg.checkpoint.merge_lora)
    else:
        run.best["since"] += 1
    metrics["val/best_accuracy"], metrics["val/best_step"] = run.best["accuracy"], run.best["step"]


def should_stop_early(run: Run, step: int, last: int) -> bool:
    """`train.early_stop` evaluations in a row without a better `val/accuracy`: the run ends here
    (before its `last` step)."""
    patience = run.cfg.train.early_stop
    if not patience or not run.best or run.best["since"] < patience or step == last:
        return False
    log.warning("step %d: early stop: no better val/accuracy in %d evaluations (best %.3f at step %d)",
                step, run.best["since"], run.best["accuracy"], run.best["step"])
    return True


def log_samples_if_due(run: Run, step: int, groups: Groups) -> None:
    """The first `train.num_samples_logged` samples (prompt, completion, reward) every `samples_every` steps."""
    every, k = run.cfg.train.samples_every, run.cfg.train.num_samples_logged
    if every and step % every == 0:
        per_row = len(groups.texts) // max(1, len(groups.rows))  # G sampled completions, or 1 demonstration
        prompts = [r["prompt"] for r in groups.rows for _ in range(per_row)]
        run.tracker.log_samples(step, prompts[:k], groups.texts[:k], groups.rewards[:k])


def checkpoint_if_due(run: Run, step: int, extra_state: Callable[[], dict], last: int,
                      extra_backends: dict | None = None, stopped: bool = False) -> None:
    """Save a checkpoint every `checkpoint.every_steps` steps and after the `last` one (or an early stop)."""
    cfg = run.cfg
    if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 or step == last or stopped:
        state = training_state(run) | extra_state()
        save_checkpoint(cfg.run_dir, step, policy=run.policy, tokenizer=run.tokenizer, state=state,
                        keep_last=cfg.checkpoint.keep_last, backend=run.backend, extra_backends=extra_backends,
                        merge_lora=cfg.checkpoint.merge_lora)


def training_state(run: Run) -> dict:
    """Everything besides the weights and the per-rank RNG streams that a resumed run needs to continue
    exactly. Dynamic sampling keeps no buffer across steps (surplus groups are dropped), so the sampler's
    position and the RNG streams are all of its state."""
    return {"backend": run.backend.state_dict(), "sampler": run.sampler.state(),
            "guards": {"masked_steps": run.masked_steps}, "best": dict(run.best)}


def replica_check(run: Run, step: int, **models) -> dict:
    """Every `backend.check_replicas_every` steps: how far the ranks' copies of the policy (and of any other
    `models` trained data-parallel, e.g. PPO's critic) are apart; 0 when they are in sync."""
    every = run.cfg.backend.check_replicas_every
    if not every or step % every:
        return {}
    with run.backend.gathered_for_rollout():  # ZeRO-3: the full weights
        out = {"dist/replica_weight_diff": dist.replica_difference(run.policy)}
    return out | {f"dist/{name}_replica_weight_diff": dist.replica_difference(m) for name, m in models.items()}



def no_signal_reason(run: Run, every_rank_has_groups: bool, masked_frac: float, step: int) -> str | None:
    """Why this step has nothing to train on, or None; raises after too many fully masked steps in a row.

    A step whose every sampled reward is masked (each reward raised, ran past its deadline or returned
    None) trains on nothing; `train.max_masked_steps` such steps in a row stop the run, since the
    rewards are then broken rather than unlucky.
    """
    if masked_frac < 1.0:
        run.masked_steps = 0
    else:
        run.masked_steps += 1
        limit = run.cfg.train.max_masked_steps
        if limit and run.masked_steps >= limit:
            raise MaskedRewardsError(
                f"step {step}: every reward was masked (raised, timed out or None) on {run.masked_steps} steps "
                f"in a row (train.max_masked_steps={limit}); check the reward functions' logged errors"
            )
        return f"all rewards masked ({run.masked_steps} steps in a row)"
    if not every_rank_has_groups:  # dynamic sampling found no group with a reward signal (on some rank)
        return "every sampled group had equal rewards" + (" on some rank" if dist.world_size() > 1 else "")
    return None
