"""The GRPO loop: sample -> score -> advantage -> loss -> step -> sync -> log.

One step, as `train_step` below reads:
1. take B prompts; the rollout engine samples G completions of each;
2. the reward functions score them (None = not applicable: masked out of the loss);
3. the advantage estimator turns each group's rewards into advantages;
4. the policy is updated on the batch (`epochs` passes of `mini_batches` optimiser steps,
   micro-batched by a token budget, gradients accumulated exactly: `grpo.training.update`);
5. the new weights go to the rollout engine.
The loop around the steps (evaluation, metrics, samples, checkpoints) is `grpo.training.loop`, shared with PPO.

Where this departs from GRPO as published (DeepSeekMath, Shao et al. 2024):
1. The loss defaults to DAPO's token mean over the whole batch rather than the per-sequence mean
   (`algorithm.loss_agg`), so long completions are not down-weighted.
2. The KL penalty is off by default (`algorithm.beta: 0`), and then no reference model is loaded.
3. With one pass over each batch (the default) the old policy is the current one: the
   importance ratio is exactly 1 and no old log-probs are computed.
4. A sample whose reward is None counts neither in its group's baseline nor in the loss.
5. With an environment (`env=...`), a sample is a whole multi-turn episode (`grpo.rollout.episodes`): the
   group baseline is over the G episodes of a prompt, and the environment's tokens get no gradient.
6. With `rollout.max_staleness` = N > 0 (asynchronous rollout, `grpo.training.pipeline`) the batch was sampled by a
   policy up to N updates old, while the previous step trained; the loss's importance correction
   (`algorithm.tis_cap`, `mis_low`/`mis_high`) takes the sampler's log-probs as the behaviour policy.

Data parallel (several ranks, `grpo.distributed`): each rank samples and scores its own share
of the step's prompts (a group never straddles ranks); the scored groups are gathered so that
advantages (REINFORCE++ whitens over the whole batch), metrics and samples are computed on the
whole batch; each rank trains on its share with the loss normalised by the global token and
sequence counts, so the summed gradient is the one-rank gradient of the whole batch.
"""

from __future__ import annotations

import time

import torch

from grpo import distributed as dist
from grpo.core.advantages import compute_advantages
from grpo.core.batch import RolloutBatch, layout_batch
from grpo.training.loop import StepResult, no_signal_reason, run_rollout_loop, sync_and_finish
from grpo.training.pipeline import InlineRollout, RolloutPipeline
from grpo.training.run import Run
from grpo.training.sampling import Groups, gather_groups, reward_stats
from grpo.training.update import score_logprobs, update_options, update_policy

ALL_MASKED = "every completion token is masked (truncated under algorithm.mask_truncated, or no reward)"


def train(run: Run) -> list[dict]:
    """GRPO steps from `run.start_step + 1` to `train.max_steps`; returns the logged metrics. With
    `rollout.max_staleness` > 0 the batches are sampled ahead on a rollout thread (`grpo.training.pipeline`)."""
    return run_rollout_loop(run, train_step)


def train_step(run: Run, step: int, rollout: RolloutPipeline | InlineRollout | None = None) -> StepResult:
    """One GRPO step on the batch `rollout` hands over (by default sampled now, from the current weights):
    its metrics, the whole step's groups (every rank's) and, when it made no update, why.
    Evaluation, logging and checkpoints are the loop's."""
    cfg, algo = run.cfg, run.cfg.algorithm
    rollout = rollout or InlineRollout(run)
    # 1-2. sample G completions per prompt and score them (each rank its share of the prompts)
    groups, metrics = rollout.take(step)
    everyone, offset = gather_groups(groups)
    metrics |= reward_stats(everyone)
    skipped = no_signal_reason(run, offset >= 0, metrics["train/reward_masked_frac"], step)
    if skipped:
        return StepResult(metrics, everyone, skipped)
    # 3. group-relative advantages over the whole step's batch; this rank keeps its rows
    batch, valid = advantage_batch(run, groups, everyone, offset)
    if float(dist.all_reduce_sum(batch.completion_mask.sum())) == 0:  # on every rank: a no-op, not a fault
        return StepResult(metrics, everyone, ALL_MASKED)
    start = time.perf_counter()  # the training phase: what asynchronous rollout overlaps with generation
    add_old_and_reference_logprobs(run, batch)
    # 4. the policy loss (algorithm.policy_loss), backward, optimiser steps (gradients summed over ranks; a step whose
    #    loss or gradient is not finite is skipped)
    metrics |= update_policy(run.backend, batch, algo, **update_options(cfg))
    metrics["time/update_s"] = time.perf_counter() - start
    # 5. the rollout engine samples from the new weights next step (asynchronous: the batches queued after it)
    return sync_and_finish(run, step, rollout, metrics, everyone, valid)


def advantage_batch(run: Run, groups: Groups, everyone: Groups, offset: int) -> tuple[RolloutBatch, torch.Tensor]:
    """This rank's rows laid out for the update, with their advantages computed over the whole step's
    groups (`everyone`, this rank's rows starting at `offset`), and the whole step's validity mask.

    Negative advantages are scaled by `negative_weight`. A sample without a reward (left out of its
    group's statistics) or truncated under `mask_truncated` gets no gradient.
    """
    algo = run.cfg.algorithm
    advantages, valid, _ = compute_advantages(everyone.rewards, algo.group_size, algo.advantage)  # [N_all]
    advantages = torch.where(advantages < 0, advantages * algo.negative_weight, advantages)  # [N_all]
    mine = slice(offset, offset + len(groups.completion_ids))
    batch = layout_batch(groups.prompt_ids, groups.completion_ids, algo.group_size, run.tokenizer.pad_token_id,
                         groups.sampler_logprobs, groups.loss_masks)
    batch.advantages = advantages[mine]  # [N]
    keep = valid[mine] & ~torch.tensor(groups.truncated) if algo.mask_truncated else valid[mine]  # [N]
    batch.completion_mask *= keep[:, None].float()
    return batch, valid


def add_old_and_reference_logprobs(run: Run, batch: RolloutBatch) -> None:
    """The sampling policy's log-probs when the batch takes several updates (the ratio's denominator),
    and the reference model's when the loss has a KL term."""
    cfg, algo = run.cfg, run.cfg.algorithm
    T, budget = cfg.rollout.temperature, cfg.backend.micro_batch_tokens
    if algo.epochs * algo.mini_batches > 1:
        batch.old_logprobs = score_logprobs(run.backend.model, batch, temperature=T, micro_batch_tokens=budget,
                                            packing=cfg.backend.packing)
    if algo.beta > 0:
        batch.ref_logprobs = score_logprobs(run.ref_model, batch, temperature=T, micro_batch_tokens=budget,
                                            packing=cfg.backend.packing)
