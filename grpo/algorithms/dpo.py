"""The offline preference baseline: DPO on (prompt, chosen, rejected) pairs fixed before the first step.

One run, as `train` and `train_step` below read:
1. the pairs: a JSONL/Parquet file (`algorithm.dpo.pairs_file`), or, for the built-in task, the policy's own
   samples ranked by the verifiable reward (`grpo.builtin.arithmetic_preferences`: `num_prompts` training
   problems x `samples_per_prompt` completions, a right answer against a wrong one), built in the run
   directory (a resumed run reads the file it built). Those generated samples are DPO's whole sampling
   budget, spent before the first step. Pairs whose prompt is an evaluation prompt are dropped;
2. each prompt is tokenised as the rollout engines tokenise prompts, each completion as its text without
   special tokens plus EOS (a sampled completion that stopped ended with EOS);
3. the run takes ceil(epochs x pairs / batch_size) steps; step s trains on the s-th `batch_size` pairs of a
   stream that shuffles all the pairs once per epoch (seeded by the run's seed and the epoch), each rank on
   its contiguous share of them;
4. one step is the DPO update online DPO takes too (`grpo.algorithms.preference.dpo_update`), against the frozen
   starting policy, with summed completion log-probs:
       loss = -mean log sigmoid(beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))))
   (or `algorithm.dpo.loss_type` ipo or hinge), one optimiser step, micro-batched by the token budget, exact.
   Evaluation, logging, the best checkpoint, early stopping, checkpoints and resuming are the shared loop's
   (`grpo.training.loop`), so offline and online DPO differ only in where their pairs come from.

Where this departs from DPO as published (Rafailov et al. 2023): the pairs are the policy's own samples
labelled by a verifiable reward rather than human preferences over a fine-tuned model's samples (as in
"on-policy"/"self-rewarding" variants); the loss is the paper's (`loss_type=sigmoid`) unless configured. The
pairs are one stream of per-epoch shuffles cut into equal batches, so every step has `batch_size` pairs and a
batch may straddle two epochs (with fewer pairs than `batch_size`, a batch holds some pair twice).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from grpo import distributed as dist
from grpo.algorithms.preference import dpo_update, pair_batch
from grpo.builtin.arithmetic_preferences import ArithmeticPreferences, arithmetic_preferences
from grpo.data.contamination import normalise
from grpo.data.loading import read_rows
from grpo.errors import ConfigError
from grpo.faults import crash_point
from grpo.rollout import encode_prompts
from grpo.training.loop import StepResult, replica_check, run_loop
from grpo.training.run import Run
from grpo.training.sampling import Groups

log = logging.getLogger(__name__)


@dataclass
class TokenisedPairs:
    """The run's preference pairs, as text and as token ids."""

    rows: list[dict]  # [P] prompt, chosen, rejected texts
    prompt_ids: list[list[int]]  # [P]
    chosen_ids: list[list[int]]  # [P] ending with EOS
    rejected_ids: list[list[int]]  # [P] ending with EOS

    def __len__(self) -> int:
        return len(self.rows)


def train(run: Run) -> list[dict]:
    """Build or read the pairs, then DPO steps from `run.start_step + 1` to the derived step count; returns
    the logged metrics."""
    opts = run.cfg.algorithm.dpo
    pairs = prepare_pairs(run)
    steps = num_steps(len(pairs), opts.epochs, opts.batch_size)
    if run.start_step > steps:
        raise ConfigError(f"algorithm.dpo: the checkpoint to resume is at step {run.start_step}, past this run's "
                          f"{steps} steps ({len(pairs)} pairs); were the pairs or algorithm.dpo changed?")
    run.backend.set_total_steps(steps)  # the learning-rate schedule spans the derived steps
    return run_loop(run, partial(train_step, pairs=pairs), max_steps=steps)


def train_step(run: Run, step: int, pairs: TokenisedPairs) -> StepResult:
    """One DPO step on the step's `batch_size` pairs, this rank's contiguous share of them."""
    cfg = run.cfg
    chosen = step_pairs(len(pairs), cfg.algorithm.dpo.batch_size, cfg.seed, step)  # [B] every rank's
    mine = dist.shard(chosen)
    batch = pair_batch(run, [pairs.prompt_ids[i] for i in mine],
                       [ids for i in mine for ids in (pairs.chosen_ids[i], pairs.rejected_ids[i])])
    metrics = dpo_update(run, batch, total_pairs=len(chosen))
    metrics["dpo/epoch"] = step * len(chosen) / len(pairs)
    crash_point("mid_step", step)
    metrics["time/weight_sync_s"] = run.engine.sync_weights(run.policy)
    metrics |= replica_check(run, step)
    return StepResult(metrics, logged_pairs(pairs, chosen))


def num_steps(num_pairs: int, epochs: float, batch_size: int) -> int:
    """ceil(epochs x pairs / batch_size): the optimiser steps of a run (at least one)."""
    return max(1, math.ceil(epochs * num_pairs / batch_size))


def step_pairs(num_pairs: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The pairs step `step` (from 1) trains on: positions (step-1) x B .. step x B - 1 of a stream that holds
    each epoch's own shuffle of all the pairs, epoch after epoch. A function of its arguments alone, so a
    resumed run takes the same batches as an uninterrupted one."""
    start = (step - 1) * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), num_pairs)
        order = np.random.default_rng([seed, epoch]).permutation(num_pairs)  # [P] this epoch's shuffle
        out += order[offset : offset + batch_size - len(out)].tolist()
    return out


def prepare_pairs(run: Run) -> TokenisedPairs:
    """The run's pairs, evaluation prompts dropped, tokenised; their counts and cost join the step-0 line."""
    pairs, generated, pairs_s = load_pairs(run)
    pairs, dropped = drop_eval_prompts(pairs, run)
    if not pairs:
        raise ConfigError(
            "algorithm.dpo: no preference pairs (the policy had no prompt with a right and a wrong answer)"
        )
    run.setup_metrics |= {"dpo/pairs": len(pairs), "dpo/pairs_dropped_eval_overlap": dropped,
                          "dpo/generated_samples": generated, "time/generate_s": pairs_s, "time/step_s": pairs_s}
    return tokenise_pairs(pairs, run.tokenizer)


def load_pairs(run: Run) -> tuple[list[dict], int, float]:
    """(pairs, samples generated to build them, seconds spent) for the run's config. The built-in set is
    built by rank 0 while the other ranks wait, then read by every rank."""
    cfg, opts = run.cfg, run.cfg.algorithm.dpo
    start = time.perf_counter()
    if opts.pairs_file:
        pairs = read_rows(opts.pairs_file)
        for i, row in enumerate(pairs):
            for col in ("prompt", "chosen", "rejected"):
                if not isinstance(row.get(col), str):
                    raise ConfigError(
                        f"{opts.pairs_file}: row {i} has no text column {col!r} (algorithm.dpo.pairs_file)"
                    )
        return pairs, 0, time.perf_counter() - start
    spec = ArithmeticPreferences(
        num_prompts=opts.num_prompts, samples_per_prompt=opts.samples_per_prompt,
        pairs_per_prompt=opts.pairs_per_prompt,
        temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
        digits=cfg.task.arithmetic.digits, reverse=cfg.task.arithmetic.reverse,
        max_carries=cfg.task.arithmetic.max_carries, seed=cfg.seed,
    )
    # Built inside the run directory, never taken from a cache: its sampling time is part of DPO's cost.
    # A resumed run finds the file it built there (the same policy and options) and samples nothing.
    if not dist.is_main():
        dist.barrier()
    path = arithmetic_preferences(cfg.model.path, spec, cache_dir=Path(cfg.run_dir) / "pairs", log=log.info)
    if dist.is_main():
        dist.barrier()
    num_prompts = min(opts.num_prompts or len(run.train_rows), len(run.train_rows))
    return read_rows(str(path)), num_prompts * opts.samples_per_prompt, time.perf_counter() - start


def drop_eval_prompts(pairs: list[dict], run: Run) -> tuple[list[dict], int]:
    """Pairs whose prompt is not an evaluation prompt (exact match after normalisation)."""
    held = {normalise(r["prompt"]) for rows in (run.eval_rows, *run.ood_rows.values()) for r in rows}
    kept = [p for p in pairs if normalise(p["prompt"]) not in held]
    return kept, len(pairs) - len(kept)


def tokenise_pairs(pairs: list[dict], tokenizer) -> TokenisedPairs:
    """Prompts as the rollout engines tokenise them; completions as their text without special tokens, then EOS."""
    def completion(texts: list[str]) -> list[list[int]]:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [seq + [tokenizer.eos_token_id] for seq in ids]

    return TokenisedPairs(rows=pairs, prompt_ids=encode_prompts(tokenizer, [p["prompt"] for p in pairs]),
                          chosen_ids=completion([p["chosen"] for p in pairs]),
                          rejected_ids=completion([p["rejected"] for p in pairs]))


def logged_pairs(pairs: TokenisedPairs, chosen: list[int]) -> Groups:
    """The step's pairs as the loop's sample log reads them: per prompt, its chosen then its rejected text."""
    rows = [pairs.rows[i] for i in chosen]
    return Groups(rows=rows, prompt_ids=[pairs.prompt_ids[i] for i in chosen],
                  completion_ids=[ids for i in chosen for ids in (pairs.chosen_ids[i], pairs.rejected_ids[i])],
                  texts=[text for r in rows for text in (r["chosen"], r["rejected"])],
                  truncated=[False] * (2 * len(rows)), sampler_logprobs=None, per_reward={},
                  rewards=[None] * (2 * len(rows)))
