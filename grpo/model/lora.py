"""LoRA adapters on the policy (`model.lora.r > 0`), built on `peft`.

The policy is the base model wrapped by peft: its weights are frozen and each adapted linear layer
W gains a trainable low-rank update, y = W x + (alpha / r) B A x (Hu et al., 2021), with A random
and B zero at the start, so the adapted policy starts as the base model. The optimiser sees only
the adapters (and `model.lora.modules_to_save`), which is what saves the optimiser states' memory.

Where the trainer departs from keeping a second model:
1. The KL's (and DPO's) reference is the same model with its adapters switched off
   (`AdapterDisabled`, peft's `disable_adapter()`), which is exactly the starting policy: no
   second copy of the weights is loaded.
2. Checkpoints hold the adapters in peft's own format (`adapter/`, loadable with
   `PeftModel.from_pretrained` over the base); `policy/` holds the merged model only when
   `checkpoint.merge_lora=true`. A run resumes by loading the base again and the adapters over it.
3. The hf rollout engine samples from the peft model itself, adapters in place. The colocated vLLM
   engine either receives the adapters alone (`rollout.lora_sync=adapter`: saved in peft's format and
   served as a vLLM LoRA request) or whole weights with the adapters merged in (`merged`), which
   `engine_weights` computes as W + (alpha / r) B A beside the policy, never merging into it; vLLM's
   server mode does not take adapters yet (refused by `grpo.config.validate_lora_against_run`).

QLoRA (`model.lora.qlora=true`, Dettmers et al., 2023): the frozen base is loaded in 4-bit NF4 by
bitsandbytes (`quantization_config`: blocks of 64 weights, their absmax scales quantised again to 8 bits,
"double quantisation"; matmuls in `model.dtype`), then prepared by peft (`prepare_quantized`) and
adapted as above, the adapters in full precision. The reference is the 4-bit base with the adapters off,
so the KL is measured against the quantised starting policy, not the float one. On CPU bitsandbytes
runs its pure-torch path, on a GPU its CUDA kernels. Departures from the paper: no paged optimiser (the
optimiser is the backend's AdamW); and what needs the float base is refused by
`grpo.config.validate_qlora_against_run`: the vLLM engine (it would need the 4-bit base) and
`checkpoint.merge_lora` (a merge into a 4-bit base rounds the update to NF4). Every train backend takes the
4-bit base: DeepSpeed partitions the packed uint8 weights under ZeRO-3 like any frozen parameter, their
quantisation state staying whole on every rank.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import BitsAndBytesConfig

from grpo.config import LoraOptions
from grpo.core.logprobs import forward_logprobs
from grpo.errors import ConfigError

if TYPE_CHECKING:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

ADAPTER_CONFIG = "adapter_config.json"  # what marks a peft adapter directory
PEFT_PREFIX = "base_model.model."  # what peft puts before the wrapped model's parameter names


def add_adapters(model: torch.nn.Module, options: LoraOptions, seed: int = 0) -> PeftModel:
    """`model` with fresh LoRA adapters (B = 0: it computes what `model` did), only they trainable.
    A is drawn from `seed` alone, not the caller's random streams: under data parallel each rank's
    streams differ, and every rank must start from the same adapters."""
    from peft import LoraConfig, get_peft_model  # peft (and bitsandbytes under it) load only for a LoRA run
    config = LoraConfig(
        r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
        target_modules=list(options.target_modules) or "all-linear",  # all-linear: the output head excluded
        modules_to_save=list(options.modules_to_save) or None, task_type="CAUSAL_LM",
    )
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return get_peft_model(model, config)
    except ValueError as e:  # a target module name the model does not have
        raise ConfigError(f"model.lora.target_modules: {str(e).splitlines()[0]}") from None


def quantization_config(dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's 4-bit base for `from_pretrained`: NF4 weights in blocks of 64, their absmax scales
    quantised again (double quantisation), matmuls in `dtype` (the run's `model.dtype`)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.lora.qlora: the 4-bit base needs bitsandbytes, which is not installed "
                          "(pip install 'bitsandbytes>=0.50'; scripts/install.sh installs it)")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def prepare_quantized(model: torch.nn.Module, gradient_checkpointing: bool) -> torch.nn.Module:
    """A 4-bit `model` made ready for adapters (peft's `prepare_model_for_kbit_training`): every weight
    frozen, the 16-bit ones that stay unquantised (embeddings, norms, output head) cast to float32 for
    stable sums, and with `gradient_checkpointing` the input embeddings' output made to require grad so that
    the recomputed layers see a graph.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight in place for a faster kernel
    the first time the layer runs in eval mode without grad (the sampler's forward), and keeps that
    layout: the layer's later training forward then fails (`result += bias` on a graph tensor), and the
    sampler would compute with other kernels than the trainer. The repacking is switched off here, so
    sampling and training run the same arithmetic."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            module.support_avx512bf16_for_cpu = False
    return model


def load_adapters(model: torch.nn.Module, adapter_dir: str | Path) -> PeftModel:
    """`model` with the trainable adapters saved in `adapter_dir` (a checkpoint's `adapter/`)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts of `model`."""
    counts = [(p.numel(), p.requires_grad) for p in model.parameters()]
    return sum(n for n, grad in counts if grad), sum(n for n, _ in counts)


def is_adapted(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft model (a LoRA policy); peft not yet imported, none can be."""
    return "peft" in sys.modules and isinstance(model, sys.modules["peft"].PeftModel)


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a local peft adapter directory (a checkpoint's `adapter/`)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter directory was trained on (its `base_model_name_or_path`)."""
    base = json.loads((Path(path).expanduser() / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"model.path: the adapter {path} does not name its base model (base_model_name_or_path)")
    return base


def save_adapters(policy: PeftModel, directory: Path) -> None:
    """The adapters (and modules_to_save) in peft's format: adapter_config.json, adapter_model.safetensors."""
    policy.save_pretrained(directory, safe_serialization=True)


def merged_copy(policy: PeftModel) -> torch.nn.Module:
    """A plain transformers model with the adapters folded into the weights, W + (alpha / r) B A.
    Merged in a copy: merging in place and unmerging would round the base weights, and a resumed run
    would no longer continue exactly."""
    return copy.deepcopy(policy).merge_and_unload()


@dataclass
class EngineWeight:
    """One parameter of the base model as an engine holding whole weights takes it: `name` is the base
    model's (Hugging Face) name, `weight` the policy's parameter; with `layer`, the LoRA layer whose
    update is added, the value is W + (alpha / r) B A (peft's `get_delta_weight`, so fan-in/fan-out
    layouts and per-layer scales are peft's own)."""

    name: str
    weight: torch.nn.Parameter
    layer: LoraLayer | None = None

    def parameters(self) -> list[torch.nn.Parameter]:
        """The policy parameters `value` reads (ZeRO-3 gathers these)."""
        if self.layer is None:
            return [self.weight]
        adapters = [a for a in self.layer.active_adapters if a in self.layer.lora_A]
        return [self.weight, *(p for a in adapters
                               for p in (self.layer.lora_A[a].weight, self.layer.lora_B[a].weight))]

    @torch.no_grad()
    def value(self) -> torch.Tensor:
        """The weight to load; a new tensor when merged, the policy's own (detached) otherwise."""
        if self.layer is None:
            return self.weight.detach()
        merged = self.weight.detach().clone()  # [out, in]
        for adapter in self.layer.active_adapters:
            if adapter in self.layer.lora_A:
                merged += self.layer.get_delta_weight(adapter)  # [out, in] = scale * B @ A
        return merged


def engine_weights(policy: PeftModel, merge: bool) -> list[EngineWeight]:
    """The base model's parameters of the LoRA `policy` under their base names (peft's `base_model.model.`,
    `.base_layer` and `.modules_to_save.<adapter>` taken out; adapters and the frozen copies of
    `modules_to_save` left out), with the adapters merged in when `merge`, else the base weights alone."""
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in policy.named_modules() if isinstance(m, LoraLayer)}
    weights = []
    for name, p in policy.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue
        module, _, leaf = name.rpartition(".")
        layer = None
        if module.endswith(".base_layer"):
            module = module.removesuffix(".base_layer")
            layer = layers.get(module) if merge and leaf == "weight" else None
        module = re.sub(r"\.modules_to_save\.[^.]+$", "", module)
        weights.append(EngineWeight(f"{module}.{leaf}".removeprefix(PEFT_PREFIX), p, layer))
    return weights


class AdapterDisabled(torch.nn.Module):
    """The policy's base model, the adapters off: the reference of the KL and of DPO under LoRA.

    Its forward returns `(logprobs [B, T-1], entropy or None)` like `backends.LogProbModel`, computed
    through `model` (the backend's forward: the bare policy, its `LogProbModel`, or a DeepSpeed engine,
    whose ZeRO-3 hooks gather the sharded weights) under peft's `disable_adapter()`, without gradients
    and with the policy in eval mode (no dropout of the base reaches the reference); the policy's mode
    is restored afterwards. It holds no weights of its own: its parameters are the policy's.
    """

    computes_logprobs = True

    def __init__(self, policy: PeftModel, model: torch.nn.Module):
        super().__init__()
        self.policy = policy
        self.model = model

    def forward(self, input_ids, attention_mask, **kwargs):
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.no_grad(), self.policy.disable_adapter():
                return forward_logprobs(self.model, input_ids, attention_mask, **kwargs)
        finally:
            self.policy.train(was_training)
