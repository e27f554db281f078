"""DPO: the loss against a hand-computed value, and TRL's DPOTrainer in our run layout."""

from __future__ import annotations

import json
import math

import pytest
import torch

from grpo.dpo import dpo_loss


def test_dpo_loss_by_hand():
    # beta 0.5; chosen: log pi = -1, log pi_ref = -2 (+1); rejected: -3 vs -2 (-1); margin = 1 - (-1) = 2.
    # loss = -log sigmoid(0.5 * 2) = log(1 + e^-1) = 0.31326168751822286
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([0.31326168751822286]), atol=1e-7, rtol=0)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    logp = torch.tensor([-1.3, -0.2])
    torch.testing.assert_close(dpo_loss(logp, logp + 1, logp, logp + 1, beta=0.1),
                               torch.full((2,), math.log(2)), atol=1e-7, rtol=0)


@pytest.mark.slow
def test_dpo_run_with_trl(tmp_path, warm_tiny_dir):
    from tests.conftest import compose

    from grpo.train import train_from_config

    cfg = compose(["algorithm=dpo", f"run_dir={tmp_path}", "algorithm.dpo.num_prompts=40", "train.eval_every=2",
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
