"""QLoRA (`model.lora.qlora=true`, grpo/model/lora.py): LoRA adapters over a base loaded in 4-bit NF4.

- the base is really 4-bit: every projection a bitsandbytes `Linear4bit` holding packed uint8 weights,
  NF4 in blocks of 64 with double-quantised scales; embeddings, norms and output head stay float; only
  the adapters train, as many as over the float base;
- the reference (adapters off) is the 4-bit base: its log-probs equal a 4-bit model's without adapters
  within 1e-6, and differ from the float model's (the quantisation is real);
- an optimiser step after a sampling forward moves every adapter and no 4-bit byte;
- a short GRPO run through the real loop: finite loss and gradient, the sampler on the trainer's arithmetic,
  the adapters saved alone;
- the memory plan: NF4's bytes per weight against bitsandbytes' own tensors, a hand-worked plan, the
  7B recipe's weights under QLoRA against LoRA's, and scripts.bench.qlora_memory's measure against the plan.
Resume exactness and the 2-rank invariance over a 4-bit base are in tests/integration/test_lora.py (parametrised there);
the refusals (vLLM, checkpoint.merge_lora) in its refusal table.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from grpo.backends import build_backend
from grpo.config import LoraOptions
from grpo.core.logprobs import sequence_logprobs
from grpo.errors import ConfigError
from grpo.model.loading import load_train_policy
from grpo.model.lora import AdapterDisabled, add_adapters, prepare_quantized, quantization_config, trainable_parameters
from grpo.model.memory import NF4_BYTES, GiB, ModelShape, estimate, estimate_from_config, quantized_params
from scripts.bench.qlora_memory import main as bench_qlora_memory
from tests.conftest import compose
from tests.integration.test_lora import HAS_BNB, NEEDS_BNB, PROJECTIONS, _train, perturb_adapters, random_batch

if HAS_BNB:
    from bitsandbytes.nn import Linear4bit

TINY_LAYERS = 4


def quantized_policy(model_dir, **lora):
    """The policy grpo-train builds with model.lora.qlora=true: the 4-bit base, prepared, fresh adapters."""
    options = [f"model.lora.{k}={v}" for k, v in {"r": 4, **lora}.items()]
    cfg = compose(["model=hf", f"model.path={model_dir}", "model.dtype=float32", "model.lora.qlora=true", *options])
    policy, _ = load_train_policy(cfg, checkpoint=None)
    return policy


def quantized_base(model_dir):
    """The same 4-bit base without adapters, prepared alike (so that it runs the same kernels)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization_config(torch.float32))
    return prepare_quantized(model, gradient_checkpointing=False).eval()


@NEEDS_BNB
def test_base_is_4bit_nf4_and_only_the_adapters_train(tiny_random_dir):
    policy = quantized_policy(tiny_random_dir)
    layers = {n: m for n, m in policy.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == TINY_LAYERS * len(PROJECTIONS)  # 4 layers x 7 projections; the head stays float
    assert {n.rsplit(".", 2)[-2] for n in layers} == PROJECTIONS  # peft's wrapper.base_layer
    for name, m in layers.items():
        state = m.weight.quant_state
        assert m.weight.dtype == torch.uint8, name
        assert m.weight.numel() == m.in_features * m.out_features // 2, name  # two 4-bit weights per byte
        assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, True), name
    floats = {n for n, p in policy.named_parameters() if p.dtype == torch.float32}
    assert any("embed_tokens" in n for n in floats) and any("norm" in n for n in floats)
    assert not isinstance(policy.get_output_embeddings(), Linear4bit)  # the head (tied here) stays float
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # as many adapters as over the float base: r x (in + out) per projection
    float_policy = add_adapters(AutoModelForCausalLM.from_pretrained(tiny_random_dir), LoraOptions(r=4))
    assert trainable_parameters(policy)[0] == trainable_parameters(float_policy)[0]


@NEEDS_BNB
def test_reference_is_the_4bit_base_with_the_adapters_off(tiny_random_dir):
    policy = quantized_policy(tiny_random_dir)
    perturb_adapters(policy)
    policy.train()
    ids, mask = random_batch()
    expected, _ = sequence_logprobs(quantized_base(tiny_random_dir), ids, mask)  # [B, T-1]
    reference, _ = AdapterDisabled(policy, policy)(ids, mask)
    assert not reference.requires_grad and policy.training
    torch.testing.assert_close(reference, expected, atol=1e-6, rtol=0)
    full, _ = sequence_logprobs(AutoModelForCausalLM.from_pretrained(tiny_random_dir).eval(), ids, mask)
    assert (expected - full).abs().max() > 1e-3  # NF4 rounding: the 4-bit base is not the float model
    policy.eval()
    adapted, _ = sequence_logprobs(policy, ids, mask)
    assert (adapted - expected).abs().max() > 0.05  # the adapters are back on after the reference


@NEEDS_BNB
def test_a_step_after_sampling_moves_every_adapter_and_no_4bit_byte(tiny_random_dir):
    policy = quantized_policy(tiny_random_dir)
    perturb_adapters(policy)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    backend = build_backend("torch", policy=policy, lr=1e-2)
    ids, mask = random_batch()
    policy.eval()
    with torch.no_grad():  # the sampler's forward: on an AVX512-BF16 CPU, bitsandbytes would repack here
        sampled, _ = sequence_logprobs(policy, ids, mask)
    policy.train()
    logp, _ = sequence_logprobs(policy, ids, mask)  # [B, T-1]
    torch.testing.assert_close(logp.detach(), sampled, atol=1e-6, rtol=0)  # one arithmetic for both
    backend.backward(-logp.sum())
    out = backend.step()
    assert math.isfinite(out["grad_norm"]) and out["grad_norm"] > 0
    for name, p in policy.named_parameters():
        assert (not torch.equal(p, before[name])) == (".lora_" in name), name  # uint8 bytes compared exactly
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in policy.modules() if isinstance(m, Linear4bit))


@NEEDS_BNB
@pytest.mark.slow
def test_a_qlora_grpo_run_trains_the_adapters_through_the_loop(tmp_path, warm_tiny_dir):
    history = _train(tmp_path, "run", "model.lora.qlora=true", "train.max_steps=2", "train.prompts_per_step=4",
                     "task.arithmetic.num_eval=8")
    steps = [h for h in history if "train/loss" in h]
    assert [h["step"] for h in steps] == [1, 2]
    for h in steps:
        assert math.isfinite(h["train/loss"]) and math.isfinite(h["optim/grad_norm"]) and h["optim/grad_norm"] > 0
        assert h["rollout/logprob_abs_diff"] < 1e-5  # the hf sampler ran the 4-bit adapted policy the trainer scores
    ckpt = tmp_path / "run" / "checkpoints" / "step_2"
    adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    assert all("lora_" in k for k in adapter) and not (ckpt / "policy").exists()  # the adapters alone
    assert max(float(t.abs().max()) for k, t in adapter.items() if "lora_B" in k) > 0  # B left zero: it trained


def test_a_missing_bitsandbytes_is_named_before_any_loading(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"model\.lora\.qlora: .*bitsandbytes.*not installed"):
        quantization_config(torch.float32)


# --- the memory plan ---


@NEEDS_BNB
def test_nf4_bytes_per_weight_are_bitsandbytes_own(tiny_random_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_random_dir,
                                                 quantization_config=quantization_config(torch.float32))
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    weights = sum(m.in_features * m.out_features for m in layers)
    # packed weights (uint8), the blocks' absmax (uint8 after double quantisation), the absmax's float32 scales;
    # every tiny layer holds a multiple of 64 x 256 weights, so the per-weight figure is exact here
    held = sum(m.weight.numel() + m.weight.quant_state.absmax.numel() * m.weight.quant_state.absmax.element_size()
               + m.weight.quant_state.state2.absmax.numel() * 4 for m in layers)
    assert held == NF4_BYTES * weights
    assert quantized_params(model.config) == weights


def test_qlora_plan_holds_the_linear_weights_in_4bit_and_the_rest_in_float32():
    shape = ModelShape(num_params=1_000_000_000, hidden_size=1000, num_layers=10, vocab_size=1000, kv_dim=8)
    common = dict(stage=0, world_size=1, mixed_precision=True, micro_batch_tokens=100, gradient_checkpointing=False,
                  rollout_engine="hf", rollout_sequences=3, max_new_tokens=5, trainable_params=10_000_000)
    lora = estimate(shape, **common)
    qlora = estimate(shape, **common, quantized_params=900_000_000)
    # 9e8 weights x (0.5 + 1/64 + 4/16384 = 0.515869140625) = 464,282,226.5625 bytes, the 1e8 others in
    # float32 (4e8), the 1e7 adapters at 2 bytes (2e7); gradients and Adam as LoRA's
    assert NF4_BYTES == 0.515869140625
    assert qlora.weights == 464_282_226.5625 + 4e8 + 2e7
    assert lora.weights == 2e9 + 2e7
    assert (qlora.gradients, qlora.optimizer, qlora.reference) == (lora.gradients, lora.optimizer, 0)
    assert "QLoRA: 10,000,000 parameters trained over 900,000,000 in 4-bit" in qlora.table()
    zero3 = estimate(shape, **{**common, "stage": 3, "world_size": 4}, quantized_params=900_000_000)
    assert zero3.weights == (464_282_226.5625 + 4e8) / 4 + 2e7 / 4  # partitioned like any weight


def test_qwen_7b_recipe_plans_less_under_qlora_than_lora():
    lora = estimate_from_config(compose(["experiment=qwen2.5-7b_gsm8k_1gpu_lora"]), 1, 80.0)
    qlora = estimate_from_config(compose(["experiment=qwen2.5-7b_gsm8k_1gpu_lora", "model.lora.qlora=true"]), 1, 80.0)
    # per layer 3584 x (q 3584 + k 512 + v 512 + o 3584) + 3 x 3584 x 18944 (gate, up, down) = 233,046,016; x 28
    assert qlora.quantized == 28 * 233_046_016 == 6_525_288_448
    # 6,525,288,448 x 0.515869140625 + (7,615,616,512 - 6,525,288,448) x 4 (float32) + 161,480,704 adapters x 2
    expected = 6_525_288_448 * 0.515869140625 + 1_090_328_064 * 4 + 161_480_704 * 2
    assert qlora.weights == expected and round(expected / GiB, 2) == 7.50
    assert round(lora.weights / GiB, 2) == 14.49
    assert qlora.total < lora.total and lora.total - qlora.total == lora.weights - qlora.weights


@NEEDS_BNB
def test_bench_measures_what_the_plan_says(capsys):
    bench_qlora_memory(["--lora-r", "4"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "LoRA" in line}
    (lora_held, lora_plan, lora_trained, _), (q_held, q_plan, q_trained, _) = rows["LoRA"], rows["QLoRA"]
    assert lora_held == lora_plan and lora_trained == q_trained  # float32: 4 bytes a weight, exactly
    assert abs(float(q_held) - float(q_plan)) < 0.05  # MiB: NF4's code books (16 + 256 floats a layer) unplanned
    assert float(q_held) < float(lora_held) / 5
