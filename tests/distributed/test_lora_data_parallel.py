"""LoRA data parallel, started by the real launchers: 2 ranks x B groups give the gradient of 1 rank x 2B over a
float or a 4-bit (QLoRA) base, and a LoRA run on 2 ranks keeps identical replicas, checkpoints the adapter (and
the merged policy on request) and resumes from DeepSpeed's shards. The single-process LoRA properties are in
tests/integration/test_lora.py.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from grpo.core.logprobs import sequence_logprobs
from tests.distributed.test_distributed import (  # noqa: F401 - the fixture frees DeepSpeed's shared memory
    DEEPSPEED,
    TRAIN_ARGS,
    _release_deepspeed_shared_memory,
    launch,
    launcher,
    metrics,
    on_two_ranks,
)
from tests.integration.test_lora import NEEDS_BNB, random_batch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def on_base(base: str, *names: str) -> list:
    """(backend, base) pytest params: DeepSpeed's backends need deepspeed, a 4-bit base bitsandbytes."""
    return [pytest.param(n, base, id=f"{n}-{base}", marks=[*([DEEPSPEED] if n.startswith("deepspeed") else []),
                                                            *([NEEDS_BNB] if base == "4bit" else [])])
            for n in names]



@pytest.mark.parametrize("backend,base", [
    *on_base("float", "ddp", "deepspeed_zero2", "deepspeed_zero3"),
    *on_base("4bit", "ddp", "deepspeed_zero3"),
])
def test_lora_on_two_ranks_with_b_groups_equals_one_rank_with_2b(tmp_path, one_rank, backend, base):
    args = ("--lora-r", "4", *(["--qlora"] if base == "4bit" else []))
    one = one_rank("data_parallel_step.py", *args)
    two = on_two_ranks("data_parallel_step.py", backend, tmp_path / "two.pt", *args)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert abs(one["loss"] - two["loss"]) < 1e-6
    assert abs(one["grad_norm"] - two["grad_norm"]) < 1e-5 * one["grad_norm"]
    assert one["frozen_moved"] == two["frozen_moved"] == 0.0  # the base weights never move
    assert set(one["grads"]) == set(two["grads"]) and all(".lora_" in n for n in one["grads"])
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, atol=2e-6, rtol=0, msg=name)
        assert g.abs().sum() > 0, name  # B is random: both A and B get a gradient


@pytest.mark.parametrize("backend,base", [*on_base("float", "ddp", "deepspeed_zero2", "deepspeed_zero3"),
                                          *on_base("4bit", "deepspeed_zero3")])
def test_lora_trains_on_two_ranks_with_identical_replicas(tmp_path, warm_tiny_dir, backend, base):
    run_dir = tmp_path / "run"
    # a 4-bit base: ZeRO-3 partitions its packed weights, gathers them to sample; no merged policy/ (refused)
    lora = ["model.lora.r=8", "algorithm.beta=0.04",
            "checkpoint.merge_lora=true" if base == "float" else "model.lora.qlora=true"]
    launch([*launcher(backend, 2), "--module", "grpo.train", f"run_dir={run_dir}", f"backend={backend}", *TRAIN_ARGS,
            *lora])
    steps = [r for r in metrics(run_dir) if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["dist/replica_weight_diff"] == 0.0, r
        assert r["rollout/logprob_abs_diff"] < 1e-5  # the sampler ran the adapted policy the trainer scores
    ckpt = run_dir / "checkpoints" / "step_3"
    adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    assert max(float(t.abs().max()) for k, t in adapter.items() if "lora_B" in k) > 0  # B left zero: it trained
    assert (ckpt / "policy").is_dir() == (base == "float")
    if base == "float":  # the adapter (gathered from the shards under ZeRO-3) and the merged policy/: one function
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(warm_tiny_dir), ckpt / "adapter").eval()
        merged = AutoModelForCausalLM.from_pretrained(ckpt / "policy").eval()
        ids, mask = random_batch()
        torch.testing.assert_close(sequence_logprobs(merged, ids, mask)[0], sequence_logprobs(peft, ids, mask)[0],
                                   atol=2e-5, rtol=0)
    if backend.startswith("deepspeed"):  # resume from DeepSpeed's shards and the adapter: one more step
        launch([*launcher(backend, 2), "--module", "grpo.train", f"run_dir={run_dir}", f"backend={backend}",
                *TRAIN_ARGS, *lora, "resume=auto", "train.max_steps=4"])
        rows = metrics(run_dir)
        assert [r["step"] for r in rows if r["step"] > 0] == [1, 2, 3, 4]
        assert rows[-1]["dist/replica_weight_diff"] == 0.0
