"""Online DPO: preference pairs sampled from the current policy as training goes, one DPO step on each batch.

One step, as `train_step` below reads:
1. take B prompts; the rollout engine samples G completions of each from the current policy (the same
   engine, reward scorer and budget per step as GRPO);
2. the reward functions (or a reward model) score them; in each group whose rewards differ, the
   highest-scored completion is chosen and the lowest rejected (the first of equals); groups with equal
   rewards, or with fewer than two scored completions, give no pair;
3. the DPO loss (Rafailov et al. 2023) on those pairs against the frozen starting policy:
       loss = -mean log sigmoid(beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))))
   with summed completion log-probs, one optimiser step (micro-batched by the token budget, exact);
4. the new weights go to the rollout engine. Evaluation, logging and checkpoints are the shared loop's.

Where this departs from online DPO as published (Guo et al. 2024, "Direct language model alignment from
online AI feedback"): the annotator is the task's reward (a verifiable checker or a learned reward model)
rather than an LLM judge, and each group gives its best-against-worst pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grpo.batch import RolloutBatch, layout_batch
from grpo.faults import crash_point
from grpo.loop import StepResult, no_signal_reason, run_loop
from grpo.run import Run
from grpo.sampling import Groups, reward_stats, rollout_metrics, sample_groups
from grpo.update import equal_count_micro_batches, forward_logprobs, score_logprobs


def train(run: Run) -> list[dict]:
    """Online DPO steps from `run.start_step + 1` to `train.max_steps`; returns the logged metrics."""
    return run_loop(run, train_step)


def train_step(run: Run, step: int) -> StepResult:
    """One online DPO step on pairs from a fresh rollout batch."""
    cfg = run.cfg
    groups, metrics = sample_groups(run, cfg.train.prompts_per_step)
    metrics |= reward_stats(groups)
    pairs = best_and_worst(groups.rewards, cfg.algorithm.group_size)  # [(chosen row, rejected row)]
    valid = torch.tensor([r is not None for r in groups.rewards])
    metrics |= rollout_metrics(groups, valid) | {"train/dpo_pairs": len(pairs)}
    skipped = no_signal_reason(run, bool(pairs), metrics["train/reward_masked_frac"], step)
    if skipped:
        return StepResult(metrics, groups, skipped)
    batch = pair_batch(run, groups, pairs)
    metrics |= dpo_update(run, batch, len(pairs))
    crash_point("mid_step", step)
    metrics["time/weight_sync_s"] = run.engine.sync_weights(run.policy)
    return StepResult(metrics, groups)


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


def pair_batch(run: Run, groups: Groups, pairs: list[tuple[int, int]]) -> RolloutBatch:
    """Rows chosen, rejected, chosen, rejected, ... laid out as groups of 2, with the reference's log-probs."""
    G, T = run.cfg.algorithm.group_size, run.cfg.rollout.temperature
    rows = [i for pair in pairs for i in pair]
    batch = layout_batch([groups.prompt_ids[i // G] for i, _ in pairs], [groups.completion_ids[i] for i in rows],
                         2, run.tokenizer.pad_token_id)
    batch.ref_logprobs = score_logprobs(run.ref_model, batch, temperature=T,
                                        micro_batch_tokens=run.cfg.backend.micro_batch_tokens)  # [2P, T-1]
    return batch


def dpo_loss(policy_seq: torch.Tensor, ref_seq: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: the DPO loss and the implicit reward margin, from summed log-probs [2P] (chosen, rejected, ...)."""
    logratio = policy_seq - ref_seq  # [2P]
    margin = beta * (logratio[0::2] - logratio[1::2])  # [P]
    return -F.logsigmoid(margin), margin.detach()


def dpo_update(run: Run, batch: RolloutBatch, num_pairs: int) -> dict:
    """One optimiser step on the batch's pairs; each micro-batch holds whole pairs, and its loss is its share
    of the mean over all pairs, so the accumulated gradient is that of the mean."""
    cfg, beta = run.cfg, run.cfg.algorithm.dpo.beta
    lengths = batch.attention_mask.sum(1).tolist()
    pair_lengths = [lengths[2 * p] + lengths[2 * p + 1] for p in range(num_pairs)]
    device = next(run.backend.model.parameters()).device
    losses, margins = [], []
    for micro_pairs in equal_count_micro_batches(pair_lengths, cfg.backend.micro_batch_tokens):
        rows = [r for p in micro_pairs for r in (2 * p, 2 * p + 1)]
        micro = batch.select(rows or [0, 1]).to(device)
        logp, _ = forward_logprobs(run.backend.model, micro.input_ids, micro.attention_mask,
                                   temperature=cfg.rollout.temperature,
                                   logits_to_keep_from=micro.prompt_width - 1)  # [n, T-1]
        mask = micro.completion_mask
        loss, margin = dpo_loss((logp * mask).sum(1), (micro.ref_logprobs * mask).sum(1), beta)  # [n/2] each
        weight = 1.0 if micro_pairs else 0.0  # an empty micro-batch keeps ZeRO-3's collectives in step
        run.backend.backward(loss.sum() * weight / num_pairs)
        if micro_pairs:
            losses.append(loss.detach())
            margins.append(margin)
    result = run.backend.step()
    loss, margin = torch.cat(losses), torch.cat(margins)
    return {"train/loss": float(loss.mean()), "train/dpo_margin": float(margin.mean()),
            "train/dpo_pair_accuracy": float((margin > 0).float().mean()), "optim/grad_norm": result["grad_norm"],
            "optim/lr": result["lr"], "optim/skipped_steps": int(result["skipped"]),
            "optim/skipped_total": getattr(run.backend, "skipped_steps", 0)}
