"""Recipes compose and build their model (reduced size, random weights, no download); the memory
plan's arithmetic against values worked out by hand; a plan that cannot fit is refused."""

from __future__ import annotations

import re

import pytest
import torch

from grpo.errors import ConfigError
from grpo.model.facts import MODEL_FACTS, facts_for, transformers_config
from grpo.model.memory import (
    ModelShape,
    activation_bytes,
    check_fits,
    critic_params,
    estimate,
    estimate_from_config,
    kv_cache_bytes,
    lora_trainable_params,
    model_shape,
    training_bytes_per_param,
)
from tests.conftest import CONFIGS, compose

RECIPES = sorted(p.stem for p in (CONFIGS / "experiment").glob("qwen2.5-*.yaml"))


def test_there_is_a_recipe_per_model_task_and_gpu_count():
    expected = {f"qwen2.5-{m}_{t}_{g}gpu" for m in ("0.5b", "1.5b", "7b") for t in ("gsm8k", "math") for g in (1, 8)}
    assert set(RECIPES) == expected | {"qwen2.5-7b_gsm8k_1gpu_lora"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_builds_its_model_and_fits_its_gpus(recipe):
    cfg = compose([f"experiment={recipe}"])
    facts = facts_for(cfg.model.path)
    assert facts is not None, f"{recipe}: model.path {cfg.model.path} names no known model"
    # the prompt template formats a row of the task's columns
    row = {cfg.task.prompt_column: "What is 1+1?"}
    assert "What is 1+1?" in cfg.task.prompt_template.format(**row)
    # the model of the recipe, shrunk: 2 layers, width 64, same vocabulary, random weights
    small = transformers_config(facts, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(small, dtype=getattr(torch, cfg.model.dtype))
    ids = torch.tensor([[0, 17, facts["vocab_size"] - 1]])
    assert model(input_ids=ids).logits.shape == (1, 3, facts["vocab_size"])
    # the full-size plan fits an 80 GB GPU at the recipe's GPU count
    gpus = int(re.search(r"_(\d+)gpu", recipe).group(1))
    plan = estimate_from_config(cfg, gpus, 80.0)
    check_fits(plan, 80.0)
    assert cfg.train.prompts_per_step % gpus == 0


def test_model_facts_give_the_published_parameter_counts():
    published = {"Qwen2.5-0.5B-Instruct": 494_032_768, "Qwen2.5-1.5B-Instruct": 1_543_714_304,
                 "Qwen2.5-7B-Instruct": 7_615_616_512}
    for name, facts in MODEL_FACTS.items():
        assert model_shape(transformers_config(facts)).num_params == published[name], name


def test_bytes_per_parameter_per_zero_stage():
    # Mixed precision, 4 ranks: 2 + 2 + 12 bytes, then divided by 4 stage by stage.
    mp = dict(mixed_precision=True)
    assert training_bytes_per_param(0, 4, **mp) == (2, 2, 12)
    assert training_bytes_per_param(1, 4, **mp) == (2, 2, 3)
    assert training_bytes_per_param(2, 4, **mp) == (2, 0.5, 3)
    assert training_bytes_per_param(3, 4, **mp) == (0.5, 0.5, 3)
    assert training_bytes_per_param(3, 4, **mp, offload_optimizer=True, offload_params=True) == (0, 0.5, 0)
    # float32: 4 + 4 + 8 (m, v; the weights are the master copy) ...
    assert training_bytes_per_param(0, 2, mixed_precision=False) == (4, 4, 8)
    # ... but ZeRO keeps an fp32 master partition anyway: (8 + 4) / 2 (measured, README)
    assert training_bytes_per_param(2, 2, mixed_precision=False) == (4, 2, 6)


def test_activation_and_kv_cache_bytes():
    shape = ModelShape(num_params=0, hidden_size=1000, num_layers=10, vocab_size=1, kv_dim=8)
    # no checkpointing: 10 layers * 34 * 1000 * 100 tokens = 34,000,000 bytes
    assert activation_bytes(shape, 100, gradient_checkpointing=False) == 34_000_000
    # checkpointing: 10 * 2 * 1000 * 100 (layer inputs) + 34 * 1000 * 100 (one layer) = 2,000,000 + 3,400,000
    assert activation_bytes(shape, 100, gradient_checkpointing=True) == 5_400_000
    # KV cache: 2 (K, V) * 10 layers * 8 * 2 bytes * 3 sequences * 5 tokens = 4,800 bytes
    assert kv_cache_bytes(shape, 3, 5) == 4_800


def test_estimate_adds_up_and_refuses_with_the_numbers():
    shape = ModelShape(num_params=1_000_000_000, hidden_size=1000, num_layers=10, vocab_size=1000, kv_dim=8)
    plan = estimate(shape, stage=3, world_size=4, mixed_precision=True, micro_batch_tokens=100,
                    gradient_checkpointing=False, rollout_engine="hf", rollout_sequences=3, max_new_tokens=5,
                    stage_name="deepspeed_zero3")
    # ZeRO-3 on 4 ranks: weights 0.5e9, grads 0.5e9, Adam 3e9 bytes; logits 3 * 1024 * 1000 * 4;
    # rollout: the gathered 2e9 bytes of weights + KV 2 * 10 * 8 * 2 * 3 * (512 + 5)
    assert (plan.weights, plan.gradients, plan.optimizer) == (5e8, 5e8, 3e9)
    assert plan.logits == 12_288_000
    assert plan.rollout == 2e9 + 2 * 10 * 8 * 2 * 3 * 517
    assert plan.total == 5e8 + 5e8 + 3e9 + 34_000_000 + 12_288_000 + plan.rollout
    assert "optimiser states" in plan.table() and "total" in plan.table()
    check_fits(plan, 6.0)  # ~5.6 GiB fits 6
    with pytest.raises(ConfigError, match=r"needs an estimated 5\.\d GiB per GPU but the device has 4\.0 GiB"):
        check_fits(plan, 4.0)


def test_the_groups_layout_adds_one_attention_mask_per_micro_batch():
    # Catches: the mask left out of the total or of the table, counted for padded/sequences or not for auto (the
    # default, resolved after the plan), counted per layer (x 10), or in 16-bit under float32.
    shape = ModelShape(num_params=1_000_000, hidden_size=1000, num_layers=10, vocab_size=1000, kv_dim=8)
    common = dict(stage=0, world_size=1, micro_batch_tokens=100, gradient_checkpointing=False, rollout_engine="hf",
                  rollout_sequences=3, max_new_tokens=5)
    padded = estimate(shape, mixed_precision=True, **common)
    assert padded.mask == 0 and "groups mask" not in padded.table()
    for packing in ("groups", "auto"):
        plan = estimate(shape, mixed_precision=True, packing=packing, **common)
        # one group filling the 100-token budget: a [1, 1, 100, 100] mask, 2 bytes a value in 16-bit
        assert plan.mask == 100 * 100 * 2 == 20_000 and plan.total == padded.total + 20_000
        assert "groups mask" in plan.table()
    assert estimate(shape, mixed_precision=True, packing="sequences", **common).mask == 0
    assert estimate(shape, mixed_precision=False, packing="groups", **common).mask == 100 * 100 * 4
    # the default config (auto) at its 16,384-token budget, in bfloat16: 16,384^2 x 2 bytes = 512 MiB
    assert estimate_from_config(compose(["experiment=qwen2.5-0.5b_gsm8k_1gpu"]), 1, 80.0).mask == 512 * 2**20
    assert estimate_from_config(compose(["experiment=qwen2.5-0.5b_gsm8k_1gpu", "backend.packing=padded"]), 1,
                                80.0).mask == 0


def test_lora_plan_counts_gradients_and_optimiser_of_the_adapters_only_and_no_reference():
    shape = ModelShape(num_params=1_000_000_000, hidden_size=1000, num_layers=10, vocab_size=1000, kv_dim=8)
    common = dict(stage=0, world_size=1, mixed_precision=True, micro_batch_tokens=100, gradient_checkpointing=False,
                  rollout_engine="hf", rollout_sequences=3, max_new_tokens=5)
    full = estimate(shape, **common, with_reference=True)
    lora = estimate(shape, **common, trainable_params=10_000_000)
    # weights 2 bytes x 1e9 either way, plus the 1e7 adapters' 2e7; gradients 2 and Adam 12 bytes x 1e7 trained only
    assert (lora.weights, lora.gradients, lora.optimizer) == (2e9 + 2e7, 2e7, 1.2e8)
    assert (full.gradients, full.optimizer, full.reference) == (2e9, 1.2e10, 2e9)
    assert "LoRA: 10,000,000 parameters trained" in lora.table()


def test_lora_parameter_count_matches_peft_and_the_7b_recipe_plan_fits_one_gpu():
    from grpo.builtin.tiny import build_tiny_model
    from grpo.config import LoraOptions
    from grpo.model.lora import add_adapters, trainable_parameters

    for targets, saved in (([], []), (["q_proj", "v_proj"], ["lm_head"])):
        model = build_tiny_model(100, seed=0)
        options = LoraOptions(r=8, target_modules=targets, modules_to_save=saved)
        counted = lora_trainable_params(model.config, targets, saved, 8)
        assert counted == trainable_parameters(add_adapters(model, options))[0], (targets, saved)
    # Qwen2.5-7B, r=64 on every projection, per layer: 64 x (q 3584+3584, k 3584+512, v 3584+512,
    # o 3584+3584, gate 3584+18944, up 3584+18944, down 18944+3584) = 64 x 90,112; 28 layers
    cfg = compose(["experiment=qwen2.5-7b_gsm8k_1gpu_lora", "algorithm.beta=0.04"])
    plan = estimate_from_config(cfg, 1, 80.0)
    assert plan.trainable == 28 * 64 * 90_112 == 161_480_704
    assert plan.reference == 0 and plan.optimizer == 12 * plan.trainable
    check_fits(plan, 80.0)


def test_grpo_train_refuses_a_plan_that_cannot_fit(tmp_path, tiny_random_dir):
    from grpo.training.run import build_run

    cfg = compose(["model=hf", f"model.path={tiny_random_dir}", "model.dtype=float32", f"run_dir={tmp_path / 'r'}",
                   "backend.gpu_memory_gb=0.001"])
    with pytest.raises(ConfigError, match="backend: the plan needs an estimated"):
        build_run(cfg)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_ppo_plan_counts_the_critic_at_the_policys_bytes_per_parameter(tmp_path):
    from transformers import AutoModelForTokenClassification

    from grpo.builtin.tiny import build_tiny_model

    for tied in (True, False):  # the critic's count equals the value model grpo.algorithms.ppo.load_critic builds
        model = build_tiny_model(100, seed=0)
        model.config.tie_word_embeddings = tied
        model.save_pretrained(tmp_path / str(tied))
        critic = AutoModelForTokenClassification.from_pretrained(tmp_path / str(tied), num_labels=1)
        assert critic_params(model.config) == sum(p.numel() for p in critic.parameters()), tied
    shape = ModelShape(num_params=1_000_000_000, hidden_size=1000, num_layers=10, vocab_size=1000, kv_dim=8)
    plan = estimate(shape, stage=2, world_size=4, mixed_precision=True, micro_batch_tokens=100,
                    gradient_checkpointing=False, rollout_engine="hf", rollout_sequences=3, max_new_tokens=5,
                    critic_params=900_000_000)
    # ZeRO-2 on 4 ranks: 2 + 2/4 + 12/4 = 5.5 bytes per critic parameter, added to the total
    assert plan.critic == 5.5 * 900_000_000 and "critic (PPO)" in plan.table()
    assert plan.total == pytest.approx(plan.weights + plan.gradients + plan.optimizer + plan.activations
                                       + plan.logits + plan.rollout + plan.critic)
    recipe = ["experiment=qwen2.5-1.5b_gsm8k_8gpu"]
    grpo = estimate_from_config(compose(recipe), 8, 80.0)
    ppo = estimate_from_config(compose([*recipe, "algorithm=ppo"]), 8, 80.0)
    config = transformers_config(facts_for(compose(recipe).model.path))
    per_param = (ppo.weights + ppo.gradients + ppo.optimizer) / model_shape(config).num_params
    assert grpo.critic == 0 and "critic" not in grpo.table()
    assert ppo.critic == pytest.approx(per_param * critic_params(config))


def test_server_mode_plans_no_engine_on_the_training_gpus():
    common = ["experiment=qwen2.5-7b_gsm8k_8gpu", "rollout=vllm", "rollout.gpu_memory_utilization=0.3"]
    colocated = estimate_from_config(compose(common), 4, 80.0)
    served = estimate_from_config(compose([*common, "rollout.mode=server", "rollout.server_urls=[http://a:8000]"]),
                                  4, 80.0)
    assert colocated.rollout == 0.3 * 80 * 2**30 and served.rollout == 0  # the engine: 30% of an 80 GiB GPU, or none
    assert served.total == colocated.total - colocated.rollout
