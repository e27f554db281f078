"""The policy update: `epochs` passes over a rollout batch, `mini_batches` optimiser steps each.

Each optimiser step accumulates the gradient of its mini-batch over micro-batches that fit a token
budget (`backend.micro_batch_tokens`), forwarded in the layout `backend.packing` names (`grpo.core.packing`:
padded rows, packed sequences, or one row per prompt group; log-probs come back in the padded layout).
Every micro-batch's loss is normalised by its mini-batch's total token and sequence counts, summed
over all ranks, so the accumulated gradient, summed over ranks, equals that of the whole mini-batch
in one piece on one rank.
"""

from __future__ import annotations

import torch

from grpo import distributed as dist
from grpo.config import AlgorithmConfig, Config, completion_budget
from grpo.core.batch import RolloutBatch
from grpo.core.logprobs import forward_logprobs
from grpo.core.losses import (
    POLICY_LOSSES,
    aggregate,
    kl_divergence,
    masked_importance_keep,
    truncated_importance_weights,
)
from grpo.core.packing import micro_batches, token_budget_batches

# What one optimiser step adds up over its micro-batches (summed over ranks before use).
STEP_SUMS = ("loss", "entropy", "kl", "clipped_tokens", "sampler_abs_diff", "sampler_tokens", "sampler_kl",
             "is_weight", "mis_masked")


def update_policy(backend, batch: RolloutBatch, algo: AlgorithmConfig, *, temperature: float,
                  micro_batch_tokens: int, max_new_tokens: int, packing: str = "padded") -> dict:
    """`algo.epochs` passes over the batch, `algo.mini_batches` optimiser steps each; returns metrics
    (`train/*` averaged over the optimiser steps taken, `optim/*`, `rollout/*` sampler vs trainer).
    `packing`: the log-prob forward's layout (`backend.packing`)."""
    if algo.corrects_sampler() and batch.sampler_logprobs is None:
        raise ValueError("algorithm.tis_cap, algorithm.mis_high: the rollout engine returned no sampler log-probs "
                         "to correct by")
    steps = []  # one dict per optimiser step taken
    for epoch in range(algo.epochs):
        for rows in mini_batch_rows(len(batch), algo.mini_batches):
            step = optimiser_step(backend, batch, rows, algo, temperature=temperature, first_epoch=epoch == 0,
                                  micro_batch_tokens=micro_batch_tokens, max_new_tokens=max_new_tokens,
                                  packing=packing)
            if step is not None:
                steps.append(step)
    return update_metrics(steps, algo, backend)


def update_options(cfg: Config) -> dict:
    """`update_policy`'s keyword arguments for a run with config `cfg`: the sampling temperature, the micro-batch
    budget, the longest completion (`seq_mean_token_sum_norm`'s divisor) and the forward's layout."""
    return dict(temperature=cfg.rollout.temperature, micro_batch_tokens=cfg.backend.micro_batch_tokens,
                max_new_tokens=completion_budget(cfg), packing=cfg.backend.packing)


def optimiser_step(backend, batch: RolloutBatch, rows: list[int], algo: AlgorithmConfig, *, temperature: float,
                   first_epoch: bool, micro_batch_tokens: int, max_new_tokens: int,
                   packing: str = "padded") -> dict | None:
    """One optimiser step on the mini-batch `rows` (this rank's; may be empty); None when every token of
    the mini-batch is masked on every rank (nothing to learn: no step)."""
    mini = batch.select(rows) if rows else None
    local_tokens = mini.completion_mask.sum() if mini is not None else 0.0
    num_tokens, num_seqs = dist.all_reduce_sum(torch.tensor([local_tokens, len(rows)], dtype=torch.float32))
    if num_tokens == 0:
        return None
    sums = dict.fromkeys(STEP_SUMS, 0.0)
    finite, device = True, next(backend.model.parameters()).device
    for micro_rows in same_count_on_every_rank(micro_batches(mini, micro_batch_tokens, packing)):
        # an empty micro-batch (ZeRO-3 needs as many on every rank): a forward/backward that adds nothing
        micro = (mini.select(micro_rows) if micro_rows else batch.select([0])).to(device)
        loss, micro_sums = micro_batch_loss(backend.model, micro, algo, weight=1.0 if micro_rows else 0.0,
                                            temperature=temperature, num_tokens=num_tokens, num_seqs=num_seqs,
                                            max_new_tokens=max_new_tokens, first_epoch=first_epoch, packing=packing)
        if not torch.isfinite(loss):  # a NaN/inf loss never reaches the weights: the update is skipped
            finite = False
            if dist.world_size() == 1:
                continue
            # other ranks' backward passes may hold collectives (ZeRO): take part, then skip the step
        backend.backward(loss)
        for key, value in micro_sums.items():
            sums[key] += value
    finite = not dist.all_reduce_max(float(not finite))  # every rank skips, or none
    result = backend.step() if finite else backend.step(skip=True)
    summed = dist.all_reduce_sum(torch.tensor([sums[k] for k in STEP_SUMS], dtype=torch.float64)).tolist()
    return dict(zip(STEP_SUMS, summed)) | {"tokens": max(float(num_tokens), 1.0), **result}


def micro_batch_loss(model, micro: RolloutBatch, algo: AlgorithmConfig, *, weight: float, temperature: float,
                     num_tokens, num_seqs, max_new_tokens: int, first_epoch: bool,
                     packing: str = "padded") -> tuple[torch.Tensor, dict]:
    """The micro-batch's share of its mini-batch's loss, and its token sums (`STEP_SUMS`)."""
    logp, entropy = forward_logprobs(model, micro.input_ids, micro.attention_mask, temperature=temperature,
                                     with_entropy=True, logits_to_keep_from=micro.prompt_width - 1,
                                     packing=packing)  # [n, T-1] each
    mask = micro.completion_mask * weight  # [n, T-1]
    old = micro.old_logprobs if micro.old_logprobs is not None else logp.detach()  # [n, T-1]
    per_token, clipped = POLICY_LOSSES[algo.policy_loss](logp, old, micro.advantages, mask,
                                                         **algo.policy_loss_options())  # [n, T-1] each
    sums = {"kl": 0.0, "clipped_tokens": float((clipped & mask.bool()).sum())}
    if algo.corrects_sampler():  # the sampler is not exactly the trainer's policy: reweight or mask by their ratio
        weights, keep = sampler_correction(old, micro.sampler_logprobs, mask, algo)  # [n, T-1] each
        per_token = per_token * weights * keep
        sums["is_weight"] = float((weights * keep * mask).sum())
        sums["mis_masked"] = float(((1 - keep) * mask).sum())
    if algo.beta > 0:
        kl = kl_divergence(logp, micro.ref_logprobs, algo.kl_estimator)  # [n, T-1]
        per_token = per_token + algo.beta * kl
        sums["kl"] = float((kl.detach() * mask).sum())
    loss = aggregate(per_token, mask, algo.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs,
                     max_len=max_new_tokens) * weight
    sums["loss"] = float(loss.detach())
    sums["entropy"] = float((entropy.detach() * mask).sum())
    if first_epoch and micro.sampler_logprobs is not None:  # sampler vs trainer, same weights
        sums["sampler_abs_diff"] = float(((old - micro.sampler_logprobs).abs() * mask).sum())
        sums["sampler_tokens"] = float(mask.sum())
        # KL(sampler || trainer), k3 on the sampler's own tokens
        kl_st = kl_divergence(torch.where(mask.bool(), micro.sampler_logprobs, 0.0),
                              torch.where(mask.bool(), old, 0.0), "k3")  # [n, T-1]
        sums["sampler_kl"] = float((kl_st * mask).sum())
    return loss, sums


def sampler_correction(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                       algo: AlgorithmConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The surrogate's per-token factors [n, T-1]: the TIS weight (`tis_cap` > 0, else 1) and the MIS keep
    mask (`mis_high` > 0, else 1), both at `tis_level`."""
    weights, keep = torch.ones_like(trainer_logp), torch.ones_like(trainer_logp)  # [n, T-1] each
    if algo.tis_cap > 0:
        weights = truncated_importance_weights(trainer_logp, sampler_logp, mask, algo.tis_cap, algo.tis_level)
    if algo.mis_high > 0:
        keep = masked_importance_keep(trainer_logp, sampler_logp, mask, algo.mis_low, algo.mis_high, algo.tis_level)
    return weights, keep


def update_metrics(steps: list[dict], algo: AlgorithmConfig, backend) -> dict:
    """The update's metrics from its optimiser steps' sums (the caller makes sure there is one)."""
    n = max(len(steps), 1)

    def mean(fn) -> float:
        return sum(fn(s) for s in steps) / n

    out = {"train/loss": mean(lambda s: s["loss"]), "train/entropy": mean(lambda s: s["entropy"] / s["tokens"]),
           "train/clip_frac": mean(lambda s: s["clipped_tokens"] / s["tokens"])}
    if algo.beta > 0:
        out["train/kl"] = mean(lambda s: s["kl"] / s["tokens"])
    out["optim/grad_norm"] = mean(lambda s: s["grad_norm"])
    if steps:
        out["optim/lr"] = steps[-1]["lr"]
    out["optim/skipped_steps"] = sum(int(s["skipped"]) for s in steps)  # skipped for a non-finite loss or gradient
    out["optim/skipped_total"] = getattr(backend, "skipped_steps", 0)
    sampler_tokens = sum(s["sampler_tokens"] for s in steps)
    if sampler_tokens:
        out["rollout/logprob_abs_diff"] = sum(s["sampler_abs_diff"] for s in steps) / sampler_tokens
        out["rollout/sampler_kl"] = sum(s["sampler_kl"] for s in steps) / sampler_tokens
    tokens = max(sum(s["tokens"] for s in steps), 1.0)
    if algo.corrects_sampler():  # over every optimiser step's tokens
        out["rollout/is_weight_mean"] = sum(s["is_weight"] for s in steps) / tokens
        out["rollout/mis_masked_frac"] = sum(s["mis_masked"] for s in steps) / tokens
    return out


def mini_batch_rows(n: int, count: int) -> list[list[int]]:
    """`count` contiguous mini-batches covering all `n` rows, their sizes differing by at most one
    (some empty when n < count). E.g. n=10, count=3: [0..2], [3..5], [6..9]."""
    bounds = [i * n // count for i in range(count + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(count)]


def equal_count_micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Micro-batches within the padded-token budget, as many on every rank (`same_count_on_every_rank`)."""
    return same_count_on_every_rank(token_budget_batches(lengths, max_tokens))


def same_count_on_every_rank(micro: list[list[int]]) -> list[list[int]]:
    """`micro`, split until every rank has as many micro-batches (the largest count).

    Under ZeRO-3 every forward and backward is collective, so all ranks must run the same number;
    a rank with fewer splits its largest micro-batches, and pads with empty ones if it runs out
    of rows (an empty micro-batch runs a zero-weighted forward/backward).
    """
    target = int(dist.all_reduce_max(len(micro)))
    while len(micro) < target:
        largest = max(range(len(micro)), key=lambda i: len(micro[i]))
        rows = micro[largest]
        if len(rows) < 2:
            micro.append([])
            continue
        micro[largest : largest + 1] = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    return micro


@torch.no_grad()
def score_logprobs(model, batch: RolloutBatch, *, temperature: float, micro_batch_tokens: int,
                   packing: str = "padded", chunk_size: int | None = None) -> torch.Tensor:
    """Log-probs [N, T-1] of the batch's tokens under `model`, without gradients, forwarded in the
    layout `packing` names (the policy update's, so old and new log-probs are computed alike).
    `chunk_size`: positions whose logits exist at once (None: `grpo.core.logprobs`' default)."""
    out = torch.zeros(batch.completion_mask.shape)
    device = next(model.parameters()).device
    for rows in same_count_on_every_rank(micro_batches(batch, micro_batch_tokens, packing)):
        ids, mask = batch.input_ids[rows or [0]].to(device), batch.attention_mask[rows or [0]].to(device)
        logp, _ = forward_logprobs(model, ids, mask, temperature=temperature, chunk_size=chunk_size,
                                   logits_to_keep_from=batch.prompt_width - 1, packing=packing)
        if rows:  # an empty micro-batch only keeps ZeRO-3's collective forwards in step
            out[rows] = logp.float().cpu()
    return out
