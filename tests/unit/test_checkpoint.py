"""Atomic checkpoints: the pointer moves last, partial writes are ignored, rotation keeps the newest."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.data.loading import PromptSampler
from grpo.training.checkpoint import latest_checkpoint, load_state, rng_state, save_checkpoint, set_rng_state


@pytest.fixture
def policy(tiny_random_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_random_dir), AutoTokenizer.from_pretrained(tiny_random_dir)


def test_save_load_roundtrip_and_rotation(tmp_path, policy):
    model, tok = policy
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, policy=model, tokenizer=tok, state={"x": torch.tensor([step])}, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_2", "step_3"]
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_3"
    state = load_state(latest)
    assert state["step"] == 3 and state["x"].item() == 3
    reloaded = AutoModelForCausalLM.from_pretrained(latest / "policy")
    for (n, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), n


def test_partial_checkpoint_is_ignored_with_a_warning(tmp_path, policy):
    model, tok = policy
    save_checkpoint(tmp_path, 1, policy=model, tokenizer=tok, state={})
    (tmp_path / "checkpoints" / ".tmp_step_2" / "policy").mkdir(parents=True)  # a write killed midway
    (tmp_path / "checkpoints" / "step_3").mkdir()  # renamed but no COMPLETE marker (never happens, but)
    with pytest.warns(UserWarning, match="tmp_step_2"):
        assert latest_checkpoint(tmp_path).name == "step_1"


def test_unreadable_state_is_a_clear_error(tmp_path, policy):
    model, tok = policy
    path = save_checkpoint(tmp_path, 1, policy=model, tokenizer=tok, state={})
    (path / "state.pt").write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match="state.pt is unreadable"):
        load_state(path)


def test_rng_states_roundtrip():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_sampler_resumes_mid_epoch_and_across_epochs():
    full = PromptSampler(5, seed=3)
    expected = full.next_indices(4) + full.next_indices(4) + full.next_indices(4)
    part = PromptSampler(5, seed=3)
    got = part.next_indices(4)
    resumed = PromptSampler(5, seed=3)
    resumed.load_state(part.state())
    got += resumed.next_indices(4) + resumed.next_indices(4)
    assert got == expected
    assert sorted(expected[:5]) == list(range(5))  # each epoch is a permutation


def test_sampler_resumes_from_a_checkpoint_taken_at_an_epoch_boundary():
    full = PromptSampler(4, seed=1)
    expected = full.next_indices(2) + full.next_indices(2) + full.next_indices(2) + full.next_indices(2)
    part = PromptSampler(4, seed=1)
    got = part.next_indices(2) + part.next_indices(2)  # exactly one epoch consumed
    assert part.state() == {"epoch": 0, "index": 4}
    resumed = PromptSampler(4, seed=1)
    resumed.load_state(part.state())
    got += resumed.next_indices(2) + resumed.next_indices(2)
    assert got == expected and expected[4:] != expected[:4]  # the second epoch is a new permutation
