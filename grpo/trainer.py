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

Data parallel (several ranks, `grpo.distributed`): each rank samples and scores its own share
of the step's prompts (a group never straddles ranks); the scored groups are gathered so that
advantages (REINFORCE++ whitens over the whole batch), metrics and samples are computed on the
whole batch; each rank trains on its share with the loss normalised by the global token and
sequence counts, so the summed gradient is the one-rank gradient of the whole batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from grpo import distributed as dist
from grpo.advantages import get_advantage_estimator, group_stats, overlong_penalty
from grpo.config import AlgorithmConfig
from grpo.logprobs import sequence_logprobs, token_budget_batches
from grpo.losses import aggregate, clip_fraction, clipped_surrogate, kl_divergence, truncated_importance_weights
from rewards.scorer import ScoredBatch

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

    def to(self, device) -> "RolloutBatch":
        """The batch with every tensor on `device` (the policy's), one copy per micro-batch."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return RolloutBatch(move(self.input_ids), move(self.attention_mask), move(self.completion_mask),
                            self.prompt_width, move(self.advantages), move(self.sampler_logprobs),
                            move(self.old_logprobs), move(self.ref_logprobs))

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
    """Advantages [N], a validity mask [N] and the rewards as a tensor [N] (NaN for None).

    A None reward does not apply: it is left out of its group's statistics (the estimators treat
    a group with k valid rewards as a group of k), and its sample gets advantage 0 and no gradient.
    """
    values = torch.tensor([r if r is not None else float("nan") for r in rewards], dtype=torch.float32)  # [N]
    valid = ~values.isnan()  # [N]
    advantages = get_advantage_estimator(estimator)(values, group_size)  # [N], 0 where not valid
    return advantages, valid, values


def forward_logprobs(model, input_ids, attention_mask, **kwargs):
    """`(logprobs, entropy)` of a micro-batch: through `model`'s own forward when it computes
    log-probs (`backends.LogProbModel`, alone or inside a DeepSpeed engine), else chunked over
    a bare causal LM."""
    if getattr(model, "computes_logprobs", False):
        return model(input_ids, attention_mask, **kwargs)
    return sequence_logprobs(model, input_ids, attention_mask, **kwargs)


def equal_count_micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Micro-batches within the token budget, as many on every rank (the largest count).

    Under ZeRO-3 every forward and backward is collective, so all ranks must run the same number;
    a rank with fewer splits its largest micro-batches, and pads with empty ones if it runs out
    of rows (an empty micro-batch runs a zero-weighted forward/backward).
    """
    micro = token_budget_batches(lengths, max_tokens)
    target = int(dist.all_reduce_max(len(micro)))
    while len(micro) < target:
        largest = max(range(len(micro)), key=lambda i: len(micro[i]))
        rows = micro[largest]
        if len(rows) < 2:
            micro.append([])
            continue
        micro[largest : largest + 1] = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    return micro


def update_policy(backend, batch: RolloutBatch, algo: AlgorithmConfig, *, temperature: float,
                  micro_batch_tokens: int, max_new_tokens: int) -> dict:
    """`algo.epochs` passes over the batch, `algo.mini_batches` optimiser steps each; returns metrics.

    Each micro-batch's loss is normalised by its mini-batch's total token and sequence counts
    (summed over all ranks), so the accumulated gradient, summed over ranks, equals that of the
    whole mini-batch in one piece on one rank.
    """
    n, device = len(batch), next(backend.model.parameters()).device
    stats = {"loss": 0.0, "entropy": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "skipped": 0}
    updates, diff_sum, diff_tokens, sampler_kl_sum = 0, 0.0, 0.0, 0.0
    if algo.tis_cap > 0 and batch.sampler_logprobs is None:
        raise ValueError("algorithm.tis_cap: the rollout engine returned no sampler log-probs to correct by")
    for epoch in range(algo.epochs):
        for rows in mini_batch_rows(n, algo.mini_batches):
            mini = batch.select(rows) if rows else None
            local_tokens = mini.completion_mask.sum() if mini is not None else 0.0
            num_tokens, num_seqs = dist.all_reduce_sum(torch.tensor([local_tokens, len(rows)], dtype=torch.float32))
            if num_tokens == 0:  # every token masked on every rank: nothing to learn, no optimiser step
                continue
            lengths = mini.attention_mask.sum(1).tolist() if mini is not None else []
            sums = torch.zeros(7, dtype=torch.float64)  # loss, entropy, kl, clipped tokens, |diff|, diff tokens, sampler kl
            finite = True
            for micro_rows in equal_count_micro_batches(lengths, micro_batch_tokens):
                weight = 1.0 if micro_rows else 0.0  # an empty micro-batch: a forward/backward that adds nothing
                micro = (mini.select(micro_rows) if micro_rows else batch.select([0])).to(device)
                logp, entropy = forward_logprobs(
                    backend.model, micro.input_ids, micro.attention_mask, temperature=temperature,
                    with_entropy=True, logits_to_keep_from=micro.prompt_width - 1,
                )  # [n, T-1] each
                mask = micro.completion_mask * weight
                old = micro.old_logprobs if micro.old_logprobs is not None else logp.detach()
                per_token = clipped_surrogate(
                    logp, old, micro.advantages, mask, algo.clip_low, algo.clip_high, algo.ratio_level, algo.dual_clip
                )  # [n, T-1]
                if algo.tis_cap > 0:  # the sampler is not exactly the trainer's policy: reweight by their ratio
                    per_token = per_token * truncated_importance_weights(old, micro.sampler_logprobs, mask,
                                                                         algo.tis_cap)  # [n, T-1]
                if algo.beta > 0:
                    kl = kl_divergence(logp, micro.ref_logprobs, algo.kl_estimator)  # [n, T-1]
                    per_token = per_token + algo.beta * kl
                    sums[2] += float((kl.detach() * mask).sum())
                loss = aggregate(per_token, mask, algo.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs,
                                 max_len=max_new_tokens) * weight
                if not torch.isfinite(loss):  # a NaN/inf loss never reaches the weights: the update is skipped
                    finite = False
                    if dist.world_size() == 1:
                        continue
                    # other ranks' backward passes may hold collectives (ZeRO): take part, then skip the step
                backend.backward(loss)
                sums[0] += float(loss.detach())
                sums[1] += float((entropy.detach() * mask).sum())
                frac = clip_fraction(logp.detach(), old, micro.advantages, mask, algo.clip_low, algo.clip_high,
                                     algo.ratio_level)
                sums[3] += frac * float(mask.sum())
                if epoch == 0 and micro.sampler_logprobs is not None:  # sampler vs trainer, same weights
                    sums[4] += float(((old - micro.sampler_logprobs).abs() * mask).sum())
                    sums[5] += float(mask.sum())
                    # KL(sampler || trainer), k3 on the sampler's own tokens
                    kl_st = kl_divergence(torch.where(mask.bool(), micro.sampler_logprobs, 0.0),
                                          torch.where(mask.bool(), old, 0.0), "k3")  # [n, T-1]
                    sums[6] += float((kl_st * mask).sum())
            finite = not dist.all_reduce_max(float(not finite))  # every rank skips, or none
            step_stats = backend.step() if finite else backend.step(skip=True)
            sums = dist.all_reduce_sum(sums)
            tokens = max(float(num_tokens), 1.0)
            stats["loss"] += float(sums[0])
            stats["entropy"] += float(sums[1]) / tokens
            stats["kl"] += float(sums[2]) / tokens
            stats["clip_frac"] += float(sums[3]) / tokens
            diff_sum, diff_tokens = diff_sum + float(sums[4]), diff_tokens + float(sums[5])
            sampler_kl_sum += float(sums[6])
            stats["grad_norm"] += step_stats["grad_norm"]
            stats["skipped"] += int(step_stats["skipped"])
            stats["lr"] = step_stats["lr"]
            updates += 1
    updates = max(updates, 1)  # the caller makes sure some mini-batch has tokens
    out = {f"train/{k}": v / updates for k, v in stats.items() if k not in ("skipped", "lr", "grad_norm")}
    out["optim/grad_norm"] = stats["grad_norm"] / updates
    if "lr" in stats:
        out["optim/lr"] = stats["lr"]
    out["optim/skipped_steps"] = stats["skipped"]  # this step's updates skipped for a non-finite loss or gradient
    out["optim/skipped_total"] = getattr(backend, "skipped_steps", 0)
    if algo.beta <= 0:
        out.pop("train/kl")
    if diff_tokens:
        out["rollout/logprob_abs_diff"] = diff_sum / diff_tokens
        out["rollout/sampler_kl"] = sampler_kl_sum / diff_tokens
    return out


def mini_batch_rows(n: int, count: int) -> list[list[int]]:
    """`count` contiguous mini-batches covering all `n` rows, their sizes differing by at most one
    (some empty when n < count). E.g. n=10, count=3: [0..2], [3..5], [6..9]."""
    bounds = [i * n // count for i in range(count + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(count)]


@torch.no_grad()
def score_logprobs(model, batch: RolloutBatch, *, temperature: float, micro_batch_tokens: int) -> torch.Tensor:
    """Log-probs [N, T-1] of the batch's tokens under `model`, without gradients."""
    out = torch.zeros(batch.completion_mask.shape)
    lengths = batch.attention_mask.sum(1).tolist()
    device = next(model.parameters()).device
    for rows in equal_count_micro_batches(lengths, micro_batch_tokens):
        ids, mask = batch.input_ids[rows or [0]].to(device), batch.attention_mask[rows or [0]].to(device)
        logp, _ = forward_logprobs(model, ids, mask, temperature=temperature,
                                   logits_to_keep_from=batch.prompt_width - 1)
        if rows:  # an empty micro-batch only keeps ZeRO-3's collective forwards in step
            out[rows] = logp.float().cpu()
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
    """Per group: do its valid rewards differ (None does not count as 0)?"""
    values = torch.tensor([r if r is not None else float("nan") for r in rewards], dtype=torch.float32)  # [N]
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
    masked_steps: int = 0  # steps in a row on which every reward was masked
    ood_rows: dict = field(default_factory=dict)  # out-of-distribution splits: name -> rows
    contamination: dict = field(default_factory=dict)  # grpo.contamination report
    setup_metrics: dict = field(default_factory=dict)  # logged at step 0: data report, warm start


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
    """Sample and score G completions for this rank's share of `num_prompts` prompts.

    Every rank draws the same `num_prompts` indices (one shared, seeded order) and keeps its
    contiguous share, so a group never straddles ranks and the ranks never sample a prompt twice.
    With DAPO dynamic sampling, groups whose rewards are all equal carry no gradient: they are
    dropped and more prompts are sampled, at most `max_resample` extra rounds, while any rank is
    short (every rank generates in every round: under ZeRO-3 generation gathers the weights, a
    collective); if still short, the step trains on the groups it has.
    """
    algo, G = run.cfg.algorithm, run.cfg.algorithm.group_size
    share = num_prompts // dist.world_size()
    groups, counts, gen_s, rounds, errors, masked, scored_n = None, None, 0.0, 0, 0, 0, 0
    reward_counts: dict[str, float] = {}  # reward/<name>_errors and each reward's own counters
    while True:
        rows = [run.train_rows[i] for i in dist.shard(run.sampler.next_indices(num_prompts))]
        out = run.engine.generate([r["prompt"] for r in rows], G)
        gen_s += out.metrics.get("time/generate_s", 0.0)
        prompts = [r["prompt"] for r in rows for _ in range(G)]
        columns = {k: [r[k] for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
        scored = run.scorer(prompts, out.texts, columns)
        errors += sum(any(flags) for flags in zip(*scored.errors.values())) if scored.errors else 0
        for key, value in [*((f"reward/{n}_errors", sum(f)) for n, f in scored.errors.items()),
                           *scored.reward_metrics.items()]:
            reward_counts[key] = reward_counts.get(key, 0.0) + float(value)
        masked += sum(r is None for r in scored.total)
        scored_n += len(out.texts)
        rewards = shape_rewards(scored.total, [len(c) for c in out.completion_ids], algo, run.cfg.rollout.max_new_tokens)
        fresh = Groups(rows, out.prompt_ids, out.completion_ids, out.texts, out.truncated, out.logprobs,
                       scored.per_reward, rewards)
        informative = nonzero_std_groups(rewards, G)
        if counts is None:  # [informative groups, groups] of the first round, summed over ranks
            counts = dist.all_reduce_sum(torch.tensor([sum(informative), len(informative)]))
        if algo.dynamic_sampling:
            fresh = fresh.keep(informative, G)
        if groups is None:
            groups = fresh
        elif len(groups.rows) < share:
            groups = groups + fresh
        short = len(groups.rows) < share
        if not algo.dynamic_sampling or rounds >= algo.max_resample or not dist.all_reduce_max(float(short)):
            break
        rounds += 1
    if len(groups.rows) > share:
        groups = groups.keep([True] * share + [False] * (len(groups.rows) - share), G)
    errors, masked, scored_n = dist.all_reduce_sum(torch.tensor([errors, masked, scored_n])).tolist()
    reward_counts = sum_over_ranks(reward_counts)
    metrics = {"train/zero_std_frac": 1.0 - float(counts[0] / counts[1]), "time/generate_s": gen_s,
               "train/reward_error_frac": errors / max(1, scored_n),  # raised or ran past its deadline: masked
               "train/reward_masked_frac": masked / max(1, scored_n)}  # no reward at all (counts before refills)
    for key, value in reward_counts.items():  # over every sample scored this step, refills included
        if key.endswith("_errors"):
            metrics[key.removesuffix("s") + "_frac"] = value / max(1, scored_n)
        else:
            metrics[key] = value
    if algo.dynamic_sampling:
        metrics["train/resample_rounds"] = rounds
        metrics["train/kept_groups"] = int(dist.all_reduce_sum(torch.tensor([len(groups.rows)]))[0])
    return groups, metrics


class MaskedRewardsError(RuntimeError):
    """Too many steps in a row on which every sample's reward was masked (the rewards are broken)."""


def gather_groups(groups: Groups) -> tuple[Groups, int]:
    """The whole step's groups (every rank's, in rank order) and where this rank's rows start."""
    shares = dist.all_gather_objects(groups)
    everyone = shares[0]
    for other in shares[1:]:
        everyone = everyone + other
    offset = sum(len(g.completion_ids) for g in shares[: dist.rank()])
    if min(len(g.rows) for g in shares) == 0:  # some rank has nothing to train on: the step is skipped
        return everyone, -1
    return everyone, offset


def train_step(run: Run, step: int) -> tuple[dict, Groups, str | None]:
    """One GRPO step on a fresh rollout batch (no evaluation, logging or checkpointing).

    Returns its metrics, the whole step's groups (every rank's) and, when it made no update, why.
    """
    from grpo.faults import crash_point

    cfg, algo = run.cfg, run.cfg.algorithm
    G, T = algo.group_size, cfg.rollout.temperature
    # 1-2. sample G completions per prompt and score them (each rank its share of the prompts)
    groups, metrics = sample_groups(run, cfg.train.prompts_per_step)
    everyone, offset = gather_groups(groups)
    metrics |= reward_stats(everyone)
    nothing_to_learn = no_signal_reason(run, offset >= 0, metrics["train/reward_masked_frac"], step)
    if nothing_to_learn:
        return metrics, everyone, nothing_to_learn
    # 3. group-relative advantages, over the whole step's batch; this rank keeps its rows
    advantages, valid, _ = compute_advantages(everyone.rewards, G, algo.advantage)
    advantages = torch.where(advantages < 0, advantages * algo.negative_weight, advantages)  # [N_all]
    mine = slice(offset, offset + len(groups.completion_ids))
    batch = layout_batch(groups.prompt_ids, groups.completion_ids, G, run.tokenizer.pad_token_id,
                         groups.sampler_logprobs)
    batch.advantages = advantages[mine]  # [N]
    keep = valid[mine] & ~torch.tensor(groups.truncated) if algo.mask_truncated else valid[mine]  # [N]
    batch.completion_mask *= keep[:, None].float()
    if float(dist.all_reduce_sum(batch.completion_mask.sum())) == 0:  # on every rank: a no-op, not a fault
        return metrics, everyone, "every completion token is masked (truncated under algorithm.mask_truncated, or no reward)"
    if algo.epochs * algo.mini_batches > 1:  # several updates per batch: keep the sampling policy's log-probs
        batch.old_logprobs = score_logprobs(run.backend.model, batch, temperature=T,
                                            micro_batch_tokens=cfg.backend.micro_batch_tokens)
    if algo.beta > 0:
        batch.ref_logprobs = score_logprobs(run.ref_model, batch, temperature=T,
                                            micro_batch_tokens=cfg.backend.micro_batch_tokens)
    # 4. clipped surrogate loss, backward, optimiser step (gradients summed over ranks; the step is
    #    skipped if the loss or gradient is not finite)
    metrics |= update_policy(run.backend, batch, algo, temperature=T,
                             micro_batch_tokens=cfg.backend.micro_batch_tokens,
                             max_new_tokens=cfg.rollout.max_new_tokens)
    crash_point("mid_step", step)
    # 5. the rollout engine samples from the new weights next step
    metrics["time/weight_sync_s"] = run.engine.sync_weights(run.policy)
    every = cfg.backend.check_replicas_every
    if every and step % every == 0:  # the ranks must hold the same weights (ZeRO-3: gathered)
        with run.backend.gathered_for_rollout():
            metrics["dist/replica_weight_diff"] = dist.replica_difference(run.policy)
    metrics |= rollout_metrics(everyone, batch, valid)
    return metrics, everyone, None


def train(run: Run) -> list[dict]:
    """Run GRPO steps from `run.start_step + 1` to `train.max_steps`; returns the logged metrics."""
    from grpo.evaluate import evaluate_run
    from grpo.faults import crash_point

    cfg, G = run.cfg, run.cfg.algorithm.group_size
    history = []
    if run.start_step == 0:  # the starting point: held-out accuracy, the data report, the warm start
        evaluated = evaluate_run(run) if cfg.train.eval_before else {}
        history.append({"step": 0, **evaluated, **run.setup_metrics})
        run.tracker.log(0, run.setup_metrics | evaluated)
    for step in range(run.start_step + 1, cfg.train.max_steps + 1):
        start = time.perf_counter()
        # 1-5. sample, score, advantages, update, weight sync
        metrics, groups, nothing_to_learn = train_step(run, step)
        if nothing_to_learn:
            log.warning("step %d: %s; no update", step, nothing_to_learn)
            run.tracker.log(step, {**metrics, "time/step_s": time.perf_counter() - start})
            checkpoint_if_due(run, step)
            continue
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
            metrics |= evaluate_run(run)
        metrics["time/step_s"] = dist.all_reduce_max(time.perf_counter() - start)
        # 6. log (rank 0 writes), and checkpoint when due (every rank writes its own part)
        run.tracker.log(step, metrics)
        history.append({"step": step, **metrics})
        if cfg.train.samples_every and step % cfg.train.samples_every == 0:
            k = cfg.train.num_samples_logged
            run.tracker.log_samples(step, [r["prompt"] for r in groups.rows for _ in range(G)][:k],
                                    groups.texts[:k], groups.rewards[:k])
        crash_point("after_metrics", step)
        checkpoint_if_due(run, step)
    return history


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


def checkpoint_if_due(run: Run, step: int) -> None:
    """Save a checkpoint every `checkpoint.every_steps` steps and after the last one."""
    from grpo.checkpoint import save_checkpoint

    cfg = run.cfg
    if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps:
        save_checkpoint(cfg.run_dir, step, policy=run.policy, tokenizer=run.tokenizer, state=training_state(run),
                        keep_last=cfg.checkpoint.keep_last, backend=run.backend)


def rollout_metrics(groups: Groups, batch: RolloutBatch, valid: torch.Tensor) -> dict:
    """Reward, length and sampler-vs-trainer log-prob metrics of one step's batch."""
    present = [r for r in groups.rewards if r is not None]
    out = {
        "train/reward_mean": sum(present) / len(present) if present else float("nan"),
        "train/reward_none_frac": 1.0 - float(valid.float().mean()),
        "train/completion_len": sum(map(len, groups.completion_ids)) / max(1, len(groups.completion_ids)),
        "train/truncated_frac": sum(groups.truncated) / max(1, len(groups.truncated)),
    }
    return out


def reward_stats(groups: Groups) -> dict:
    """`reward/<name>_{mean,std,none_frac}` over the step's samples, as `ScoredBatch.metrics` computes
    them. Its `_error_frac` is left to `sample_groups`, which counts errors over every scoring call."""
    stats = ScoredBatch(total=[], per_reward=groups.per_reward).metrics()
    return {k: v for k, v in stats.items() if not k.endswith("_error_frac")}


def sum_over_ranks(counts: dict[str, float]) -> dict[str, float]:
    """Each key's sum over the ranks that have it."""
    total: dict[str, float] = {}
    for share in dist.all_gather_objects(counts):
        for key, value in share.items():
            total[key] = total.get(key, 0.0) + value
    return total


def training_state(run: Run) -> dict:
    """Everything besides the weights and the per-rank RNG streams that a resumed run needs to continue
    exactly. Dynamic sampling keeps no buffer across steps (surplus groups are dropped), so the sampler's
    position and the RNG streams are all of its state."""
    return {"backend": run.backend.state_dict(), "sampler": run.sampler.state(),
            "guards": {"masked_steps": run.masked_steps}}
