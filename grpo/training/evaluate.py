"""Held-out evaluation: greedy accuracy (and pass@k from sampled completions).

`grpo-eval` evaluates a model directory or a run's checkpoint on a task's held-out split with
the same rollout engine and reward functions as training. A run with an environment (`env.name`)
is evaluated on greedy episodes with it (every turn greedy; the last model turn is scored), so a
model that learned to use a tool is measured using it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import torch

from grpo import distributed as dist
from grpo.data.loading import problem_key
from grpo.rollout import Completions
from grpo.rollout.episodes import episode_options, run_episodes

# rows, n, greedy -> n episodes per row (grpo.rollout.episodes.run_episodes with the run's environment)
Episodes = Callable[[list[dict], int, bool], Completions]


def evaluate(engine, scorer, rows: list[dict], accuracy_reward: str, *, pass_k: int = 0,
             solved: list[bool] | None = None, episodes: Episodes | None = None,
             format_reward: str | None = None) -> dict:
    """`eval/accuracy`: share of rows whose greedy completion scores 1 on `accuracy_reward`
    (None counts as wrong). With `pass_k`, also `eval/pass@k` from k sampled completions. With `format_reward`
    (a reward of `scorer`), also `eval/format`: share of greedy completions scoring 1 on it, right or wrong, so
    that a gain in accuracy can be told apart from a change of layout alone.
    `solved`, when given, receives each row's greedy outcome, in row order. `episodes`, when given,
    runs each row as an episode (`Episodes`) instead of one completion; its last model turn is scored."""
    start = time.perf_counter()
    prompts = [r["prompt"] for r in rows]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    out = episodes(rows, 1, True) if episodes else engine.generate(prompts, 1, greedy=True)
    per_reward = scorer(prompts, out.texts, {**columns, "completion_length": out.completion_lengths}).per_reward
    outcomes = [s is not None and s >= 1.0 for s in per_reward[accuracy_reward]]
    if solved is not None:
        solved.extend(outcomes)
    metrics = {
        "eval/accuracy": sum(outcomes) / len(rows),
        "eval/completion_len": sum(map(len, out.completion_ids)) / len(rows),
    }
    if format_reward is not None:
        metrics["eval/format"] = sum(s is not None and s >= 1.0 for s in per_reward[format_reward]) / len(rows)
    if pass_k:
        sampled = episodes(rows, pass_k, False) if episodes else engine.generate(prompts, pass_k)
        rep = {k: [v for v in vals for _ in range(pass_k)] for k, vals in columns.items()}
        rep["completion_length"] = sampled.completion_lengths
        s = scorer([p for p in prompts for _ in range(pass_k)], sampled.texts, rep).per_reward[accuracy_reward]
        solved = [any(x is not None and x >= 1.0 for x in s[i * pass_k : (i + 1) * pass_k]) for i in range(len(rows))]
        metrics[f"eval/pass@{pass_k}"] = sum(solved) / len(rows)
    metrics["time/eval_s"] = time.perf_counter() - start
    return metrics


def evaluate_splits(engine, scorer, eval_rows: list[dict], ood_splits: dict[str, list[dict]], accuracy_reward: str,
                    *, pass_k: int = 0, outcomes: dict[str, list[bool]] | None = None,
                    episodes: Episodes | None = None, format_reward: str | None = None) -> dict:
    """In-distribution held-out accuracy (`eval/accuracy`), each out-of-distribution split's
    (`eval/ood/<name>_accuracy`), their row-weighted mean `eval/ood_accuracy`, and the gap
    `eval/generalization_gap` = `eval/accuracy` - `eval/ood_accuracy`, all with the same greedy harness.
    `outcomes`, when given, receives each split's per-row outcomes (`test`, `ood/<name>`). `eval/format` (with
    `format_reward`) is the in-distribution split's."""
    outcomes = {} if outcomes is None else outcomes
    metrics = evaluate(engine, scorer, eval_rows, accuracy_reward, pass_k=pass_k,
                       solved=outcomes.setdefault("test", []), episodes=episodes, format_reward=format_reward)
    splits = {name: rows for name, rows in ood_splits.items() if rows}
    if splits:
        correct = total = 0.0
        for name, rows in splits.items():
            acc = evaluate(engine, scorer, rows, accuracy_reward, solved=outcomes.setdefault(f"ood/{name}", []),
                           episodes=episodes)
            metrics[f"eval/ood/{name}_accuracy"] = acc["eval/accuracy"]
            metrics["time/eval_s"] += acc["time/eval_s"]
            correct += acc["eval/accuracy"] * len(rows)
            total += len(rows)
        metrics["eval/ood_accuracy"] = correct / total
        metrics["eval/generalization_gap"] = metrics["eval/accuracy"] - metrics["eval/ood_accuracy"]
    return metrics


def evaluate_run(run, outcomes: dict[str, dict] | None = None) -> dict:
    """The evaluation every trainer (GRPO, PPO, DPO) logs: `evaluate_splits` on the run's held-out (test)
    and out-of-distribution splits, and `val/accuracy` on its validation split when it has one.
    `outcomes`, when given, receives every split's per-problem outcomes over all ranks (`solved_bits`), a
    digest of its prompts, so that two runs' outcomes are paired by problem only when they saw the same ones, and
    each row's `problem_key` in row order, so that splits phrasing the same problems differently pair by problem.

    With several ranks each evaluates every world_size-th row of each split, and the means are
    combined weighted by the rows each rank scored: the result is that of one rank on all rows.
    """
    if not run.eval_rows:
        return {}
    rank, world = dist.rank(), dist.world_size()
    eval_rows = run.eval_rows[rank::world]
    ood = {name: rows[rank::world] for name, rows in run.ood_rows.items()}
    val_rows = run.val_rows[rank::world]
    mine: dict[str, list[bool]] = {}  # this rank's rows of each split
    episodes = episode_runner(run.engine, run.tokenizer, run.make_env, run.cfg.rollout, run.cfg.env)
    metrics = evaluate_splits(run.engine, run.eval_scorer, eval_rows, ood, run.cfg.reward.accuracy,
                              pass_k=run.cfg.train.eval_pass_k, outcomes=mine, episodes=episodes,
                              format_reward=run.cfg.reward.format)
    if val_rows:  # the validation split, scored by the same greedy harness
        val = evaluate(run.engine, run.eval_scorer, val_rows, run.cfg.reward.accuracy,
                       solved=mine.setdefault("val", []), episodes=episodes)
        metrics["val/accuracy"] = val["eval/accuracy"]
        metrics["time/eval_s"] += val["time/eval_s"]
    sizes = {"eval/problems": len(run.eval_rows)}  # what each accuracy is a fraction of (for intervals)
    if run.ood_rows:
        sizes["eval/ood_problems"] = sum(map(len, run.ood_rows.values()))
    if run.val_rows:
        sizes["val/problems"] = len(run.val_rows)
    if outcomes is not None:
        splits = {"test": run.eval_rows, "val": run.val_rows} | {f"ood/{k}": v for k, v in run.ood_rows.items()}
        outcomes |= {split: {"solved": bits, "digest": prompts_digest(splits[split]),
                             "keys": [problem_key(r) for r in splits[split]]}
                     for split, bits in solved_bits(mine).items()}
    if world == 1:
        return metrics | sizes

    def rows_behind(key: str) -> int:  # how many rows this rank's value of `key` is a mean over
        if key.startswith("eval/ood/"):
            return len(ood[key.removeprefix("eval/ood/").removesuffix("_accuracy")])
        if key == "val/accuracy":
            return len(val_rows)
        return sum(map(len, ood.values())) if key == "eval/ood_accuracy" else len(eval_rows)

    keys = sorted(set().union(*dist.all_gather_objects(set(metrics))) - {"time/eval_s", "eval/generalization_gap"})
    weights = [rows_behind(k) if k in metrics else 0 for k in keys]  # a rank with no rows of a split: weight 0
    sums = dist.all_reduce_sum(torch.tensor([metrics.get(k, 0.0) * w for k, w in zip(keys, weights)] + weights))
    out = {k: float(sums[i] / sums[len(keys) + i]) for i, k in enumerate(keys) if sums[len(keys) + i] > 0}
    if "eval/ood_accuracy" in out:
        out["eval/generalization_gap"] = out["eval/accuracy"] - out["eval/ood_accuracy"]
    out["time/eval_s"] = dist.all_reduce_max(metrics["time/eval_s"])
    return out | sizes


def episode_runner(engine, tokenizer, make_env, rollout, env=None) -> Episodes | None:
    """`Episodes` with the environment `make_env` makes, the turn and token limits of `rollout` (a
    RolloutConfig) and the time budget and workers of `env` (an EnvConfig), as training runs them; None
    without an environment (single completions)."""
    if make_env is None:
        return None

    def episodes(rows: list[dict], n: int, greedy: bool) -> Completions:
        return run_episodes(engine, tokenizer, make_env, rows, n, greedy=greedy, **episode_options(rollout, env))
    return episodes


def prompts_digest(rows: list[dict]) -> str:
    """A short fingerprint of a split's prompts, in order."""
    return hashlib.sha256("\n".join(r["prompt"] for r in rows).encode()).hexdigest()[:16]


def solved_bits(mine: dict[str, list[bool]]) -> dict[str, str]:
    """Each split's outcomes over every rank, in the split's row order, as a string of 0s and 1s.
    Rank r evaluated rows r, r + world, r + 2 world, ...: the ranks' lists interleave back into the split."""
    everyone = dist.all_gather_objects(mine)
    out = {}
    for split in sorted(set().union(*everyone)):
        lists = [rank_outcomes.get(split, []) for rank_outcomes in everyone]
        merged = [None] * sum(map(len, lists))
        for r, solved in enumerate(lists):
            merged[r :: len(lists)] = solved
        out[split] = "".join("1" if s else "0" for s in merged)
    return out
