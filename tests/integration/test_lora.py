"""LoRA adapters on the policy (`model.lora.r > 0`, grpo/model/lora.py).

- the adapted policy starts as the base model, and only the adapters are trainable and stepped;
- the reference (adapters off) is the base model exactly, with no gradient and no dropout, whatever the
  policy's adapters and mode;
- checkpoints hold the adapters in peft's format (`PeftModel.from_pretrained` reads them), and `policy/`
  is the merged model when asked, with the peft model's logits;
- a LoRA run stopped and resumed ends with the adapters of an uninterrupted one, over a float or a 4-bit
  (QLoRA) base; grpo-eval reads an adapter;
- data parallel (2 ranks x B groups give the gradient of 1 rank x 2B; replicas stay identical): in
  tests/distributed/test_lora_data_parallel.py;
- the combinations not built yet (vLLM server mode, adapter sync with modules_to_save; with QLoRA the vLLM
  engine and merged checkpoints) are refused naming the field.
QLoRA's own properties (the 4-bit base, its reference) are in tests/integration/test_qlora.py.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from grpo.backends import build_backend
from grpo.builtin.tiny import build_char_tokenizer
from grpo.cli import train_from_config
from grpo.config import LoraOptions
from grpo.core.logprobs import sequence_logprobs
from grpo.errors import ConfigError
from grpo.model.lora import AdapterDisabled, add_adapters, engine_weights, is_adapter_dir, merged_copy
from grpo.training.checkpoint import save_best, save_checkpoint
from grpo.training.run import evaluate_from_config
from tests.conftest import THREADS, compose, requires

try:
    import bitsandbytes  # noqa: F401 - model.lora.qlora's 4-bit base
    HAS_BNB = True
except ImportError:
    HAS_BNB = False
NEEDS_BNB = requires(HAS_BNB, "bitsandbytes (model.lora.qlora) is not installed")
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def random_batch(seed: int = 0, rows: int = 3, width: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (rows, width), generator=g)  # [B, T]
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # one left-padded row
    return ids, mask


def perturb_adapters(model: torch.nn.Module, scale: float = 0.2) -> None:
    """Give every adapter a nonzero B, so the adapted model differs from its base."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def adapted(model_dir, **options) -> PeftModel:
    return add_adapters(AutoModelForCausalLM.from_pretrained(model_dir), LoraOptions(**{"r": 4, **options}))


# --- the adapted policy and its reference ---------------------------------------------------------------


def test_adapters_start_as_the_base_model_and_cover_every_projection(tiny_random_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_random_dir)
    policy = adapted(tiny_random_dir)
    ids, mask = random_batch()
    torch.testing.assert_close(sequence_logprobs(policy, ids, mask)[0], sequence_logprobs(base, ids, mask)[0],
                               atol=0, rtol=0)  # B = 0: the update B A x is exactly zero
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    layers = base.config.num_hidden_layers
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable
    adapted_modules = {n.split(".lora_")[0] for n in trainable}
    assert len(adapted_modules) == layers * len(PROJECTIONS)  # 4 layers x 7 projections, nothing else
    assert {m.rsplit(".", 1)[-1] for m in adapted_modules} == PROJECTIONS
    # r x (in + out) per projection: q, o: 128+128; k, v: 128+128 (2 heads x 64); gate, up, down: 128+512
    h, ff = base.config.hidden_size, base.config.intermediate_size
    kv = base.config.num_key_value_heads * (h // base.config.num_attention_heads)
    per_layer = 4 * (2 * (h + h) + 2 * (h + kv) + 3 * (h + ff))
    assert sum(p.numel() for p in policy.parameters() if p.requires_grad) == layers * per_layer


def test_adapters_are_drawn_from_their_seed_not_the_callers_streams(tiny_random_dir):
    # under data parallel each rank's streams differ (seed + rank); the ranks' adapters must not
    draws = []
    for stream in (1, 2):
        torch.manual_seed(stream)
        policy = add_adapters(AutoModelForCausalLM.from_pretrained(tiny_random_dir), LoraOptions(r=4), seed=7)
        draws.append({n: p for n, p in policy.named_parameters() if "lora_A" in n})
        after = torch.rand(1)
        torch.manual_seed(stream)
        assert torch.equal(after, torch.rand(1))  # the caller's stream is left where it was
    assert all(torch.equal(draws[0][n], draws[1][n]) for n in draws[0])


def test_modules_to_save_are_trained_in_full(tiny_random_dir):
    policy = adapted(tiny_random_dir, modules_to_save=["lm_head"])
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save" in n for n in trainable), sorted(trainable)[-3:]


def test_unknown_target_module_names_the_field(tiny_random_dir):
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        adapted(tiny_random_dir, target_modules=["no_such_proj"])


def test_reference_is_the_base_model_without_gradient_or_dropout(tiny_random_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_random_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_random_dir, attention_dropout=0.5)  # dropout left on
    policy = add_adapters(model, LoraOptions(r=4))
    perturb_adapters(policy)
    policy.train()
    ids, mask = random_batch()
    expected, _ = sequence_logprobs(base, ids, mask)
    reference = AdapterDisabled(policy, policy)
    with torch.enable_grad():
        first, _ = reference(ids, mask)
    second, _ = reference(ids, mask)
    assert not first.requires_grad  # no graph through the policy's weights
    torch.testing.assert_close(first, expected, atol=1e-6, rtol=0)  # adapters off, eval mode: the base
    torch.testing.assert_close(second, first, atol=0, rtol=0)  # no dropout noise between calls
    assert policy.training  # the policy's mode is restored
    assert all(p.requires_grad == (".lora_" in n) for n, p in policy.named_parameters())
    policy.eval()
    adapted_logp, _ = sequence_logprobs(policy, ids, mask)
    assert (adapted_logp - expected).abs().max() > 0.05  # the adapters are back on after the reference


def test_optimiser_steps_only_the_adapters(tiny_random_dir):
    policy = adapted(tiny_random_dir)
    perturb_adapters(policy)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    backend = build_backend("torch", policy=policy, lr=1e-2)
    assert sum(p.numel() for g in backend.optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in policy.parameters() if p.requires_grad)
    ids, mask = random_batch()
    backend.backward(-sequence_logprobs(policy, ids, mask)[0].sum())
    backend.step()
    for name, p in policy.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (".lora_" in name), name  # every adapter moved, no base weight did
    assert len(backend.optimizer.state) == sum(1 for p in policy.parameters() if p.requires_grad)


# --- checkpoints ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("merge", [False, True])
def test_checkpoint_holds_the_adapter_in_peft_format_and_the_merged_policy_on_request(tmp_path, tiny_random_dir,
                                                                                       merge):
    policy = adapted(tiny_random_dir)
    perturb_adapters(policy)
    policy.eval()
    ids, mask = random_batch()
    expected, _ = sequence_logprobs(policy, ids, mask)
    ckpt = save_checkpoint(tmp_path, 1, policy=policy, tokenizer=build_char_tokenizer(), state={},
                           merge_lora=merge)
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert (ckpt / "policy").is_dir() == merge
    saved = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # the adapters alone, not the base's weights
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_random_dir), ckpt / "adapter")
    torch.testing.assert_close(sequence_logprobs(loaded.eval(), ids, mask)[0], expected, atol=0, rtol=0)
    if merge:  # W + (alpha / r) B A folded in: the same function up to float32 rounding
        merged = AutoModelForCausalLM.from_pretrained(ckpt / "policy").eval()
        torch.testing.assert_close(sequence_logprobs(merged, ids, mask)[0], expected, atol=2e-5, rtol=0)
        assert not any("lora" in n for n, _ in merged.named_parameters())


@pytest.mark.parametrize("merge", [False, True])
def test_best_checkpoint_of_a_lora_run_is_its_adapter_or_the_merged_model(tmp_path, tiny_random_dir, merge):
    policy = adapted(tiny_random_dir)
    perturb_adapters(policy)
    best = save_best(tmp_path, 3, policy=policy, tokenizer=build_char_tokenizer(), record={"val/accuracy": 0.5},
                     merge_lora=merge)
    names = {p.name for p in best.iterdir()}
    assert "best.json" in names and "tokenizer.json" in names
    assert ("adapter_config.json" in names) == (not merge) and ("model.safetensors" in names) == merge
    assert is_adapter_dir(best) == (not merge)  # grpo-eval reads either


def test_merging_for_a_checkpoint_leaves_the_trained_policy_untouched(tiny_random_dir):
    policy = adapted(tiny_random_dir)
    perturb_adapters(policy)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    merged_copy(policy)
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    assert not any(m.merged for m in policy.modules() if hasattr(m, "merged"))


QUIET = ["tracking.progress_bar=false", "tracking.plot=false", THREADS]
LORA_RUN = ["model.lora.r=8", "optim.lr=1e-3", "algorithm.beta=0.04", "train.prompts_per_step=8",
            "train.eval_every=0", "checkpoint.every_steps=2", "checkpoint.keep_last=5", "task.arithmetic.num_eval=40"]


def _train(tmp_path, name, *overrides):
    cfg = compose([*QUIET, *LORA_RUN, *overrides])
    cfg.run_dir = str(tmp_path / name)
    return train_from_config(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("qlora", [False, pytest.param(True, marks=NEEDS_BNB)], ids=["lora", "qlora"])
def test_lora_run_stopped_and_resumed_ends_with_the_uninterrupted_adapters(tmp_path, warm_tiny_dir, qlora):
    # qlora: the 4-bit base is loaded again on resume; half the prompts (its CPU matmuls dequantise each time)
    base = ["model.lora.qlora=true", "train.prompts_per_step=4", "task.arithmetic.num_eval=8"] if qlora else []
    straight = _train(tmp_path, "straight", "train.max_steps=4", *base)
    _train(tmp_path, "resumed", "train.max_steps=2", *base)
    resumed = _train(tmp_path, "resumed", "train.max_steps=4", "resume=auto", *base)
    assert [h["step"] for h in resumed if "train/loss" in h] == [3, 4]
    losses = [h["train/loss"] for h in straight if "train/loss" in h][2:]
    assert [h["train/loss"] for h in resumed if "train/loss" in h] == pytest.approx(losses, abs=1e-6)
    kl = [h["train/kl"] for h in straight if "train/kl" in h]
    # the adapters start at B = 0: at step 1 the policy is its reference (the base, adapters off) and the KL is 0;
    # later steps moved the adapters off it (a reference that kept them on would stay at 0)
    assert kl[0] == pytest.approx(0.0, abs=1e-9) and min(kl[1:]) > 1e-9, kl
    a, b = (load_file(tmp_path / n / "checkpoints" / "step_4" / "adapter" / "adapter_model.safetensors")
            for n in ("straight", "resumed"))
    start = load_file(tmp_path / "straight" / "checkpoints" / "step_2" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-4  # steps 3-4 moved the adapters
    if qlora:  # grpo-eval merges into the float base: close to, not the same function as, the 4-bit one
        return

    # grpo-eval of the adapter directory: its base with the adapters merged, the same accuracy as the
    # merged model's own directory would give (here: the run's final eval of the adapted policy)
    cfg = compose([*QUIET, "model=hf", f"model.path={tmp_path / 'straight' / 'checkpoints' / 'step_4' / 'adapter'}",
                   "task.arithmetic.num_eval=40"])
    cfg.run_dir = str(tmp_path / "eval")
    report = evaluate_from_config(cfg)
    assert report["eval/accuracy"] == pytest.approx(straight[-1]["eval/accuracy"], abs=1e-9)


# --- data parallel --------------------------------------------------------------------------------------


# --- what a weight-holding engine (vLLM) receives ---


def test_engine_weights_are_the_merged_copys_under_base_names_and_leave_the_policy_untouched(tiny_random_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_random_dir, dtype=torch.float32)
    base_state = {n: p.detach().clone() for n, p in base.named_parameters()}
    policy = add_adapters(base, LoraOptions(r=4, alpha=8))
    with torch.no_grad():  # B = 0 at the start would make merged == base; give the adapters a real update
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    merged = {w.name: w.value() for w in engine_weights(policy, merge=True)}
    expected = merged_copy(policy).state_dict()
    assert set(merged) == set(base_state)  # the base model's names: no lora_A/B, no base_layer, no prefix
    for name, value in merged.items():  # peft's own merge, the same arithmetic: equal bit for bit
        assert torch.equal(value, expected[name]), name
    moved = [n for n in merged if not torch.equal(merged[n], base_state[n])]
    assert moved and all(n.split(".")[-2] in PROJECTIONS for n in moved)  # only the adapted projections
    assert all(torch.equal(w.value(), base_state[w.name]) for w in engine_weights(policy, merge=False))
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())  # the policy is not merged into


# --- what is refused ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,field", [
    (["model.lora.r=-1"], "model.lora.r"),
    (["model.lora.r=8", "model.lora.alpha=0"], "model.lora.alpha"),
    (["model.lora.r=8", "model.lora.dropout=0.1"], "model.lora.dropout"),  # model.dropout=false
    (["model.lora.qlora=true"], "model.lora.qlora"),  # r = 0
    (["model.lora.r=8", "model.lora.qlora=true", "rollout=vllm"], "rollout.engine"),  # vLLM: no 4-bit base
    (["model.lora.r=8", "model.lora.qlora=true", "checkpoint.merge_lora=true"], "checkpoint.merge_lora"),
    (["checkpoint.merge_lora=true"], "checkpoint.merge_lora"),  # no adapters
    (["model.lora.r=8", "rollout=vllm", "rollout.mode=server", "rollout.server_urls=[http://h:1]"], "model.lora.r"),
    (["model.lora.r=8", "rollout=vllm", "model.lora.modules_to_save=[lm_head]"], "rollout.lora_sync"),
    (["model.lora.r=1024", "rollout=vllm"], "rollout.lora_sync"),  # vLLM's largest max_lora_rank is 512
    (["rollout.lora_sync=both"], "rollout.lora_sync"),
])
def test_invalid_lora_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        compose(overrides)


def test_lora_with_colocated_vllm_is_accepted_in_both_sync_modes():
    for mode in ("adapter", "merged"):
        assert compose(["model.lora.r=8", "rollout=vllm", f"rollout.lora_sync={mode}"]).rollout.lora_sync == mode
    merged = compose(["model.lora.r=8", "rollout=vllm", "rollout.lora_sync=merged",
                      "model.lora.modules_to_save=[lm_head]"])
    assert merged.model.lora.modules_to_save == ["lm_head"]


def test_lora_dropout_is_allowed_with_model_dropout():
    assert compose(["model.lora.r=8", "model.lora.dropout=0.1", "model.dropout=true"]).model.lora.dropout == 0.1
