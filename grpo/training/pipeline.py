"""Asynchronous rollout with bounded staleness (`rollout.max_staleness` = N > 0): the next steps' batches
are sampled and scored on a rollout thread while this step trains.

How a step runs (`RolloutPipeline.take`, then `sync_weights`):
1. the main thread draws the prompts of every step up to `step + N` not drawn yet (one shared order, so
   the data order is the synchronous run's) and queues them for the rollout thread;
2. it waits for this step's batch (already done, except at the first step);
3. it trains on it, while the rollout thread samples the batch queued in 1. (its own weights: the vLLM
   engine's, or the hf engine's copy of the policy, `grpo.rollout.OnOwnCopy`);
4. `sync_weights` waits for the queued batches to finish, then copies the new weights into the engine:
   the policy version (updates made since the run started or resumed) goes up by one.

A batch is sampled with the version at the time its prompts were drawn, and since weights move only while
the rollout thread is idle, every batch's version is fixed, whatever the threads' timing: the batch of
step s is sampled by version max(0, s - 1 - N) and trained on by version s - 1 (counted from the first
step of the run or of the resume), so `rollout/staleness` = min(s - 1, N) on every step after an update.
The first step's batch is sampled before any update (staleness 0: it is the synchronous step); steps 2
to N + 1 were queued with it. One rollout thread means one batch sampled per training step: N = 1
hides the generation behind the training; N > 1 only lets batches be staler (it would pay with more
rollout workers, which this pipeline does not have).

The loss corrects for the older sampling policy with the sampler's own log-probs as the behaviour policy
(`algorithm.tis_cap`, `mis_low`/`mis_high`; `grpo.config.validate_staleness` requires one).

Checkpoints: the run's `sampler` advances only when a batch is taken for training, so a checkpoint holds
the prompt order's position before the batches in flight; a resumed run draws them again and samples
them from the resumed policy (no prompt lost or doubled). Their completions differ from the
uninterrupted run's (other weights, and the random stream the rollout thread shares), so an
asynchronous resume repeats the data order, not the numbers.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

from grpo.training.run import Run
from grpo.training.sampling import (
    Groups,
    ScoringTally,
    check_infra_errors,
    draw_rows,
    group_counts,
    nonzero_std_groups,
    sample_groups,
    score_rows,
)


class InlineRollout:
    """Synchronous rollout, with `RolloutPipeline`'s two calls: `take` samples and scores this step's batch on
    the training thread, from the current weights; `sync_weights` loads the new weights into the engine."""

    def __init__(self, run: Run):
        self.run = run

    def take(self, step: int) -> tuple[Groups, dict]:
        return sample_groups(self.run, self.run.cfg.train.prompts_per_step)

    def sync_weights(self, model) -> dict:
        return {"time/weight_sync_s": self.run.engine.sync_weights(model)}


@dataclass
class SampledBatch:
    """One step's batch as the rollout thread hands it back."""

    groups: Groups
    tally: ScoringTally  # its scoring's counters, summed over ranks on the main thread
    generate_s: float
    version: int  # the policy version it was sampled with


class RolloutPipeline:
    """Batches sampled up to `rollout.max_staleness` steps ahead of training, on one rollout thread."""

    def __init__(self, run: Run):
        self.run, self.depth = run, run.cfg.rollout.max_staleness
        self.last = run.cfg.train.max_steps
        self.ahead = replace(run.sampler)  # draws ahead; run.sampler follows the batches taken
        self.version = 0  # policy updates synced since the pipeline started
        self.queued: dict[int, tuple[Future, dict]] = {}  # step -> (its batch, sampler state after its prompts)
        self.next_step = run.start_step + 1
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")

    def take(self, step: int) -> tuple[Groups, dict]:
        """This step's scored groups and their metrics (as `grpo.training.sampling.sample_groups` returns them, plus
        `rollout/staleness` and `time/rollout_wait_s`, the time the trainer waited for the batch)."""
        while self.next_step <= min(step + self.depth, self.last):
            self._queue(self.next_step)
            self.next_step += 1
        start = time.perf_counter()
        future, sampler_after = self.queued.pop(step)
        batch = future.result()
        waited = time.perf_counter() - start
        self.run.sampler.load_state(sampler_after)  # what a checkpoint of this step saves
        counts = group_counts(nonzero_std_groups(batch.groups.rewards, self.run.cfg.algorithm.group_size))
        metrics = {"train/zero_std_frac": 1.0 - float(counts[0] / counts[1]), "time/generate_s": batch.generate_s,
                   **batch.tally.metrics(), "rollout/staleness": self.version - batch.version,
                   "time/rollout_wait_s": waited}
        check_infra_errors(metrics, self.run.cfg.reward.max_infra_error_frac, step)
        return batch.groups, metrics

    def sync_weights(self, model) -> dict:
        """After an update: wait for the batches in flight, then load the new weights into the engine."""
        start = time.perf_counter()
        wait([future for future, _ in self.queued.values()])
        waited = time.perf_counter() - start
        seconds = self.run.engine.sync_weights(model)
        self.version += 1
        return {"time/weight_sync_s": seconds, "time/sync_wait_s": waited}

    def close(self) -> None:
        """Drop the batches not started; wait for the one being sampled."""
        self.executor.shutdown(wait=True, cancel_futures=True)

    def _queue(self, step: int) -> None:
        rows = draw_rows(self.run.train_rows, self.ahead, self.run.cfg.train.prompts_per_step)
        future = self.executor.submit(self._sample, rows, self.version)
        self.queued[step] = (future, self.ahead.state())

    def _sample(self, rows: list[dict], version: int) -> SampledBatch:
        tally = ScoringTally()
        groups, seconds = score_rows(self.run, rows, tally)
        return SampledBatch(groups, tally, seconds, version)
