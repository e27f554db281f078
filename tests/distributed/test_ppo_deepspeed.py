"""PPO-RLHF data parallel under DeepSpeed ZeRO: the critic is its own engine, sharded and synced like the policy.

- one PPO update on 2 ranks x B groups equals 1 rank x 2B groups, for the policy and the critic, under
  ZeRO-2 and ZeRO-3 (as `test_distributed.py` checks it under ddp; the backend treats ZeRO-1 as ZeRO-2);
- `grpo-train algorithm=ppo` on 2 ranks under ZeRO-2 keeps the policy and critic replicas identical after
  every step, its checkpoint holds the critic's own DeepSpeed shards, and a run stopped after step 2 and
  resumed ends where the uninterrupted run does (weights of both models, and the metrics of step 3, which
  would differ if the critic's optimiser state had not come back).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.test_distributed import (  # noqa: F401 - the fixture frees DeepSpeed's /dev/shm buffers here too
    DEEPSPEED,
    ROOT,
    _release_deepspeed_shared_memory,
    assert_same_ppo_update,
    metrics,
    on_two_ranks,
    train,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow, DEEPSPEED]


@pytest.mark.parametrize("backend", ["deepspeed_zero2", "deepspeed_zero3"])
def test_ppo_under_zero_on_two_ranks_with_b_groups_equals_one_rank_with_2b(tmp_path, one_rank, tiny_random_dir,
                                                                           backend):
    one = one_rank("ppo_data_parallel_step.py", "--model", str(tiny_random_dir))
    two = on_two_ranks("ppo_data_parallel_step.py", backend, tmp_path / "two.pt", "--model", str(tiny_random_dir))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # Whitening, the value mean and the KL are over every rank's tokens; both losses are normalised by the
    # whole batch's counts and ZeRO's average over ranks is scaled back to a sum, so the critic engine's and
    # the policy engine's gradients are the one-rank ones (float32 summation order apart)
    assert_same_ppo_update(one["metrics"], one["grads"], two["metrics"], two["grads"])


def critic_weights(checkpoint: Path) -> dict:
    """The critic's weights in a ZeRO-2 checkpoint: DeepSpeed's module file holds them whole."""
    states = torch.load(checkpoint / "critic_deepspeed" / "zero" / "mp_rank_00_model_states.pt", weights_only=True)
    return states["module"]


def test_ppo_under_zero2_keeps_identical_replicas_and_resumes_as_if_never_interrupted(tmp_path, warm_tiny_dir):
    ppo = ["algorithm=ppo", "seed=5"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train("deepspeed_zero2", straight, *ppo)  # 3 steps, checkpoint after the last
    steps = [r for r in metrics(straight) if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:  # both ranks hold bit-identical policies and critics after every step
        assert r["dist/replica_weight_diff"] == 0.0 and r["dist/critic_replica_weight_diff"] == 0.0, r
        assert r["train/value_loss"] > 0
    assert steps[0]["train/value_mean"] == 0.0 and steps[1]["train/value_mean"] != 0.0  # the critic learned

    train("deepspeed_zero2", resumed, *ppo, "train.max_steps=2")  # stopped after step 2 (its checkpoint)
    train("deepspeed_zero2", resumed, *ppo, "resume=auto")  # step 3 from step 2's shards
    assert [r["step"] for r in metrics(resumed)] == [0, 1, 2, 3]
    a, b = (run / "checkpoints" / "step_3" for run in (straight, resumed))
    state = torch.load(b / "state.pt", weights_only=True)
    assert "critic_backend" in state and "critic" not in state  # the critic lives in its shards
    assert (b / "critic_deepspeed" / "zero").is_dir()
    wa, wb = (load_file(c / "policy" / "model.safetensors") for c in (a, b))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-6, rtol=0, msg=name)
    ca, cb = critic_weights(a), critic_weights(b)
    assert ca.keys() == cb.keys() and len(ca) > 10
    for name in ca:
        torch.testing.assert_close(cb[name], ca[name], atol=1e-6, rtol=0, msg=name)
    last = [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in ((run / "metrics.jsonl").read_text().splitlines()[-1] for run in (straight, resumed))]
    assert last[1] == pytest.approx(last[0], abs=1e-6)
