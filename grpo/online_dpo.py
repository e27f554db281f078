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

from grpo import distributed as dist
from grpo.batch import RolloutBatch, layout_batch
from grpo.faults import crash_point
from grpo.loop import StepResult, no_signal_reason, replica_check, run_loop
from grpo.run import Run
from grpo.sampling import Groups, gather_groups, reward_stats, rollout_metrics, sample_groups
from grpo.update import equal_count_micro_batches, forward_logprobs, score_logprobs


def train(run: Run) -> list[dict]:
    """Online DPO steps from `run.start_step + 1` to `train.max_steps`; returns the logged metrics."""
    return run_loop(run, train_step)


def train_step(run: Run, step: int) -> StepResult:
    """One online DPO step on pairs from a fresh rollout batch."""
    cfg = run.cfg
    groups, metrics = sample_groups(run, cfg.train.prompts_per_step)  # this rank's share of the prompts
    everyone, _ = gather_groups(groups)
    metrics |= reward_stats(everyone)
    pairs = best_and_worst(groups.rewards, cfg.algorithm.group_size)  # [(chosen row, rejected row)], this rank's
    total_pairs = int(dist.all_reduce_sum(torch.tensor([len(pairs)]))[0])
    valid = torch.tensor([r is not None for r in everyone.rewards])
    metrics |= rollout_metrics(everyone, valid) | {"train/dpo_pairs": total_pairs}
    skipped = no_signal_reason(run, total_pairs > 0, metrics["train/reward_masked_frac"], step)
    if skipped:
        return StepResult(metrics, everyone, skipped)
    # a rank without a pair of its own runs a zero-weighted one: every rank takes part in the step
    batch = pair_batch(run, groups, pairs or [(0, 1)])
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


def dpo_update(run: Run, batch: RolloutBatch, total_pairs: int, own_pairs: bool = True) -> dict:
    """One optimiser step on this rank's pairs (rows chosen, rejected, ...); each micro-batch holds whole pairs,
    and its loss is its share of the mean over `total_pairs`, every rank's, so the gradient summed over ranks
    is that of the mean. `own_pairs` false: the batch is a stand-in that only keeps this rank in step."""
    cfg, beta = run.cfg, run.cfg.algorithm.dpo.beta
    lengths = batch.attention_mask.sum(1).tolist()
    pair_lengths = [lengths[2 * p] + lengths[2 * p + 1] for p in range(len(batch) // 2)]
    device = next(run.backend.model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64)  # loss, margin, margins > 0, pairs: this rank's
    for micro_pairs in equal_count_micro_batches(pair_lengths, cfg.backend.micro_batch_tokens):
        rows = [r for p in micro_pairs for r in (2 * p, 2 * p + 1)]
        micro = batch.select(rows or [0, 1]).to(device)
        logp, _ = forward_logprobs(run.backend.model, micro.input_ids, micro.attention_mask,
                                   temperature=cfg.rollout.temperature,
                                   logits_to_keep_from=micro.prompt_width - 1)  # [n, T-1]
        mask = micro.completion_mask
        loss, margin = dpo_loss((logp * mask).sum(1), (micro.ref_logprobs * mask).sum(1), beta)  # [n/2] each
        weight = 1.0 if micro_pairs and own_pairs else 0.0  # empty micro-batches keep ZeRO-3's collectives in step
        run.backend.backward(loss.sum() * weight / total_pairs)
        count = margin.new_tensor(float(len(margin)))
        sums += weight * torch.stack([loss.detach().sum(), margin.sum(), (margin > 0).sum(), count]).double()
    result = run.backend.step()
    loss, margin, right, pairs = dist.all_reduce_sum(sums).tolist()
    return {"train/loss": loss / pairs, "train/dpo_margin": margin / pairs, "train/dpo_pair_accuracy": right / pairs,
            "optim/grad_norm": result["grad_norm"], "optim/lr": result["lr"],
            "optim/skipped_steps": int(result["skipped"]),
            "optim/skipped_total": getattr(run.backend, "skipped_steps", 0)}
