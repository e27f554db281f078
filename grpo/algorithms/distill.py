"""On-policy distillation: the student samples, a teacher scores each sampled token, the student descends the
reverse KL to the teacher on its own samples, through GRPO's update.

One step, as `train_step` below reads:
1. take B prompts; the rollout engine samples G completions of each from the student (the same engine, budget and
   asynchronous pipeline as GRPO); the reward functions score them (logged, and trained on with
   `algorithm.reward_weight`);
2. the student's and the teacher's log-probs of every sampled token (`algorithm.teacher`: a local teacher's logits
   chunked over positions, `algorithm.teacher.chunk_size`, or a vLLM server's prompt log-probs,
   `algorithm.teacher.url`, grpo.model.served_teacher);
3. the per-token advantage A_t = -(log pi(y_t) - log q(y_t)) (`grpo.core.losses.reverse_kl_advantages`), plus
   `reward_weight` x the group-relative advantage of the sample's reward when set;
4. the policy update of GRPO (`grpo.training.update.update_policy`: `algorithm.policy_loss`, micro-batches,
   data parallel, LoRA, ZeRO, the sampler corrections of asynchronous rollout) on those advantages;
5. the new weights go to the rollout engine. Evaluation, logging and checkpoints are the shared loop's.

Which estimator, and why. The loss is the reverse KL(student || teacher) over the student's own samples, estimated
per sampled token by log pi(y_t) - log q(y_t) and used as a (negated) advantage in the policy-gradient loss, with
discount 0 (each token's advantage is its own term), as Thinking Machines' "On-Policy Distillation" (Lu et al.,
2025) does. Chosen over the full-vocabulary reverse KL because it needs the teacher's log-prob of the sampled token
only (one gather per position, the same as a reference model's), so it goes through the very update GRPO uses, every
policy loss, importance correction and backend included, and a reward adds to it as one more advantage. Its
gradient is unbiased for the sequence-level reverse KL and noisier than the full-vocabulary one per token; the
full-vocabulary divergence is `algorithm=gkd` with `algorithm.gkd.beta=1` (`grpo.algorithms.gkd`).

Where this departs from GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes") and from Thinking Machines' recipe:
1. Fully on-policy (GKD's lambda = 1) with the sampled-token estimator rather than GKD's full-vocabulary divergence.
2. Both models are scored at `rollout.temperature` (the demo's 1.0), the temperature the student sampled at; a
   served teacher (`algorithm.teacher.url`) only at 1.0, since vLLM's prompt log-probs skip the temperature.
3. The student's log-prob in the advantage is the trainer's (the "old" policy of the update), not the sampler's;
   with asynchronous rollout (`rollout.max_staleness`) the sampler's older policy is corrected for by the update's
   TIS/MIS, as in GRPO.
4. With `reward_weight` > 0 the task's reward joins as GRPO's group-relative advantage (`algorithm.advantage`);
   samples without a reward then get no gradient, as in GRPO. With 0 every sample trains, rewarded or not.
"""

from __future__ import annotations

import time

import torch

from grpo import distributed as dist
from grpo.core.advantages import compute_advantages
from grpo.core.batch import RolloutBatch, layout_batch
from grpo.core.losses import reverse_kl_advantages
from grpo.model.served_teacher import ServedTeacher
from grpo.training.loop import StepResult, no_signal_reason, run_rollout_loop, sync_and_finish
from grpo.training.pipeline import InlineRollout, RolloutPipeline
from grpo.training.run import Run
from grpo.training.sampling import Groups, gather_groups, reward_stats
from grpo.training.update import score_logprobs, update_options, update_policy


def train(run: Run) -> list[dict]:
    """Distillation steps from `run.start_step + 1` to `train.max_steps`; returns the logged metrics. With
    `rollout.max_staleness` > 0 the batches are sampled ahead on a rollout thread, as GRPO's."""
    return run_rollout_loop(run, train_step)


def train_step(run: Run, step: int, rollout: RolloutPipeline | InlineRollout | None = None) -> StepResult:
    """One distillation step on the batch `rollout` hands over: its metrics and the whole step's groups."""
    cfg, algo = run.cfg, run.cfg.algorithm
    rollout = rollout or InlineRollout(run)
    # 1. the student samples G completions per prompt; the rewards score them
    groups, metrics = rollout.take(step)
    everyone, offset = gather_groups(groups)
    metrics |= reward_stats(everyone)
    if algo.reward_weight:  # broken rewards only matter when they are trained on
        skipped = no_signal_reason(run, offset >= 0, metrics["train/reward_masked_frac"], step)
        if skipped:
            return StepResult(metrics, everyone, skipped)
    batch, valid = reward_batch(run, groups, everyone, max(offset, 0))
    start = time.perf_counter()
    # 2-3. student and teacher log-probs of the sampled tokens -> per-token advantages
    metrics |= add_distillation_advantages(run, batch)
    # 4. GRPO's update on those advantages
    metrics |= update_policy(run.backend, batch, algo, **update_options(cfg))
    metrics["time/update_s"] = time.perf_counter() - start
    # 5. the rollout engine samples from the new weights next step
    return sync_and_finish(run, step, rollout, metrics, everyone, valid)


def reward_batch(run: Run, groups: Groups, everyone: Groups, offset: int) -> tuple[RolloutBatch, torch.Tensor]:
    """This rank's rows laid out, `advantages` [N] the reward's share (`reward_weight` x the group-relative
    advantage over the whole step's groups, 0 without a reward weight), and the whole step's validity mask."""
    algo = run.cfg.algorithm
    batch = layout_batch(groups.prompt_ids, groups.completion_ids, algo.group_size, run.tokenizer.pad_token_id,
                         groups.sampler_logprobs, groups.loss_masks)
    valid = torch.tensor([r is not None for r in everyone.rewards])  # [N_all]
    if algo.reward_weight:
        advantages, valid, _ = compute_advantages(everyone.rewards, algo.group_size, algo.advantage)  # [N_all]
        mine = slice(offset, offset + len(groups.completion_ids))
        batch.advantages = algo.reward_weight * advantages[mine]  # [N]
        batch.completion_mask *= valid[mine][:, None].float()  # a sample without a reward: no gradient
    return batch, valid


def add_distillation_advantages(run: Run, batch: RolloutBatch) -> dict:
    """Set `batch.old_logprobs` (the student's, the update's old policy), `batch.ref_logprobs` when the loss has a
    KL term, and `batch.advantages` [N, T-1]: the per-token reverse-KL advantage plus the reward's share. Returns
    `distill/*` metrics over every rank's tokens."""
    cfg, algo = run.cfg, run.cfg.algorithm
    options = dict(temperature=cfg.rollout.temperature, micro_batch_tokens=cfg.backend.micro_batch_tokens)
    student = score_logprobs(run.backend.model, batch, packing=cfg.backend.packing, **options)  # [N, T-1]
    teacher = teacher_logprobs(run, batch, options)  # [N, T-1]
    if algo.beta > 0:
        batch.ref_logprobs = score_logprobs(run.ref_model, batch, packing=cfg.backend.packing, **options)
    mask = batch.completion_mask  # [N, T-1]
    distill = reverse_kl_advantages(student, teacher, mask)  # [N, T-1]
    batch.old_logprobs = student
    batch.advantages = distill + batch.advantages[:, None] * mask  # [N, T-1]
    sums = dist.all_reduce_sum(torch.stack([-(distill * mask).sum(), (teacher * mask).sum(),
                                            (student * mask).sum(), mask.sum()]).double())
    tokens = max(float(sums[3]), 1.0)
    return {"distill/reverse_kl": float(sums[0]) / tokens, "distill/teacher_logprob": float(sums[1]) / tokens,
            "distill/student_logprob": float(sums[2]) / tokens}


def teacher_logprobs(run: Run, batch: RolloutBatch, options: dict) -> torch.Tensor:
    """The teacher's log-probs [N, T-1] of the batch's sampled tokens: from its server (`algorithm.teacher.url`,
    at temperature 1, the only one the config lets through), or forwarded here, chunked over positions."""
    if isinstance(run.teacher, ServedTeacher):
        return run.teacher.score(batch)
    return score_logprobs(run.teacher, batch, chunk_size=run.cfg.algorithm.teacher.chunk_size or None, **options)
