"""Sampling and scoring groups: B prompts, G completions each, scored by the reward functions.

Every rank draws the same prompt indices (one shared, seeded order) and keeps its contiguous share,
so a group never straddles ranks. With DAPO's dynamic sampling, groups whose accuracy rewards are all
equal (by default; `algorithm.dynamic_sampling_on` picks another reward, or the shaped total) are dropped
and more prompts are sampled. The scored groups of all ranks are then gathered, so that
advantages, metrics and samples are computed on the whole step's batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from grpo import distributed as dist
from grpo.config import AlgorithmConfig, dynamic_sampling_reward
from grpo.core.advantages import group_stats
from grpo.errors import RewardInfraError
from grpo.rollout.episodes import episode_metrics, episode_options, failed, run_episodes
from rewards.scorer import ScoredBatch
from rewards.shaping import overlong_penalty


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
    rewards: list[float | None]  # [B*G] weighted total after the overlong penalty
    loss_masks: list[list[int]] | None = None  # [B*G] episodes: 0 on the environment's tokens
    episodes: list[dict] | None = None  # [B*G] episodes: what grpo.rollout.episodes.episode_metrics reads

    def keep(self, keep: list[bool], G: int) -> Groups:
        """Only the groups whose flag is set."""
        idx = [g * G + j for g, k in enumerate(keep) if k for j in range(G)]

        def pick(xs):
            return None if xs is None else [xs[i] for i in idx]

        return Groups(
            rows=[r for r, k in zip(self.rows, keep) if k],
            prompt_ids=[p for p, k in zip(self.prompt_ids, keep) if k],
            completion_ids=pick(self.completion_ids), texts=pick(self.texts), truncated=pick(self.truncated),
            sampler_logprobs=pick(self.sampler_logprobs),
            per_reward={name: pick(v) for name, v in self.per_reward.items()}, rewards=pick(self.rewards),
            loss_masks=pick(self.loss_masks), episodes=pick(self.episodes),
        )

    def __add__(self, other: Groups) -> Groups:
        def both(a, b):
            return None if a is None or b is None else a + b

        return Groups(
            rows=self.rows + other.rows, prompt_ids=self.prompt_ids + other.prompt_ids,
            completion_ids=self.completion_ids + other.completion_ids, texts=self.texts + other.texts,
            truncated=self.truncated + other.truncated,
            sampler_logprobs=both(self.sampler_logprobs, other.sampler_logprobs),
            per_reward=join_columns(self.per_reward, len(self.texts), other.per_reward, len(other.texts)),
            rewards=self.rewards + other.rewards, loss_masks=both(self.loss_masks, other.loss_masks),
            episodes=both(self.episodes, other.episodes),
        )


@dataclass
class ScoringTally:
    """What the scoring calls of one step counted (refills included), before the sum over ranks."""

    scored: int = 0  # samples scored
    errors: int = 0  # samples on which some reward raised or ran past its deadline
    masked: int = 0  # samples with no reward at all
    per_reward: dict[str, float] = field(default_factory=dict)  # reward/<name>_errors and each reward's counters

    def add(self, scored: ScoredBatch) -> None:
        self.scored += len(scored.total)
        self.errors += sum(any(flags) for flags in zip(*scored.errors.values())) if scored.errors else 0
        self.masked += sum(r is None for r in scored.total)
        for key, value in [*((f"reward/{n}_errors", sum(f)) for n, f in scored.errors.items()),
                           *scored.reward_metrics.items()]:
            self.per_reward[key] = self.per_reward.get(key, 0.0) + float(value)

    def metrics(self) -> dict:
        """Summed over ranks: `train/reward_{error,masked}_frac` and `reward/<name>_error_frac` and counters;
        `reward/<name>_infra_errors` stay counts, and `train/reward_infra_error_frac` is the largest share of the
        samples that one reward could not score for infrastructure reasons."""
        scored, errors, masked = dist.all_reduce_sum(torch.tensor([self.scored, self.errors, self.masked])).tolist()
        out = {"train/reward_error_frac": errors / max(1, scored),  # raised or ran past its deadline: masked
               "train/reward_masked_frac": masked / max(1, scored),  # no reward at all
               "train/reward_infra_error_frac": 0.0}
        for key, value in sum_over_ranks(self.per_reward).items():
            if key.endswith("_infra_errors"):
                out[key] = value
                out["train/reward_infra_error_frac"] = max(out["train/reward_infra_error_frac"], value / max(1, scored))
            elif key.endswith("_errors"):
                out[key.removesuffix("s") + "_frac"] = value / max(1, scored)
            else:
                out[key] = value
        return out


def check_infra_errors(metrics: dict, max_frac: float, step: int | None = None) -> None:
    """Raise `RewardInfraError` when a reward could not score more than `max_frac` of the step's samples for
    reasons that are not the completions' (the metrics are summed over ranks, so every rank raises alike)."""
    frac = metrics.get("train/reward_infra_error_frac", 0.0)
    if frac > max_frac:
        counts = {k: v for k, v in metrics.items() if k.endswith("_infra_errors") and v}
        where = "" if step is None else f"step {step}: "
        raise RewardInfraError(
            f"{where}the rewards' infrastructure failed on {frac:.0%} of the samples ({counts}), more than "
            f"reward.max_infra_error_frac={max_frac}: these are failures to score (a sandbox that does not start, "
            f"a checker that died, a scorer that raised), not wrong answers; see the log for the first error")


def sample_groups(run, num_prompts: int) -> tuple[Groups, dict]:
    """Sample and score G completions for this rank's share of `num_prompts` prompts.

    With dynamic sampling, groups whose rewards are all equal carry no signal: they are dropped (equal on
    the reward `dynamic_sampling_reward` names, by default the accuracy one)
    and more prompts are sampled, at most `max_resample` extra rounds, while any rank is short
    (every rank generates in every round: under ZeRO-3 generation gathers the weights, a
    collective); if still short, the step trains on the groups it has.
    """
    algo, G = run.cfg.algorithm, run.cfg.algorithm.group_size
    share = num_prompts // dist.world_size()
    groups, counts, generate_s, rounds, tally = None, None, 0.0, 0, ScoringTally()
    while True:
        fresh, seconds = sample_and_score(run, num_prompts, tally)
        generate_s += seconds
        if counts is None:  # [groups whose advantages are not all 0, groups] of the first round, over ranks
            counts = group_counts(nonzero_std_groups(fresh.rewards, G))
        if algo.dynamic_sampling:
            fresh = fresh.keep(nonzero_std_groups(dynamic_sampling_values(fresh, dynamic_sampling_reward(run.cfg)),
                                                  G), G)
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
    metrics = {"train/zero_std_frac": 1.0 - float(counts[0] / counts[1]), "time/generate_s": generate_s,
               **tally.metrics()}
    check_infra_errors(metrics, run.cfg.reward.max_infra_error_frac)
    if algo.dynamic_sampling:
        metrics["train/resample_rounds"] = rounds
        metrics["train/kept_groups"] = int(dist.all_reduce_sum(torch.tensor([len(groups.rows)]))[0])
    return groups, metrics


def dynamic_sampling_values(groups: Groups, reward: str) -> list[float | None]:
    """What dynamic sampling compares within a group: one reward's values, or 'total', the shaped reward.
    DAPO and verl filter on accuracy, so an all-correct group of varied lengths is dropped rather than
    trained on its overlong penalty alone."""
    return groups.rewards if reward == "total" else groups.per_reward[reward]


def sample_and_score(run, num_prompts: int, tally: ScoringTally) -> tuple[Groups, float]:
    """One round: this rank's share of the next `num_prompts` prompts, G completions each, scored
    (the overlong penalty added); returns the groups and the generation time."""
    return score_rows(run, draw_rows(run.train_rows, run.sampler, num_prompts), tally)


def draw_rows(train_rows: list[dict], sampler, num_prompts: int) -> list[dict]:
    """This rank's share of the next `num_prompts` prompts of `sampler`'s order (the same on every rank)."""
    return [train_rows[i] for i in dist.shard(sampler.next_indices(num_prompts))]


def score_rows(run, rows: list[dict], tally: ScoringTally) -> tuple[Groups, float]:
    """G completions of each of `rows`, scored (the overlong penalty added; the scoring counted in
    `tally`); returns the groups and the generation time. No collective: it may run on a rollout thread."""
    G = run.cfg.algorithm.group_size
    if run.make_env is None:
        out = run.engine.generate([r["prompt"] for r in rows], G)
    else:  # multi-turn episodes; the task's rewards score each episode's last model turn
        out = run_episodes(run.engine, run.tokenizer, run.make_env, rows, G,
                           **episode_options(run.cfg.rollout, run.cfg.env))
    prompts = [r["prompt"] for r in rows for _ in range(G)]
    columns = {k: [r[k] for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
    columns["completion_length"] = out.completion_lengths
    scored = run.scorer(prompts, out.texts, columns)
    tally.add(scored)
    total, per_reward = scored.total, scored.per_reward
    if out.episodes is not None:
        env_rewards = [e["reward"] for e in out.episodes]
        total = add_env_reward(total, env_rewards, run.cfg.env.reward_weight)
        total = [None if failed(e) else t for t, e in zip(total, out.episodes)]  # the environment failed, not the model
        per_reward = {**per_reward, "env": env_rewards}
        per_reward = {**per_reward, **environment_figures(out.episodes, total, set(per_reward))}
    rewards = add_overlong_penalty(total, [len(c) for c in out.completion_ids], run.cfg.algorithm,
                                   run.cfg.rollout.max_new_tokens)
    groups = Groups(rows, out.prompt_ids, out.completion_ids, out.texts, out.truncated, out.logprobs,
                    per_reward, rewards, out.loss_masks, out.episodes)
    return groups, out.metrics.get("time/generate_s", 0.0)


def environment_figures(episodes: list[dict], total: list[float | None], taken: set[str]) -> dict[str, list]:
    """Reward columns from the episodes' records (None where not applicable): each named part of an environment's
    reward (`Done.scores`: e.g. a verifiers rubric's functions) under its name (`env_<name>` where a reward of the
    run has that name), and with routed environments (grpo.envs.routing) each route's `<route>/total` (the
    episode's total reward) and `<route>/<part>`, so `reward/<route>/..._mean` averages that route's episodes."""
    n = len(episodes)
    out: dict[str, list] = {}

    def put(name: str, i: int, value: float | None) -> None:
        out.setdefault(name, [None] * n)[i] = value

    for i, (record, value) in enumerate(zip(episodes, total)):
        route = record.get("route")
        if route is not None:
            put(f"{route}/total", i, value)
        for part, score in record.get("scores", {}).items():
            put(f"env_{part}" if part in taken else part, i, score)
            if route is not None:
                put(f"{route}/{part}", i, score)
    return out


def join_columns(a: dict[str, list], n_a: int, b: dict[str, list], n_b: int) -> dict[str, list]:
    """Two sets of reward columns, of n_a and n_b samples, one after the other; a column one side lacks (an
    environment's part no episode of that side had) is None there."""
    return {k: a.get(k, [None] * n_a) + b.get(k, [None] * n_b) for k in {**a, **b}}


def add_env_reward(total: list[float | None], env: list[float | None], weight: float) -> list[float | None]:
    """The episodes' total reward: the task's weighted total plus `weight` times the environment's `Done`
    reward, a None on either side left out as the scorer leaves it out (None when both are None)."""
    return [t if e is None else weight * e if t is None else t + weight * e for t, e in zip(total, env)]


def add_overlong_penalty(rewards: list[float | None], lengths: list[int], algo: AlgorithmConfig,
                         max_new_tokens: int) -> list[float | None]:
    """Each reward plus `overlong_penalty` times DAPO's soft overlong punishment of its completion's
    length in tokens over the last `overlong_buffer` tokens before `max_new_tokens` (0: off)."""
    if algo.overlong_buffer <= 0:
        return rewards
    ramp = overlong_penalty(lengths, max_new_tokens, algo.overlong_buffer)
    return [None if r is None else r + algo.overlong_penalty * p for r, p in zip(rewards, ramp)]


def group_counts(informative: list[bool]) -> torch.Tensor:
    """[groups with a reward signal, groups], summed over ranks (`train/zero_std_frac` is 1 - their ratio)."""
    return dist.all_reduce_sum(torch.tensor([sum(informative), len(informative)]))


def nonzero_std_groups(rewards: list[float | None], group_size: int) -> list[bool]:
    """Per group: do its valid rewards differ (None does not count as 0)?"""
    values = torch.tensor([r if r is not None else float("nan") for r in rewards], dtype=torch.float32)  # [N]
    return group_stats(values, group_size)["nonzero_std_mask"].tolist()


def gather_groups(groups: Groups) -> tuple[Groups, int]:
    """The whole step's groups (every rank's, in rank order) and where this rank's rows start
    (-1 when some rank has no group to train on: the step is then skipped)."""
    shares = dist.all_gather_objects(groups)
    everyone = shares[0]
    for other in shares[1:]:
        everyone = everyone + other
    offset = sum(len(g.completion_ids) for g in shares[: dist.rank()])
    if min(len(g.rows) for g in shares) == 0:
        return everyone, -1
    return everyone, offset


def reward_stats(groups: Groups) -> dict:
    """`reward/<name>_{mean,std,none_frac}` over the step's samples, as `ScoredBatch.metrics` computes
    them. Its `_error_frac` is left to `ScoringTally`, which counts errors over every scoring call."""
    stats = ScoredBatch(total=[], per_reward=groups.per_reward).metrics()
    return {k: v for k, v in stats.items() if not k.endswith("_error_frac")}


def rollout_metrics(groups: Groups, valid: torch.Tensor) -> dict:
    """Reward and length metrics of one step's samples (`valid` [N]: the reward is not None)."""
    present = [r for r in groups.rewards if r is not None]
    return {
        "train/reward_mean": sum(present) / len(present) if present else float("nan"),
        "train/reward_none_frac": 1.0 - float(valid.float().mean()),
        "train/completion_len": sum(map(len, groups.completion_ids)) / max(1, len(groups.completion_ids)),
        "train/truncated_frac": sum(groups.truncated) / max(1, len(groups.truncated)),
        **(episode_metrics(groups.episodes) if groups.episodes is not None else {}),
    }


def sum_over_ranks(counts: dict[str, float]) -> dict[str, float]:
    """Each key's sum over the ranks that have it."""
    total: dict[str, float] = {}
    for share in dist.all_gather_objects(counts):
        for key, value in share.items():
            total[key] = total.get(key, 0.0) + value
    return total
