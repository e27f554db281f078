"""Train/inference mismatch: truncated importance sampling (TIS) and the sampler-vs-trainer metrics,
by hand. (The real vLLM engine's mismatch is measured in tests/vllm/test_vllm.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo.config import AlgorithmConfig
from grpo.core.batch import layout_batch
from grpo.core.losses import truncated_importance_weights
from grpo.training.update import score_logprobs, update_policy

LN2 = math.log(2.0)


def test_tis_weights_hand_values():
    # trainer/sampler probability ratios 0.5, 2, 4, 8 with cap 3 -> 0.5, 2, 3, 3; a masked position -> 1
    trainer = torch.tensor([[math.log(0.5), math.log(2.0), math.log(4.0), math.log(8.0), -float("inf")]])
    sampler = torch.zeros(1, 5)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    w = truncated_importance_weights(trainer, sampler, mask, cap=3.0)
    torch.testing.assert_close(w, torch.tensor([[0.5, 2.0, 3.0, 3.0, 1.0]]), atol=1e-6, rtol=0)
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(trainer, sampler, mask, cap=0.0)


def _one_update(tiny_random_dir, *, sampler_shift: float, tis_cap: float, **algo) -> dict:
    """One on-policy GRPO update where the sampler's log-probs are the trainer's minus `sampler_shift`."""
    from grpo.backends.torch_backend import TorchBackend

    model = AutoModelForCausalLM.from_pretrained(tiny_random_dir, dtype=torch.float32)
    batch = layout_batch([[10, 11, 12]], [[20, 21, 1], [30, 1]], group_size=2, pad_id=0)
    batch.advantages = torch.tensor([1.0, -0.5])
    trainer = score_logprobs(model, batch, temperature=1.0, micro_batch_tokens=1000)  # [2, T-1]
    batch.sampler_logprobs = (trainer - sampler_shift) * batch.completion_mask  # 0 on padding, as the layout has it
    return update_policy(TorchBackend(model, lr=1e-3), batch, AlgorithmConfig(group_size=2, tis_cap=tis_cap, **algo),
                         temperature=1.0, micro_batch_tokens=1000, max_new_tokens=8)


@pytest.mark.parametrize("shift, cap, weight", [
    (LN2, 1.5, 1.5),  # trainer/sampler = 2, capped at 1.5
    (-LN2, 1.5, 0.5),  # trainer/sampler = 0.5, under the cap
    (LN2, 0.0, 1.0),  # TIS off
])
def test_tis_scales_the_on_policy_loss_by_the_capped_ratio(tiny_random_dir, shift, cap, weight):
    # On policy the ratio is 1, so each token's loss is -A: tokens of A=1 (3 of them) and A=-0.5 (2),
    # token mean = (3 * -1 + 2 * 0.5) / 5 = -0.4; TIS multiplies every token by the same weight.
    out = _one_update(tiny_random_dir, sampler_shift=shift, tis_cap=cap)
    assert out["train/loss"] == pytest.approx(-0.4 * weight, abs=1e-6)
    # |trainer - sampler| = ln 2 on every token; KL(sampler || trainer) by k3 with d = trainer - sampler:
    # e^d - d - 1 = 2 - ln 2 - 1 = 0.30685 for d = ln 2, and 0.5 + ln 2 - 1 = 0.19315 for d = -ln 2
    assert out["rollout/logprob_abs_diff"] == pytest.approx(LN2, abs=1e-6)
    d = shift
    assert out["rollout/sampler_kl"] == pytest.approx(math.exp(d) - d - 1, abs=1e-6)


@pytest.mark.parametrize("shift, algo, loss, weight_mean, masked_frac", [
    # sequence TIS, cap 10: trainer/sampler = 2 per token; sequence 0 (3 tokens, A=1) weight 2^3 = 8, sequence 1
    # (2 tokens, A=-0.5) weight 2^2 = 4: loss (3 * -1 * 8 + 2 * 0.5 * 4) / 5 = -4, mean weight (3*8 + 2*4) / 5 = 6.4
    (LN2, dict(tis_cap=10.0, tis_level="sequence"), -4.0, 6.4, 0.0),
    # token MIS [0, 1.5]: every ratio is 2: every token dropped, loss 0
    (LN2, dict(mis_high=1.5), 0.0, 0.0, 1.0),
    # token MIS [0.4, 1.5]: ratio 0.5 kept: the on-policy loss -0.4, weight 1
    (-LN2, dict(mis_low=0.4, mis_high=1.5), -0.4, 1.0, 0.0),
    # sequence MIS [0.2, 3]: sequence 0's 0.5^3 = 0.125 dropped, sequence 1's 0.25 kept: (2 * 0.5) / 5 = 0.2
    (-LN2, dict(mis_low=0.2, mis_high=3.0, tis_level="sequence"), 0.2, 0.4, 0.6),
])
def test_sequence_tis_and_mis_through_the_update(tiny_random_dir, shift, algo, loss, weight_mean, masked_frac):
    out = _one_update(tiny_random_dir, sampler_shift=shift, tis_cap=algo.pop("tis_cap", 0.0), **algo)
    assert out["train/loss"] == pytest.approx(loss, abs=1e-5)
    assert out["rollout/is_weight_mean"] == pytest.approx(weight_mean, abs=1e-5)
    assert out["rollout/mis_masked_frac"] == pytest.approx(masked_frac, abs=1e-6)


def test_tis_needs_the_samplers_logprobs(tiny_random_dir):
    from grpo.backends.torch_backend import TorchBackend

    model = AutoModelForCausalLM.from_pretrained(tiny_random_dir, dtype=torch.float32)
    batch = layout_batch([[10, 11]], [[20, 1], [30, 1]], group_size=2, pad_id=0)
    batch.advantages = torch.tensor([1.0, -1.0])
    with pytest.raises(ValueError, match="algorithm.tis_cap"):
        update_policy(TorchBackend(model, lr=1e-3), batch, AlgorithmConfig(group_size=2, tis_cap=2.0),
                      temperature=1.0, micro_batch_tokens=1000, max_new_tokens=8)


def test_rollout_vllm_config_composes_without_vllm_installed():
    from grpo.errors import ConfigError
    from grpo.training.run import engine_options
    from tests.conftest import compose

    cfg = compose(["rollout=vllm", "model=hf", "model.path=/models/x", "rollout.kv_cache_gb=0.5"])
    options = engine_options(cfg)
    assert cfg.rollout.engine == "vllm" and options["model_path"] == "/models/x" and options["kv_cache_gb"] == 0.5
    assert "model_path" not in engine_options(compose([]))  # the hf engine gets only the sampling settings
    with pytest.raises(ConfigError, match="rollout.tensor_parallel_size"):
        compose(["rollout=vllm", "rollout.tensor_parallel_size=0"])
    with pytest.raises(ConfigError, match="rollout.gpu_memory_utilization"):
        compose(["rollout=vllm", "rollout.gpu_memory_utilization=1.5"])
