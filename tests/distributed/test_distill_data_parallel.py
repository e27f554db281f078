"""Distillation (the per-token reverse KL through GRPO's update) and GKD (the chunked generalised JSD) on 2 ranks,
under ddp, DeepSpeed ZeRO-2 and ZeRO-3, started by the real launchers: one update on 2 ranks x B/2 rows gives the
loss, the metric and the gradient of 1 rank x B rows; each launch checks both losses. ZeRO-2 shards the gradients
and optimiser states in the backend's backward and step. Under ZeRO-3 the student's every parameter is partitioned
too (gathered layer by layer inside the engine's forward and its recomputed chunks) and the frozen teacher, loaded
as a run loads it, holds all of its own on each rank."""

from __future__ import annotations

import pytest
import torch

from grpo.builtin.tiny import save_tiny
from tests.distributed.test_distributed import (
    _release_deepspeed_shared_memory,  # noqa: F401 (autouse, this module's too)
    backends,
    on_two_ranks,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    """Another random tiny model with the same tokenizer: a teacher the student differs from."""
    return save_tiny(tmp_path_factory.mktemp("tiny_teacher"), seed=1)


@pytest.mark.parametrize("backend", backends("ddp", "deepspeed_zero2", "deepspeed_zero3"))
def test_distill_and_gkd_updates_on_two_ranks_equal_one_rank_with_every_row(tmp_path, one_rank, tiny_random_dir,
                                                                            tiny_teacher_dir, backend):
    args = ("--model", str(tiny_random_dir), "--teacher", str(tiny_teacher_dir))
    one = one_rank("distill_data_parallel_step.py", *args)
    two = on_two_ranks("distill_data_parallel_step.py", backend, tmp_path / "two.pt", *args)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for kind in ("distill", "gkd"):  # normalised by every rank's tokens: the whole batch's loss and gradient
        a, b = one[kind], two[kind]
        assert a["measure"] > 0.01, kind  # two different random models: a real divergence
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["measure"] - b["measure"]) < 1e-6, kind
        for name, g in a["grads"].items():
            # float32: the runs sum the same terms in another order
            torch.testing.assert_close(b["grads"][name], g, atol=2e-6, rtol=0, msg=f"{kind}: {name}")
        assert sum(int(g.abs().sum() > 0) for g in a["grads"].values()) > 10, kind  # a real gradient
        # ZeRO-3: every student parameter sharded at the update, none of the teacher's (DeepSpeed never saw it)
        student = len(a["grads"]) if backend == "deepspeed_zero3" else 0
        assert b["partitioned"] == {"student": student, "teacher": 0}, kind
