"""Online DPO: preference pairs sampled from the current policy as training goes, one DPO step on each batch.

One step, as `train_step` below reads:
1. take B prompts; the rollout engine samples G completions of each from the current policy (the same
   engine, reward scorer and budget per step as GRPO);
2. the reward functions (or a reward model) score them; in each group whose rewards differ, the
   highest-scored completion is chosen and the lowest rejected (the first of equals); groups with equal
   rewards, or with fewer than two scored completions, give no pair;
3. the DPO loss (Rafailov et al. 2023) on those pairs against the frozen starting policy:
       loss = -mean log sigmoid(beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))))
   with summed completion log-probs (or another `algorithm.dpo.loss_type`), one optimiser step, micro-batched
   by the token budget, exact: `grpo.algorithms.preference.dpo_update`, the same update as offline DPO
   (`grpo.algorithms.dpo`);
4. the new weights go to the rollout engine. Evaluation, logging and checkpoints are the shared loop's.

Where this departs from online DPO as published (Guo et al. 2024, "Direct language model alignment from
online AI feedback"): by default the annotator is the task's reward (a verifiable checker or a learned reward
model) rather than an LLM judge, and each group gives its best-against-worst pair. With
`algorithm.dpo.pair_judge` (the options of `rewards.judge.judge_pairs`) the annotator is an LLM judge, as in the
paper: it compares each group's first two distinct completions, asked in both orders; a group whose verdict
follows the order (0.5) or that the judge could not answer gives no pair (`train/dpo_pairs_undecided`).
"""

from __future__ import annotations

import torch

from grpo import distributed as dist
from grpo.algorithms.preference import dpo_update, pair_batch
from grpo.errors import ConfigError, RewardInfraError
from grpo.faults import crash_point
from grpo.training.loop import StepResult, no_signal_reason, replica_check, run_loop
from grpo.training.run import Run
from grpo.training.sampling import gather_groups, reward_stats, rollout_metrics, sample_groups
from rewards import RewardConfigError
from rewards.judge import JudgeUnavailableError, judge_pairs, probe_pairs


def train(run: Run) -> list[dict]:
    """Online DPO steps from `run.start_step + 1` to `train.max_steps`; returns the logged metrics."""
    if run.cfg.algorithm.dpo.pair_judge:
        try:
            probe_pairs(run.cfg.algorithm.dpo.pair_judge)
        except RewardConfigError as e:
            raise ConfigError(f"algorithm.dpo.pair_judge: {e}") from None
    return run_loop(run, train_step)


def train_step(run: Run, step: int) -> StepResult:
    """One online DPO step on pairs from a fresh rollout batch."""
    cfg = run.cfg
    groups, metrics = sample_groups(run, cfg.train.prompts_per_step)  # this rank's share of the prompts
    everyone, _ = gather_groups(groups)
    metrics |= reward_stats(everyone)
    if cfg.algorithm.dpo.pair_judge:
        prompts = [row["prompt"] for row in groups.rows]
        try:
            pairs, undecided = judged_pairs(prompts, groups.texts, cfg.algorithm.group_size,
                                            cfg.algorithm.dpo.pair_judge)
        except JudgeUnavailableError as e:  # one line and exit status 2, as for the rewards' infrastructure
            raise RewardInfraError(f"step {step}: algorithm.dpo.pair_judge: {e}") from None
        metrics["train/dpo_pairs_undecided"] = undecided
    else:
        pairs = best_and_worst(groups.rewards, cfg.algorithm.group_size)  # [(chosen row, rejected row)], this rank's
    total_pairs = int(dist.all_reduce_sum(torch.tensor([len(pairs)]))[0])
    valid = torch.tensor([r is not None for r in everyone.rewards])
    metrics |= rollout_metrics(everyone, valid) | {"train/dpo_pairs": total_pairs}
    skipped = no_signal_reason(run, total_pairs > 0, metrics["train/reward_masked_frac"], step)
    if skipped:
        return StepResult(metrics, everyone, skipped)
    # a rank without a pair of its own runs a zero-weighted one: every rank takes part in the step
    rows, G = pairs or [(0, 1)], cfg.algorithm.group_size
    batch = pair_batch(run, [groups.prompt_ids[i // G] for i, _ in rows],
                       [groups.completion_ids[i] for pair in rows for i in pair])
    metrics |= dpo_update(run, batch, total_pairs, own_pairs=bool(pairs))
    crash_point("mid_step", step)
    metrics["time/weight_sync_s"] = run.engine.sync_weights(run.policy)
    metrics |= replica_check(run, step)
    return StepResult(metrics, everyone)


def best_and_worst(rewards: list[float | None], group_size: int) -> list[tuple[int, int]]:
    """Per group whose scored rewards differ: (row of its highest reward, row of its lowest), first of equals."""
    pairs = []
    for start in range(0, len(rewards), group_size):
        scored = [(r, start + j) for j, r in enumerate(rewards[start : start + group_size]) if r is not None]
        if len(scored) < 2:
            continue
        best = max(scored, key=lambda x: x[0])  # max and min keep the first of equal values
        worst = min(scored, key=lambda x: x[0])
        if best[0] > worst[0]:
            pairs.append((best[1], worst[1]))
    return pairs


def judged_pairs(prompts: list[str], texts: list[str], group_size: int, options: dict
                 ) -> tuple[list[tuple[int, int]], int]:
    """Per group: its first two distinct completions, ordered (chosen row, rejected row) by a pairwise LLM judge
    (`rewards.judge.judge_pairs` with `options`); and how many groups gave no pair (a tie, or no verdict)."""
    candidates = []  # (group, row a, row b)
    for g, start in enumerate(range(0, len(texts), group_size)):
        rows = range(start, start + group_size)
        b = next((j for j in rows if texts[j] != texts[start]), None)
        if b is not None:
            candidates.append((g, start, b))
    prefs = judge_pairs([prompts[g] for g, _, _ in candidates], [texts[a] for _, a, _ in candidates],
                        [texts[b] for _, _, b in candidates], **options) if candidates else []
    pairs = [(a, b) if p > 0.5 else (b, a) for (_, a, b), p in zip(candidates, prefs) if p is not None and p != 0.5]
    return pairs, len(prompts) - len(pairs)
