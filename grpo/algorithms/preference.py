"""The DPO update both preference loops share: offline DPO (`grpo.algorithms.dpo`, pairs from a file or sampled before
training) and online DPO (`grpo.algorithms.online_dpo`, pairs from each step's samples).

A batch holds P pairs as 2P rows, chosen, rejected, chosen, rejected, ..., each pair's two rows after the same
prompt (`grpo.core.batch.layout_batch` with groups of 2), with the frozen reference's log-probs. One optimiser
step takes the mean over every rank's pairs of the loss `algorithm.dpo.loss_type` (`grpo.core.losses.DPO_LOSSES`)
of summed completion log-probs; micro-batches hold whole pairs, so accumulation is exact. Every forward, the
reference's too, runs in the layout `backend.packing` names.
"""

from __future__ import annotations

import torch

from grpo import distributed as dist
from grpo.core.batch import RolloutBatch, layout_batch
from grpo.core.logprobs import forward_logprobs
from grpo.core.losses import dpo_loss
from grpo.training.run import Run
from grpo.training.update import equal_count_micro_batches, score_logprobs

# What one DPO step adds up over its micro-batches (this rank's), summed over ranks once.
PAIR_SUMS = ("loss", "margin", "right", "pairs")


def pair_batch(run: Run, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> RolloutBatch:
    """P prompts and their 2P completions (chosen, rejected, ...) laid out as groups of 2, with the reference's
    log-probs of every completion token."""
    batch = layout_batch(prompt_ids, completion_ids, 2, run.tokenizer.pad_token_id)
    batch.ref_logprobs = score_logprobs(run.ref_model, batch, temperature=run.cfg.rollout.temperature,
                                        micro_batch_tokens=run.cfg.backend.micro_batch_tokens,
                                        packing=run.cfg.backend.packing)  # [2P, T-1]
    return batch


def dpo_update(run: Run, batch: RolloutBatch, total_pairs: int, own_pairs: bool = True) -> dict:
    """One optimiser step on this rank's pairs (rows chosen, rejected, ...); each micro-batch holds whole pairs,
    and its loss is its share of the mean over `total_pairs`, every rank's, so the gradient summed over ranks
    is that of the mean. `own_pairs` false: the batch is a stand-in that only keeps this rank in step."""
    cfg, opts = run.cfg, run.cfg.algorithm.dpo
    lengths = batch.attention_mask.sum(1).tolist()
    pair_lengths = [lengths[2 * p] + lengths[2 * p + 1] for p in range(len(batch) // 2)]
    device = next(run.backend.model.parameters()).device
    sums = torch.zeros(len(PAIR_SUMS), dtype=torch.float64)  # this rank's, in PAIR_SUMS order
    for micro_pairs in equal_count_micro_batches(pair_lengths, cfg.backend.micro_batch_tokens):
        rows = [r for p in micro_pairs for r in (2 * p, 2 * p + 1)]
        micro = batch.select(rows or [0, 1]).to(device)
        logp, _ = forward_logprobs(run.backend.model, micro.input_ids, micro.attention_mask,
                                   temperature=cfg.rollout.temperature, packing=cfg.backend.packing,
                                   logits_to_keep_from=micro.prompt_width - 1)  # [n, T-1]
        mask = micro.completion_mask
        loss, margin = dpo_loss((logp * mask).sum(1), (micro.ref_logprobs * mask).sum(1), opts.beta,
                                opts.loss_type)  # [n/2] each
        weight = 1.0 if micro_pairs and own_pairs else 0.0  # empty micro-batches keep ZeRO-3's collectives in step
        run.backend.backward(loss.sum() * weight / total_pairs)
        count = margin.new_tensor(float(len(margin)))
        sums += weight * torch.stack([loss.detach().sum(), margin.sum(), (margin > 0).sum(), count]).double()
    result = run.backend.step()
    total = dict(zip(PAIR_SUMS, dist.all_reduce_sum(sums).tolist()))
    pairs = max(total["pairs"], 1.0)
    return {"train/loss": total["loss"] / pairs, "train/dpo_margin": total["margin"] / pairs,
            "train/dpo_pair_accuracy": total["right"] / pairs,
            "optim/grad_norm": result["grad_norm"], "optim/lr": result["lr"],
            "optim/skipped_steps": int(result["skipped"]),
            "optim/skipped_total": getattr(run.backend, "skipped_steps", 0)}
