"""The supervised arms of a comparison, in the loop GRPO shares: rejection-sampling fine-tuning and SFT.

Both minimise the negative log-likelihood of completions (the token mean over the step's completion tokens,
at temperature 1), one optimiser step per step, micro-batched by the token budget with exact accumulation.
They differ in where the completions come from:

- **RFT** (`algorithm=rft`; rejection-sampling fine-tuning, Yuan et al. 2023): each step samples G completions
  per prompt from the current policy, as GRPO does, and trains on those whose reward reaches
  `algorithm.sft.min_reward` (the policy's own correct answers), so it spends the same samples per step.
- **SFT** (`algorithm=sft`): each step trains on B x G demonstrations, the dataset's `algorithm.sft.column`
  (for the built-in task, the gold answer) after each prompt; it samples nothing, and a comparison counts
  its demonstrations against the same budget.

Evaluation, logging and checkpoints are the shared loop's (`grpo.training.loop`).
"""

from __future__ import annotations

import torch

from grpo import distributed as dist
from grpo.core.batch import RolloutBatch, layout_batch
from grpo.core.logprobs import forward_logprobs
from grpo.faults import crash_point
from grpo.training.loop import StepResult, no_signal_reason, replica_check, run_loop
from grpo.training.run import Run
from grpo.training.sampling import Groups, gather_groups, reward_stats, rollout_metrics, sample_groups
from grpo.training.update import equal_count_micro_batches


def train_rft(run: Run) -> list[dict]:
    """RFT steps from `run.start_step + 1` to `train.max_steps`; returns the logged metrics."""
    return run_loop(run, rft_step)


def train_sft(run: Run) -> list[dict]:
    """SFT steps from `run.start_step + 1` to `train.max_steps`; returns the logged metrics."""
    return run_loop(run, sft_step)


def rft_step(run: Run, step: int) -> StepResult:
    """Sample and score G completions per prompt; one NLL step on those that reach `min_reward`."""
    cfg = run.cfg
    groups, metrics = sample_groups(run, cfg.train.prompts_per_step)  # this rank's share of the prompts
    everyone, _ = gather_groups(groups)
    valid = torch.tensor([r is not None for r in everyone.rewards])
    metrics |= reward_stats(everyone) | rollout_metrics(everyone, valid)
    keep = [i for i, r in enumerate(groups.rewards) if r is not None and r >= cfg.algorithm.sft.min_reward]
    metrics["train/sft_rows"] = int(dist.all_reduce_sum(torch.tensor([len(keep)]))[0])
    skipped = no_signal_reason(run, True, metrics["train/reward_masked_frac"], step)
    if skipped or not metrics["train/sft_rows"]:
        return StepResult(metrics, everyone, skipped or "no sample reached algorithm.sft.min_reward")
    G = cfg.algorithm.group_size
    rows = keep or [0]  # a rank without a row of its own trains a zero-weighted one: every rank takes part
    batch = layout_batch([groups.prompt_ids[i // G] for i in rows], [groups.completion_ids[i] for i in rows], 1,
                         run.tokenizer.pad_token_id)
    metrics |= nll_update(run, batch, weight=1.0 if keep else 0.0)
    crash_point("mid_step", step)
    metrics["time/weight_sync_s"] = run.engine.sync_weights(run.policy)
    metrics |= replica_check(run, step)
    return StepResult(metrics, everyone)


def sft_step(run: Run, step: int) -> StepResult:
    """One NLL step on the next B x G demonstrations (prompt, then the demonstration column and EOS)."""
    cfg, tok = run.cfg, run.tokenizer
    share = dist.shard(run.sampler.next_indices(cfg.train.prompts_per_step * cfg.algorithm.group_size))
    rows = [run.train_rows[i] for i in share]  # this rank's share of the step's demonstrations
    column = cfg.algorithm.sft.column
    missing = [i for i, r in enumerate(rows) if not isinstance(r.get(column), str)]
    if missing:
        raise ValueError(f"algorithm.sft.column: training row {missing[0]} has no text column {column!r}")
    prompt_ids = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    completion_ids = [tok(r[column], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in rows]
    batch = layout_batch(prompt_ids, completion_ids, 1, tok.pad_token_id)
    metrics = nll_update(run, batch) | {"train/sft_rows": int(dist.all_reduce_sum(torch.tensor([len(rows)]))[0])}
    crash_point("mid_step", step)
    metrics["time/weight_sync_s"] = run.engine.sync_weights(run.policy)
    metrics |= replica_check(run, step)
    groups = Groups(rows=rows, prompt_ids=prompt_ids, completion_ids=completion_ids, texts=[r[column] for r in rows],
                    truncated=[False] * len(rows), sampler_logprobs=None, per_reward={}, rewards=[None] * len(rows))
    return StepResult(metrics, groups)


def nll_update(run: Run, batch: RolloutBatch, weight: float = 1.0) -> dict:
    """One optimiser step on the token-mean negative log-likelihood of the completions of every rank's batch:
    each rank's loss is divided by the tokens of all ranks, so the gradient summed over ranks is the mean's.
    `weight` 0: this rank's batch is a stand-in that only keeps it in step."""
    tokens = float(dist.all_reduce_sum((batch.completion_mask.sum() * weight).reshape(1).double())[0])
    lengths = batch.attention_mask.sum(1).tolist()
    device = next(run.backend.model.parameters()).device
    total = 0.0
    for rows in equal_count_micro_batches(lengths, run.cfg.backend.micro_batch_tokens):
        micro = batch.select(rows or [0]).to(device)
        logp, _ = forward_logprobs(run.backend.model, micro.input_ids, micro.attention_mask, temperature=1.0,
                                   logits_to_keep_from=micro.prompt_width - 1,
                                   packing=run.cfg.backend.packing)  # [n, T-1]
        loss = -(logp * micro.completion_mask).sum() / tokens * (weight if rows else 0.0)
        run.backend.backward(loss)
        total += float(loss.detach())
    result = run.backend.step()
    loss = float(dist.all_reduce_sum(torch.tensor([total], dtype=torch.float64))[0])
    return {"train/loss": loss, "train/sft_tokens": tokens, "optim/grad_norm": result["grad_norm"],
            "optim/lr": result["lr"], "optim/skipped_steps": int(result["skipped"]),
            "optim/skipped_total": getattr(run.backend, "skipped_steps", 0)}
