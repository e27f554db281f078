"""DPO (offline and online), RFT and SFT on 2 ranks, under ddp and DeepSpeed ZeRO-1, 2 and 3, started by the
real launchers. ZeRO-1 runs SFT only: the backend treats stages 1 and 2 alike (only stage 3 gathers and
partitions parameters), so ZeRO-2 covers the same code of ours for the others:

- one DPO update on 2 ranks x B/2 pairs gives the gradient of 1 rank x B pairs (the online update with given
  reference log-probs, and a step of the offline loop with its shuffled batch and its reference), and one NLL
  update (RFT's and SFT's) on 2 ranks x B/2 rows that of 1 rank x B rows;
- `grpo-train algorithm=dpo` trains on 2 ranks with bit-identical replicas after every step, and so do online
  DPO, RFT and SFT under ddp and DeepSpeed (each loop under one ZeRO stage).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.test_distributed import (
    DEEPSPEED,
    _release_deepspeed_shared_memory,  # noqa: F401 (autouse, this module's too)
    backends,
    metrics,
    on_two_ranks,
    train,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("backend", backends("ddp", "deepspeed_zero2", "deepspeed_zero3"))
def test_dpo_and_nll_updates_on_two_ranks_equal_one_rank_with_every_pair_or_row(tmp_path, one_rank, tiny_random_dir,
                                                                                 backend):
    args = ("--model", str(tiny_random_dir), "--kinds", "dpo,offline_dpo,nll")
    one = one_rank("pairs_data_parallel_step.py", *args)
    two = on_two_ranks("pairs_data_parallel_step.py", backend, tmp_path / "two.pt", *args)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # the offline step starts at the reference: every margin 0 (to float32 rounding: the reference is scored
    # in other micro-batches), the loss log 2, yet a gradient (-beta/2 x dh)
    assert abs(one["offline_dpo"]["margin"]) < 1e-5 and abs(one["offline_dpo"]["loss"] - 0.693147) < 1e-5
    for kind in ("dpo", "offline_dpo", "nll"):  # normalised by every rank's pairs / tokens: the mean's gradient
        a, b = one[kind], two[kind]
        assert abs(a["loss"] - b["loss"]) < 1e-6, kind
        if kind != "nll":
            assert abs(a["margin"] - b["margin"]) < 1e-6, kind
        for name, g in a["grads"].items():
            # float32: the runs sum the same terms in another order (gradients here are <= ~0.1)
            torch.testing.assert_close(b["grads"][name], g, atol=2e-6, rtol=0, msg=f"{kind}: {name}")
        assert sum(int(g.abs().sum() > 0) for g in a["grads"].values()) > 10, kind  # a real gradient


@pytest.mark.parametrize("backend", backends("ddp", "deepspeed_zero2", "deepspeed_zero3"))
def test_offline_dpo_trains_on_two_ranks_with_identical_replicas(tmp_path, warm_tiny_dir, backend):
    run_dir = tmp_path / "run"
    # 40 problems x 8 samples give about 25 pairs: 3 steps of 8 pairs, 4 per rank
    train(backend, run_dir, "algorithm=dpo", "algorithm.dpo.num_prompts=40", "algorithm.dpo.batch_size=8",
          "algorithm.dpo.epochs=0.9", "checkpoint.every_steps=0", "train.samples_every=1")
    rows = metrics(run_dir)
    pairs = rows[0]["dpo/pairs"]
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, -(-9 * pairs // 80) + 1))  # ceil(0.9 x pairs / 8)
    for r in steps:
        assert r["dist/replica_weight_diff"] == 0.0 and r["optim/grad_norm"] > 0, r
    assert steps[0]["train/loss"] == pytest.approx(0.693147, abs=1e-6)  # the policy starts at the reference
    assert steps[-1]["train/dpo_margin"] != 0.0 and "eval/accuracy" in steps[-1]
    assert (run_dir / "checkpoints" / f"step_{len(steps)}").is_dir()


@pytest.mark.parametrize("algorithm, backend", [
    *((a, "ddp") for a in ("online_dpo", "rft", "sft")),
    *(pytest.param(a, b, marks=DEEPSPEED) for a, b in (("online_dpo", "deepspeed_zero3"), ("rft", "deepspeed_zero2"),
                                                       ("sft", "deepspeed_zero1")))])
def test_online_dpo_rft_and_sft_train_on_two_ranks_with_identical_replicas(tmp_path, warm_tiny_dir, algorithm,
                                                                           backend):
    run_dir = tmp_path / "run"
    train(backend, run_dir, f"algorithm={algorithm}", "train.max_steps=3", "train.prompts_per_step=8",
          "checkpoint.every_steps=0")
    steps = [r for r in metrics(run_dir) if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    updated = [r for r in steps if "optim/grad_norm" in r]  # a step may find no pair or no right answer
    assert updated, steps
    for r in updated:
        assert r["dist/replica_weight_diff"] == 0.0 and r["optim/grad_norm"] > 0, r
    assert (run_dir / "checkpoints" / "step_3").is_dir()
