"""Asynchronous rollout (`rollout.max_staleness`, grpo/training/pipeline.py) through the real loop: the staleness
every step, the run trains, the data order and the resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo.cli import train_from_config
from grpo.errors import ConfigError
from grpo.training.checkpoint import load_state
from tests.conftest import compose

ROOT = Path(__file__).resolve().parents[2]
B, G = 4, 4
COMMON = ["tracking.progress_bar=false", "tracking.plot=false", "threads=1", "seed=3", "train.max_steps=5",
          f"train.prompts_per_step={B}", f"algorithm.group_size={G}", "task.arithmetic.num_eval=8",
          "train.eval_every=0", "train.samples_every=1", f"train.num_samples_logged={B * G}",
          "checkpoint.every_steps=2", "checkpoint.keep_last=5", "optim.lr=1e-4", "algorithm.tis_cap=2"]


# Mean |sampler - trainer| log-prob of a step's tokens: below on a step sampled by its own weights (measured 6e-7 on
# `ATEN_CPU_CAPABILITY=default`, 7e-6 on avx512), above on one sampled by weights one or more updates old (measured
# 9e-4 to 1.5e-2 at lr 1e-4; 1e-3 was once the bound, and one stale step of the default path fell under it).
STALE_GAP = 1e-4


def _run(tmp_path: Path, name: str, overrides: list[str]) -> list[dict]:
    cfg = compose([*COMMON, "model=hf", *overrides])
    cfg.run_dir = str(tmp_path / name)
    return train_from_config(cfg)


def _prompts_by_step(run_dir: Path) -> list[list[str]]:
    """The prompts each step trained on, from samples.jsonl (every sample of every step is logged, one line
    each: G lines per prompt)."""
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    steps = sorted({r["step"] for r in rows})
    return [[r["prompt"] for r in rows if r["step"] == s][::G] for s in steps]


def test_async_needs_a_correction_and_fixed_prompt_counts():
    with pytest.raises(ConfigError, match="rollout.max_staleness.*algorithm.tis_cap"):
        compose(["rollout.max_staleness=1", "algorithm.tis_cap=0"])
    with pytest.raises(ConfigError, match="rollout.max_staleness.*dynamic_sampling"):
        compose(["rollout.max_staleness=1", "algorithm.tis_cap=2", "algorithm.dynamic_sampling=true"])
    with pytest.raises(ConfigError, match="rollout.max_staleness"):
        compose(["rollout.max_staleness=-1"])
    with pytest.raises(ConfigError, match="rollout.enable_sleep_mode"):  # vLLM would sleep through the update
        compose(["rollout=vllm", "rollout.max_staleness=1", "algorithm.tis_cap=2"])
    assert compose(["rollout.max_staleness=1", "algorithm.mis_high=2"]).rollout.max_staleness == 1
    with pytest.raises(ConfigError, match="algorithm.mis_low, algorithm.mis_high"):
        compose(["algorithm.mis_low=0.5", "algorithm.mis_high=0.9"])
    with pytest.raises(ConfigError, match="algorithm.tis_level"):
        compose(["algorithm.tis_level=group"])


@pytest.mark.learning
@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2])
def test_staleness_is_bounded_every_step_and_the_run_trains(tmp_path, warm_tiny_dir, n):
    history = _run(tmp_path, f"n{n}", [f"model.path={warm_tiny_dir}", f"rollout.max_staleness={n}"])
    steps = [h for h in history if h["step"] > 0]
    assert [h["step"] for h in steps] == [1, 2, 3, 4, 5]
    # the batch of step s is sampled by version max(0, s - 1 - n) and trained on by version s - 1
    assert [h["rollout/staleness"] for h in steps] == [min(s - 1, n) for s in range(1, 6)]
    # Step 1 is on policy: the copy samples the trainer's weights. Every later step was sampled by weights one or
    # more updates old, so the trainer's log-probs of its tokens moved; a pipeline that sampled them from the current
    # weights would show the fresh step's gap.
    assert steps[0]["rollout/logprob_abs_diff"] < STALE_GAP
    assert all(h["rollout/logprob_abs_diff"] > STALE_GAP for h in steps[1:]), [h["rollout/logprob_abs_diff"]
                                                                               for h in steps]
    w0 = load_file(warm_tiny_dir / "model.safetensors")
    w5 = load_file(tmp_path / f"n{n}" / "checkpoints" / "step_4" / "policy" / "model.safetensors")
    assert any(not torch.equal(w5[k], w0[k]) for k in w0)  # the run trained
    # the data order is the synchronous run's: B fresh prompts per step from the one shared order
    assert load_state(tmp_path / f"n{n}" / "checkpoints" / "step_2")["sampler"] == {"epoch": 0, "index": 2 * B}


@pytest.mark.slow
def test_resume_regenerates_the_batches_in_flight(tmp_path, warm_tiny_dir):
    # Killed after step 3's metrics line (checkpoint step_2 holds the policy; batches 3 and 4 were in flight
    # with max_staleness=2), then resumed: every step trains on the prompts the uninterrupted run trained on.
    overrides = [f"model.path={warm_tiny_dir}", "rollout.max_staleness=2"]
    _run(tmp_path, "straight", overrides)
    crashed = tmp_path / "crashed"
    args = [sys.executable, "-m", "grpo.train", f"run_dir={crashed}", *COMMON, "model=hf", *overrides, "resume=auto"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GRPO_KILL_AT": "after_metrics@3"}
    proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL at the crash point
    assert load_state(crashed / "checkpoints" / "step_2")["sampler"] == {"epoch": 0, "index": 2 * B}
    resumed = _run(tmp_path, "crashed", [*overrides, "resume=auto"])
    assert [h["step"] for h in resumed] == [3, 4, 5]
    # counted from the resume: step 3 is the resumed policy's first batch (on policy), then 1, 2 versions old
    assert [h["rollout/staleness"] for h in resumed] == [0, 1, 2]
    straight, again = _prompts_by_step(tmp_path / "straight"), _prompts_by_step(crashed)
    assert len(again) == 5 and again == straight  # nothing lost, nothing doubled, the same order
    steps = [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5]


@pytest.mark.slow
def test_the_correction_changes_the_gradient_of_a_stale_step_only(tmp_path, warm_tiny_dir, monkeypatch):
    from dataclasses import replace

    from grpo.algorithms import grpo as trainer
    from grpo.training.pipeline import RolloutPipeline
    from grpo.training.run import build_run
    from tests.integration.test_trainer import RecordingBackend

    cfg = compose([*COMMON, "model=hf", f"model.path={warm_tiny_dir}", "rollout.max_staleness=1",
                   "train.max_steps=2", "train.samples_every=0",
                   # the sampler's own layout: its log-probs are then the trainer's to the bit on a fresh step; a packed
                   # forward rounds differently (about 4e-7 per token), which the group-centred gradient's
                   # cancellation amplifies to ~1e-2 of its size, above the fresh step's bound below
                   "backend.packing=padded"])
    cfg.run_dir = str(tmp_path / "run")
    run = build_run(cfg)
    real_update, gaps = trainer.update_policy, []

    def spy(backend, batch, algo, **kwargs):  # this step's gradient with the correction on and off, then the step
        grads = []
        for cap in (algo.tis_cap, 0.0):
            recorder = RecordingBackend(backend.model)
            real_update(recorder, batch, replace(algo, tis_cap=cap), **kwargs)
            grads.append(recorder.grads[0])
        gaps.append(max(float((grads[0][n] - g).abs().max() / g.abs().max()) for n, g in grads[1].items()))
        return real_update(backend, batch, algo, **kwargs)

    monkeypatch.setattr(trainer, "update_policy", spy)
    pipeline = RolloutPipeline(run)
    try:
        for step in (1, 2):
            assert trainer.train_step(run, step, rollout=pipeline).skipped is None
    finally:
        pipeline.close()
        run.tracker.close(plot=False)
    print(gaps)
    # step 1: sampler and trainer agree (ratio 1 to 2e-7), so TIS leaves the gradient as it was; step 2's batch
    # was sampled before the first update: min(ratio, 2) reweights its tokens and the gradient moves
    assert gaps[0] < 1e-4 and gaps[1] > 1e-3, gaps
