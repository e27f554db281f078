"""`python -m scripts.bench.step_floor` on the tiny built-in model with adapters: every phase and its floor are
measured and reported, the floor counts the work the batch needs (no timing is asserted)."""

from __future__ import annotations

import pytest
import torch

from scripts.bench.step_floor import lora_parts, main

SMALL = ["--experiment", "", "--repeats", "1", "--clock", "cpu", "--override", "model.lora.r=4",
         "--override", "model.lora.alpha=8",
         "--override", "rollout.max_new_tokens=4", "--override", "train.prompts_per_step=2",
         "--override", "algorithm.group_size=2", "--override", "backend.packing=groups"]


@pytest.mark.slow
def test_every_phase_and_its_floor_are_reported(capsys):
    results = main(SMALL)
    phases = ("generation", "old/ref log-probs", "update/forward", "update/backward", "update/optimiser")
    floors = ("generation floor", "old/ref log-probs floor", "update floor/forward", "update floor/backward",
              "update floor/optimiser")
    assert all(results[k] > 0 for k in phases + floors), results
    # the update's parts add up to it; each decode step's floor is the larger of its two bounds
    assert results["update"] == pytest.approx(sum(results[f"update/{p}"] for p in ("forward", "backward", "optimiser")))
    assert results["generation floor"] >= max(results["generation floor/matmul"], results["generation floor/bandwidth"])
    out = capsys.readouterr().out
    for row in ("| generation |", "| update: forward |", "| update: backward |", "| update: optimiser step |",
                "| step (generation + update) |", "| old/ref log-probs (not in the recipe's step) |"):
        assert row in out


def test_lora_parts_names_the_base_weight_and_both_adapters():
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(6, 5, bias=False)

        def forward(self, x):
            return self.proj(x)

    plain = One()
    assert lora_parts(plain.proj) == (plain.proj.weight, None, None)
    adapted = get_peft_model(One(), LoraConfig(r=2, target_modules=["proj"]))
    w, a, b = lora_parts(adapted.base_model.model.proj)
    # W [out 5, in 6], A [r 2, in 6], B [out 5, r 2]: the shapes the floor's matmuls take
    assert (w.shape, a.shape, b.shape) == ((5, 6), (2, 6), (5, 2))
