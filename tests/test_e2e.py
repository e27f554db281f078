"""End-to-end runs of grpo-train's code path on the warm-started tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo.checkpoint import latest_checkpoint, load_state
from grpo.train import train_from_config
from tests.conftest import compose

pytestmark = pytest.mark.slow
QUIET = ["tracking.progress_bar=false", "threads=2"]


def _run(tmp_path, name, overrides):
    cfg = compose([*QUIET, *overrides])
    cfg.run_dir = str(tmp_path / name)
    return cfg, train_from_config(cfg)


def test_reward_rises_and_run_dir_is_complete(tmp_path, warm_tiny_dir):
    cfg, history = _run(tmp_path, "learn", ["experiment=demo", "train.max_steps=60", "train.eval_every=60"])
    rewards = [h["train/reward_mean"] for h in history if "train/reward_mean" in h]
    first, last = sum(rewards[:15]) / 15, sum(rewards[-15:]) / 15
    assert last > first + 0.1, (first, last)
    evals = [h["eval/accuracy"] for h in history if "eval/accuracy" in h]
    assert evals[-1] > evals[0] + 0.05, evals
    run = tmp_path / "learn"
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl", "plot.png"):
        assert (run / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "train/reward_mean", "train/loss", "time/step_s", "train/entropy", "train/zero_std_frac",
                "rollout/logprob_abs_diff", "reward/math_accuracy_mean"):
        assert key in rows[-1], key
    assert rows[-1]["rollout/logprob_abs_diff"] < 1e-4  # trainer and sampler agree on every token
    assert "model.safetensors" in {p.name for p in (latest_checkpoint(run) / "policy").iterdir()}
    assert f"path: {warm_tiny_dir}" in (run / "config.yaml").read_text()


def test_resume_continues_at_the_right_step_with_the_same_state(tmp_path, warm_tiny_dir):
    common = ["train.max_steps=4", "train.prompts_per_step=8", "train.eval_every=0", "checkpoint.every_steps=2",
              "checkpoint.keep_last=5", "optim.lr=1e-4", "train.samples_every=1"]
    _, straight = _run(tmp_path, "straight", common)

    # the same run, stopped after step 2 (as if killed), then resumed from its checkpoint
    _run(tmp_path, "resumed", [*common, "train.max_steps=2"])
    cfg = compose([*QUIET, *common, "resume=auto"])
    cfg.run_dir = str(tmp_path / "resumed")
    resumed = train_from_config(cfg)
    assert [h["step"] for h in resumed if "train/loss" in h] == [3, 4]

    a, b = (load_state(tmp_path / name / "checkpoints" / "step_4") for name in ("straight", "resumed"))
    assert a["sampler"] == b["sampler"]
    for sa, sb in zip(a["backend"]["optimizer"]["state"].values(), b["backend"]["optimizer"]["state"].values()):
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], atol=1e-7, rtol=0)
    wa, wb = (AutoModelForCausalLM.from_pretrained(tmp_path / n / "checkpoints" / "step_4" / "policy")
              for n in ("straight", "resumed"))
    for (name, pa), pb in zip(wa.named_parameters(), wb.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]  # continuous, nothing doubled
    losses = [h["train/loss"] for h in straight if "train/loss" in h][2:]
    assert [h["train/loss"] for h in resumed if "train/loss" in h] == pytest.approx(losses, abs=1e-6)


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, warm_tiny_dir):
    from grpo.config import ConfigError

    _run(tmp_path, "once", ["train.max_steps=1", "train.prompts_per_step=4", "train.eval_every=0"])
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        _run(tmp_path, "once", ["train.max_steps=1"])
