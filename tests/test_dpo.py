"""DPO: TRL's DPOTrainer in our run layout; its first loss against the hand value log 2."""

from __future__ import annotations

import json
import math

import pytest


@pytest.mark.slow
def test_dpo_run_with_trl(tmp_path, warm_tiny_dir):
    from grpo.run import train_from_config
    from tests.conftest import compose

    # 40 prompts x 8 samples: a pair per prompt whose samples are right and wrong (the warm model's
    # overflowing sums, about half); batches of 8 pairs make several optimiser steps of them
    cfg = compose(["algorithm=dpo", f"run_dir={tmp_path}", "algorithm.dpo.num_prompts=40", "train.eval_every=2",
                   "algorithm.dpo.batch_size=8",
                   "task.arithmetic.num_eval=20", "task.arithmetic.num_ood=10", "tracking.progress_bar=false",
                   "tracking.plot=false", "threads=1", "optim.lr=1e-3"])
    train_from_config(cfg)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and lines[0]["dpo/generated_samples"] == 40 * 8 and lines[0]["dpo/pairs"] > 0
    # The first step's loss is TRL's, with the policy still equal to its reference: exactly log 2 (hand value).
    assert abs(lines[1]["train/loss"] - math.log(2)) < 1e-5
    assert lines[-1]["train/dpo_margin"] != 0.0  # the policy moved away from the reference
    assert "eval/ood_accuracy" in lines[-1]
    assert (tmp_path / "checkpoints" / "latest").exists()
