"""The GRPO loop: sample -> score -> advantage -> loss -> step -> sync -> log.

One step, as `train` below reads:
1. take B prompts; the rollout engine samples G completions of each;
2. the reward functions score them (None = not applicable: masked out of the loss);
3. the advantage estimator turns each group's rewards into advantages;
4. the policy is updated on the batch (`epochs` passes of `mini_batches` optimiser steps,
   micro-batched by a token budget, gradients accumulated exactly);
5. the new weights go to the rollout engine; metrics, samples and checkpoints are written.

Where this departs from GRPO as published (DeepSeekMath, Shao et al. 2024):
1. The loss defaults to DAPO's token mean over the whole batch rather than the per-sequence mean
   (`algorithm.loss_agg`), so long completions are not down-weighted.
2. The KL penalty is off by default (`algorithm.beta: 0`), and then no reference model is loaded.
3. With one pass over each batch (the default) the old policy is the current one: the
   importance ratio is exactly 1 and no old log-probs are computed.
4. A sample whose reward is None counts neither in its group's baseline nor in the loss.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from grpo.advantages import get_advantage_estimator, group_stats, overlong_penalty
from grpo.config import AlgorithmConfig
from grpo.logprobs import sequence_logprobs, token_budget_batches
from grpo.losses import aggregate, clip_fraction, clipped_surrogate, kl_divergence

log = logging.getLogger(__name__)


@dataclass
class RolloutBatch:
    """B*G sampled sequences laid out for the trainer: prompt left-padded, completion right-padded."""

    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # [N, T-1] 1 where input_ids[:, t+1] is a completion token that gets a gradient
    prompt_width: int  # P: completions start at column P
    advantages: torch.Tensor  # [N], or [N, T-1] per token (PPO)
    sampler_logprobs: torch.Tensor | None = None  # [N, T-1]
    old_logprobs: torch.Tensor | None = None  # [N, T-1]
    ref_logprobs: torch.Tensor | None = None  # [N, T-1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: list[int]) -> "RolloutBatch":
        """The given rows, with columns that are padding in all of them trimmed away."""
        idx = torch.tensor(rows)
        attn = self.attention_mask[idx]
        used = attn.any(0).nonzero().squeeze(-1)
        lo, hi = int(used[0]), int(used[-1]) + 1
        pick = lambda t: None if t is None else t[idx][:, lo : hi - 1]  # noqa: E731 - [n, T-1] columns
        return RolloutBatch(
            input_ids=self.input_ids[idx][:, lo:hi], attention_mask=attn[:, lo:hi],
            completion_mask=pick(self.completion_mask), prompt_width=self.prompt_width - lo,
            advantages=self.advantages[idx] if self.advantages.ndim == 1 else pick(self.advantages),
            sampler_logprobs=pick(self.sampler_logprobs),
            old_logprobs=pick(self.old_logprobs), ref_logprobs=pick(self.ref_logprobs),
        )


def layout_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], group_size: int, pad_id: int,
                 sampler_logprobs: list[list[float]] | None = None) -> RolloutBatch:
    """Left-pad each prompt and right-pad each completion so all completions start at one column."""
    n = len(completion_ids)
    P = max(map(len, prompt_ids))
    C = max(1, max(map(len, completion_ids)))
    ids = torch.full((n, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros((n, P + C), dtype=torch.long)
    cmask = torch.zeros((n, P + C - 1))
    slp = torch.zeros((n, P + C - 1)) if sampler_logprobs is not None else None
    for i, comp in enumerate(completion_ids):
        prompt = prompt_ids[i // group_size]
        ids[i, P - len(prompt) : P] = torch.tensor(prompt, dtype=torch.long)
        ids[i, P : P + len(comp)] = torch.tensor(comp, dtype=torch.long)
        attn[i, P - len(prompt) : P + len(comp)] = 1
        cmask[i, P - 1 : P - 1 + len(comp)] = 1  # log-prob column t scores token t+1
        if slp is not None:
            slp[i, P - 1 : P - 1 + len(comp)] = torch.tensor(sampler_logprobs[i])
    return RolloutBatch(ids, attn, cmask, P, torch.zeros(n), sampler_logprobs=slp)


def compute_advantages(rewards: list[float | None], group_size: int, estimator: str):
    """Advantages [N] and a validity mask [N]; None rewards are left out of their group's baseline.

    A None reward is replaced by the mean of its group's valid rewards before the estimator runs
    (so it does not move the baseline), and its sample gets advantage 0 and no gradient.
    """
    valid = torch.tensor([r is not None for r in rewards])  # [N]
    values = torch.tensor([r if r is not None else 0.0 for r in rewards], dtype=torch.float32)  # [N]
    groups_valid = valid.view(-1, group_size)  # [B, G]
    groups = values.view(-1, group_size)  # [B, G]
    counts = groups_valid.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
    means = (groups * groups_valid).sum(1, keepdim=True) / counts  # [B, 1]
    filled = torch.where(groups_valid, groups, means).view(-1)  # [N]
    advantages = get_advantage_estimator(estimator)(filled, group_size) * valid  # [N]
    return advantages, valid, filled


def update_policy(backend, batch: RolloutBatch, algo: AlgorithmConfig, *, temperature: float,
                  micro_batch_tokens: int, max_new_tokens: int) -> dict:
    """`algo.epochs` passes over the batch, `algo.mini_batches` optimiser steps each; returns metrics.

    Each micro-batch's loss is normalised by its mini-batch's total token and sequence counts, so
    the accumulated gradient equals that of the whole mini-batch in one piece.
    """
    n = len(batch)
    per_mini = n // algo.mini_batches
    stats = {"loss": 0.0, "entropy": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "skipped": 0}
    updates, diff_sum, diff_tokens = 0, 0.0, 0.0
    for epoch in range(algo.epochs):
        for m in range(algo.mini_batches):
            rows = list(range(m * per_mini, (m + 1) * per_mini))
            mini = batch.select(rows)
            num_tokens, num_seqs = mini.completion_mask.sum(), len(rows)
            lengths = mini.attention_mask.sum(1).tolist()
            loss_sum = ent_sum = kl_sum = clip_sum = 0.0
            for micro_rows in token_budget_batches(lengths, micro_batch_tokens):
                micro = mini.select(micro_rows)
                logp, entropy = sequence_logprobs(
                    backend.model, micro.input_ids, micro.attention_mask, temperature=temperature,
                    with_entropy=True, logits_to_keep_from=micro.prompt_width - 1,
                )  # [n, T-1] each
                mask = micro.completion_mask
                old = micro.old_logprobs if micro.old_logprobs is not None else logp.detach()
                per_token = clipped_surrogate(
                    logp, old, micro.advantages, mask, algo.clip_low, algo.clip_high, algo.ratio_level, algo.dual_clip
                )  # [n, T-1]
                if algo.beta > 0:
                    kl = kl_divergence(logp, micro.ref_logprobs, algo.kl_estimator)  # [n, T-1]
                    per_token = per_token + algo.beta * kl
                    kl_sum += float((kl.detach() * mask).sum())
                loss = aggregate(per_token, mask, algo.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs,
                                 max_len=max_new_tokens)
                backend.backward(loss)
                loss_sum += float(loss.detach())
                ent_sum += float((entropy.detach() * mask).sum())
                frac = clip_fraction(logp.detach(), old, micro.advantages, mask, algo.clip_low, algo.clip_high,
                                     algo.ratio_level)
                clip_sum += frac * float(mask.sum())
                if epoch == 0 and micro.sampler_logprobs is not None:  # sampler vs trainer, same weights
                    diff_sum += float(((old - micro.sampler_logprobs).abs() * mask).sum())
                    diff_tokens += float(mask.sum())
            step_stats = backend.step()
            tokens = max(float(num_tokens), 1.0)
            stats["loss"] += loss_sum
            stats["entropy"] += ent_sum / tokens
            stats["kl"] += kl_sum / tokens
            stats["clip_frac"] += clip_sum / tokens
            stats["grad_norm"] += step_stats["grad_norm"]
            stats["skipped"] += int(step_stats["skipped"])
            stats["lr"] = step_stats["lr"]
            updates += 1
    out = {f"train/{k}": v / updates for k, v in stats.items() if k not in ("skipped", "lr", "grad_norm")}
    out["optim/grad_norm"] = stats["grad_norm"] / updates
    out["optim/lr"] = stats["lr"]
    out["optim/skipped_steps"] = stats["skipped"]
    if algo.beta <= 0:
        out.pop("train/kl")
    if diff_tokens:
        out["rollout/logprob_abs_diff"] = diff_sum / diff_tokens
    return out


@torch.no_grad()
def score_logprobs(model, batch: RolloutBatch, *, temperature: float, micro_batch_tokens: int) -> torch.Tensor:
    """Log-probs [N, T-1] of the batch's tokens under `model`, without gradients."""
    out = torch.zeros(batch.completion_mask.shape)
    lengths = batch.attention_mask.sum(1).tolist()
    for rows in token_budget_batches(lengths, micro_batch_tokens):
        logp, _ = sequence_logprobs(model, batch.input_ids[rows], batch.attention_mask[rows],
                                    temperature=temperature, logits_to_keep_from=batch.prompt_width - 1)
        out[rows] = logp.float()
    return out


def shape_rewards(rewards: list[float | None], lengths: list[int], algo: AlgorithmConfig,
                  max_new_tokens: int) -> list[float | None]:
    """DAPO's soft overlong punishment added to each reward (no-op when `overlong_buffer` is 0)."""
    if algo.overlong_buffer <= 0:
        return rewards
    penalty = overlong_penalty(torch.tensor(lengths), max_new_tokens, algo.overlong_buffer, algo.overlong_penalty)
    return [None if r is None else r + float(p) for r, p in zip(rewards, penalty)]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def nonzero_std_groups(rewards: list[float | None], group_size: int) -> list[bool]:
    values = torch.tensor([r if r is not None else float("nan") for r in rewards], dtype=torch.float32)
    values = torch.nan_to_num(values, nan=0.0)
    return group_stats(values, group_size)["nonzero_std_mask"].tolist()


@dataclass
class Run:
    """Everything one training run uses, built from the config by `grpo.train.build_run`."""

    cfg: object  # grpo.config.Config
    tokenizer: object
    policy: torch.nn.Module
    ref_model: torch.nn.Module | None
    engine: object  # RolloutEngine
    backend: object  # TrainBackend
    scorer: object  # rewards.RewardScorer
    eval_scorer: object  # rewards.RewardScorer holding the accuracy reward
    train_rows: list[dict]
    eval_rows: list[dict]
    sampler: object  # grpo.data.PromptSampler
    tracker: object  # grpo.tracking.Tracker
    start_step: int = 0
    ood_rows: dict = field(default_factory=dict)  # out-of-distribution splits: name -> rows
    contamination: dict = field(default_factory=dict)  # grpo.contamination report


@dataclass
class Groups:
    """B prompts with their G scored completions each (rows prompt-major)."""

    rows: list[dict]  # [B] dataset rows
    prompt_ids: list[list[int]]  # [B]
    completion_ids: list[list[int]]  # [B*G]
    texts: list[str]  # [B*G]
    truncated: list[bool]  # [B*G]
    sampler_logprobs: list[list[float]] | None  # [B*G]
    per_reward: dict[str, list[float | None]]  # name -> [B*G]
    rewards: list[float | None]  # [B*G] weighted total after shaping

    def keep(self, keep: list[bool], G: int) -> "Groups":
        """Only the groups whose flag is set."""
        idx = [g * G + j for g, k in enumerate(keep) if k for j in range(G)]
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return Groups(
            rows=[r for r, k in zip(self.rows, keep) if k],
            prompt_ids=[p for p, k in zip(self.prompt_ids, keep) if k],
            completion_ids=pick(self.completion_ids), texts=pick(self.texts), truncated=pick(self.truncated),
            sampler_logprobs=pick(self.sampler_logprobs),
            per_reward={name: pick(v) for name, v in self.per_reward.items()}, rewards=pick(self.rewards),
        )

    def __add__(self, other: "Groups") -> "Groups":
        both = lambda a, b: None if a is None or b is None else a + b  # noqa: E731
        return Groups(
            rows=self.rows + other.rows, prompt_ids=self.prompt_ids + other.prompt_ids,
            completion_ids=self.completion_ids + other.completion_ids, texts=self.texts + other.texts,
            truncated=self.truncated + other.truncated,
            sampler_logprobs=both(self.sampler_logprobs, other.sampler_logprobs),
            per_reward={k: v + other.per_reward[k] for k, v in self.per_reward.items()},
            rewards=self.rewards + other.rewards,
        )


def sample_groups(run: Run, num_prompts: int) -> tuple[Groups, dict]:
    """Sample and score G completions for each of `num_prompts` prompts.

    With DAPO dynamic sampling, groups whose rewards are all equal carry no gradient: they are
    dropped and more prompts are sampled, at most `max_resample` extra rounds; if still short,
    the step trains on the groups it has.
    """
    algo, G = run.cfg.algorithm, run.cfg.algorithm.group_size
    groups, zero_std_frac, gen_s, rounds = None, None, 0.0, 0
    while True:
        rows = [run.train_rows[i] for i in run.sampler.next_indices(num_prompts)]
        out = run.engine.generate([r["prompt"] for r in rows], G)
        gen_s += out.metrics.get("time/generate_s", 0.0)
        prompts = [r["prompt"] for r in rows for _ in range(G)]
        columns = {k: [r[k] for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
        scored = run.scorer(prompts, out.texts, columns)
        rewards = shape_rewards(scored.total, [len(c) for c in out.completion_ids], algo, run.cfg.rollout.max_new_tokens)
        fresh = Groups(rows, out.prompt_ids, out.completion_ids, out.texts, out.truncated, out.logprobs,
                       scored.per_reward, rewards)
        informative = nonzero_std_groups(rewards, G)
        if zero_std_frac is None:
            zero_std_frac = 1.0 - sum(informative) / len(informative)
        if algo.dynamic_sampling:
            fresh = fresh.keep(informative, G)
        groups = fresh if groups is None else groups + fresh
        if not algo.dynamic_sampling or len(groups.rows) >= num_prompts or rounds >= algo.max_resample:
            break
        rounds += 1
    if len(groups.rows) > num_prompts:
        groups = groups.keep([True] * num_prompts + [False] * (len(groups.rows) - num_prompts), G)
    metrics = {"train/zero_std_frac": zero_std_frac, "time/generate_s": gen_s}
    if algo.dynamic_sampling:
        metrics["train/resample_rounds"] = rounds
        metrics["train/kept_groups"] = len(groups.rows)
    return groups, metrics


def train(run: Run) -> list[dict]:
    """Run GRPO steps from `run.start_step + 1` to `train.max_steps`; returns the logged metrics."""
    from grpo.checkpoint import save_checkpoint
    from grpo.contamination import report_metrics
    from grpo.evaluate import evaluate_run

    cfg, algo = run.cfg, run.cfg.algorithm
    G, T = algo.group_size, cfg.rollout.temperature
    history = []
    if run.start_step == 0 and cfg.train.eval_before and run.eval_rows:
        history.append({"step": 0, **evaluate_run(run), **report_metrics(run.contamination)})
        run.tracker.log(0, history[-1])
    for step in range(run.start_step + 1, cfg.train.max_steps + 1):
        start = time.perf_counter()
        # 1-2. sample G completions per prompt and score them
        groups, metrics = sample_groups(run, cfg.train.prompts_per_step)
        if not groups.rows:  # dynamic sampling found no group with a reward signal: nothing to learn from
            log.warning("step %d: every sampled group had equal rewards; no update", step)
            run.tracker.log(step, {**metrics, "time/step_s": time.perf_counter() - start})
            continue
        # 3. group-relative advantages
        advantages, valid, _ = compute_advantages(groups.rewards, G, algo.advantage)
        advantages = torch.where(advantages < 0, advantages * algo.negative_weight, advantages)  # [N]
        batch = layout_batch(groups.prompt_ids, groups.completion_ids, G, run.tokenizer.pad_token_id,
                             groups.sampler_logprobs)
        batch.advantages = advantages
        keep = valid & ~torch.tensor(groups.truncated) if algo.mask_truncated else valid  # [N]
        batch.completion_mask *= keep[:, None].float()
        if algo.epochs * algo.mini_batches > 1:  # several updates per batch: keep the sampling policy's log-probs
            batch.old_logprobs = score_logprobs(run.backend.model, batch, temperature=T,
                                                micro_batch_tokens=cfg.backend.micro_batch_tokens)
        if algo.beta > 0:
            batch.ref_logprobs = score_logprobs(run.ref_model, batch, temperature=T,
                                                micro_batch_tokens=cfg.backend.micro_batch_tokens)
        # 4. clipped surrogate loss, backward, optimiser step
        metrics |= update_policy(run.backend, batch, algo, temperature=T,
                                 micro_batch_tokens=cfg.backend.micro_batch_tokens,
                                 max_new_tokens=cfg.rollout.max_new_tokens)
        # 5. the rollout engine samples from the new weights next step
        metrics["time/weight_sync_s"] = run.engine.sync_weights(run.policy)
        metrics |= rollout_metrics(groups, batch, valid)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
            metrics |= evaluate_run(run)
        metrics["time/step_s"] = time.perf_counter() - start
        # 6. log, and checkpoint when due
        run.tracker.log(step, metrics)
        history.append({"step": step, **metrics})
        if cfg.train.samples_every and step % cfg.train.samples_every == 0:
            k = cfg.train.num_samples_logged
            run.tracker.log_samples(step, [r["prompt"] for r in groups.rows for _ in range(G)][:k],
                                    groups.texts[:k], groups.rewards[:k])
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps:
            save_checkpoint(cfg.run_dir, step, policy=run.policy, tokenizer=run.tokenizer,
                            state=training_state(run), keep_last=cfg.checkpoint.keep_last)
    return history


def rollout_metrics(groups: Groups, batch: RolloutBatch, valid: torch.Tensor) -> dict:
    """Reward, length and sampler-vs-trainer log-prob metrics of one step's batch."""
    present = [r for r in groups.rewards if r is not None]
    out = {
        "train/reward_mean": sum(present) / len(present) if present else float("nan"),
        "train/reward_none_frac": 1.0 - float(valid.float().mean()),
        "train/completion_len": sum(map(len, groups.completion_ids)) / max(1, len(groups.completion_ids)),
        "train/truncated_frac": sum(groups.truncated) / max(1, len(groups.truncated)),
    }
    for name, values in groups.per_reward.items():
        vals = [v for v in values if v is not None]
        if vals:
            out[f"reward/{name}_mean"] = sum(vals) / len(vals)
    return out


def training_state(run: Run) -> dict:
    """Everything besides the weights that a resumed run needs to continue exactly."""
    from grpo.checkpoint import rng_state

    return {"backend": run.backend.state_dict(), "sampler": run.sampler.state(), "rng": rng_state()}
