"""Per-GPU memory plan of a run, printed before launch; a plan that cannot fit is refused.

The accounting follows the ZeRO paper (Rajbhandari et al. 2020) for Adam in mixed precision, with
Psi parameters and N ranks, in bytes per parameter:

    stage     weights      gradients    optimiser states (fp32 master, m, v = 12)
    torch/0   2            2            12
    ZeRO-1    2            2            12 / N
    ZeRO-2    2            2 / N        12 / N
    ZeRO-3    2 / N        2 / N        12 / N

In float32 (no mixed precision) weights and gradients take 4 bytes and the optimiser 8 (m and v;
the weights are the master copy), except that ZeRO (stage >= 1) still keeps an fp32 master copy of
its partition: 12 / N (measured: python -m scripts.bench.zero_memory). Offloading moves the optimiser states
(and under ZeRO-3 the weights) to CPU memory: 0 on the GPU.

Activations (Korthikanti et al. 2022, without the attention-score term that fused attention never
stores): about 34 * hidden bytes per token per layer in 16-bit for one micro-batch of
`micro_batch_tokens` tokens; with gradient checkpointing, 2 * hidden bytes per token per layer
(the layer inputs) plus one layer's full activations while it is recomputed. The chunked log-prob
head adds its float32 logits: 1024 positions x vocabulary, about 3 copies (logits, softmax, grad).

The groups layout (`backend.packing=groups`, and `auto`, which the run resolves after this plan and which picks
groups under sdpa, transformers' default attention) adds one additive attention mask per micro-batch, [R, 1, W, W]
in the model's dtype, that every layer uses and backward keeps: R rows of W tokens cost R x W <= `micro_batch_tokens`,
so at most `micro_batch_tokens`^2 values (one group filling the budget; 512 MiB at 16,384 tokens in 16-bit).

Rollout: the hf engine (our sampling loop over the policy) needs the full 16-bit weights (under
ZeRO-3 they are gathered for the call) and a KV cache of `rollout.batch_size` sequences of `ASSUMED_PROMPT_TOKENS +
max_new_tokens` tokens: 2 (K, V) x layers x kv_heads x head_dim x 2 bytes per token. vLLM
reserves `gpu_memory_utilization` of the device. A KL reference model adds its 16-bit weights.
These are estimates, deliberately simple (no allocator fragmentation, no communication buffers).

PPO (`algorithm=ppo`) trains a critic beside the policy: the policy's network under a one-output token
head (Psi_c parameters: Psi less the output embedding unless it is tied, plus hidden + 1), sharded and
optimised like the policy, so it adds its weights, gradients and optimiser states at the same bytes per
parameter (its activations come and go with its own micro-batches, after the policy's: not added). It is
trained in full even when the policy has LoRA adapters.

LoRA (`model.lora.r > 0`): the weights are all Psi parameters plus the T trainable ones (r x (in + out)
per adapted linear layer, plus the trained copy of each of `modules_to_save`), gradients and optimiser
states only the T, at the bytes per parameter above; the reference is the policy with its adapters off,
so it adds nothing.

QLoRA (`model.lora.qlora`): the Q weights of the linear layers (all but the output head) are stored in 4-bit
NF4 by bitsandbytes: 4 bits per weight, plus one absmax scale per block of 64 weights, itself quantised to 8
bits (double quantisation), plus one float32 scale per 256 of those: 4 + 8/64 + 32/(64 x 256) = 4.127 bits,
0.5159 bytes per weight. The Psi - Q others (embeddings, norms, biases, output head) stay unquantised and peft's
`prepare_model_for_kbit_training` casts them to float32: 4 bytes each, whatever `model.dtype`. ZeRO-3
partitions both like any weight.

The command `grpo-memory` (`python -m grpo.memory`) prints a config's plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from grpo.core.packing import AUTO
from grpo.errors import ConfigError
from grpo.model.facts import facts_for, transformers_config

GiB = 2**30
ASSUMED_PROMPT_TOKENS = 512  # prompts are not measured before launch; the KV cache assumes this length
LOGIT_CHUNK = 1024  # grpo.core.logprobs.sequence_logprobs' default chunk_size
NF4_BLOCK, NF4_SCALE_BLOCK = 64, 256  # bitsandbytes: weights per absmax scale; scales per float32 scale (double quant)
NF4_BYTES = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_SCALE_BLOCK)  # 0.5159 bytes per 4-bit weight (4.127 bits)


@dataclass
class ModelShape:
    num_params: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    kv_dim: int  # num_key_value_heads * head_dim


@dataclass
class MemoryEstimate:
    """Bytes per GPU of each part of a run."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    rollout: float
    reference: float
    critic: float = 0.0  # PPO's value model: its weights, gradients and optimiser states
    mask: float = 0.0  # the groups layout's attention mask of one micro-batch
    stage: str = ""
    world_size: int = 1
    trainable: int = 0  # parameters the optimiser holds, when fewer than all (LoRA); 0 = all
    quantized: int = 0  # base parameters held in 4-bit NF4 (QLoRA); 0 = none

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.rollout
                + self.reference + self.critic + self.mask)

    def table(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimiser states", self.optimizer),
                ("activations", self.activations), *([("groups mask", self.mask)] if self.mask else []),
                ("log-prob logits", self.logits),
                ("rollout engine", self.rollout), ("reference model", self.reference)]
        rows += [("critic (PPO)", self.critic)] if self.critic else []
        rows += [("total", self.total)]
        lora = f", LoRA: {self.trainable:,} parameters trained" if self.trainable else ""
        if self.quantized:
            lora = f", QLoRA: {self.trainable:,} parameters trained over {self.quantized:,} in 4-bit"
        head = (f"estimated memory per GPU ({self.stage}, {self.world_size} rank{'s' if self.world_size > 1 else ''}"
                f"{lora}):")
        return "\n".join([head, *(f"  {name:<18}{value / GiB:8.2f} GiB" for name, value in rows)])


def training_bytes_per_param(stage: int, world_size: int, *, mixed_precision: bool, offload_optimizer: bool = False,
                             offload_params: bool = False) -> tuple[float, float, float]:
    """(weights, gradients, optimiser) bytes per parameter on one GPU; stage 0 = plain torch or DDP."""
    w, g, o = (2.0, 2.0, 12.0) if mixed_precision else (4.0, 4.0, 8.0)
    n = float(world_size)
    if stage >= 1:
        o = 12.0 / n  # ZeRO keeps an fp32 master partition even when the weights are fp32
    if stage >= 2:
        g /= n
    if stage >= 3:
        w /= n
    if offload_optimizer:
        o = 0.0
    if offload_params:
        w = 0.0
    return w, g, o


def activation_bytes(shape: ModelShape, tokens: int, *, gradient_checkpointing: bool,
                     bytes_per_value: int = 2) -> float:
    """Activations of one micro-batch of `tokens` tokens kept for backward."""
    per_layer = 34 * shape.hidden_size * tokens * bytes_per_value / 2  # 34*h bytes per token in 16-bit
    if gradient_checkpointing:
        return shape.num_layers * 2 * shape.hidden_size * tokens * bytes_per_value / 2 + per_layer
    return shape.num_layers * per_layer


def group_mask_bytes(micro_batch_tokens: int, bytes_per_value: int = 2) -> float:
    """The groups layout's attention mask of one micro-batch at its largest: `micro_batch_tokens`^2 values (see the
    module docstring; the rows' alignment to 8 values adds under 8 x W of them)."""
    return float(micro_batch_tokens) ** 2 * bytes_per_value


def kv_cache_bytes(shape: ModelShape, sequences: int, tokens_per_sequence: int, bytes_per_value: int = 2) -> float:
    return 2 * shape.num_layers * shape.kv_dim * bytes_per_value * sequences * tokens_per_sequence


def estimate(shape: ModelShape, *, stage: int, world_size: int, mixed_precision: bool, micro_batch_tokens: int,
             gradient_checkpointing: bool, rollout_engine: str, rollout_sequences: int, max_new_tokens: int,
             gpu_memory_gb: float = 80.0, vllm_fraction: float = 0.3, with_reference: bool = False,
             offload_optimizer: bool = False, offload_params: bool = False, stage_name: str = "",
             trainable_params: int = 0, critic_params: int = 0, quantized_params: int = 0,
             packing: str = "padded") -> MemoryEstimate:
    """The plan; `trainable_params` > 0 (LoRA) are the parameters with gradients and optimiser states, held
    beside the base's; `quantized_params` > 0 (QLoRA), the base's weights held in 4-bit NF4 (the others in
    float32); `critic_params` > 0, PPO's value model, trained in full beside the policy; `packing`,
    `backend.packing` (groups or auto: its attention mask)."""
    w, g, o = training_bytes_per_param(stage, world_size, mixed_precision=mixed_precision,
                                       offload_optimizer=offload_optimizer, offload_params=offload_params)
    P = shape.num_params
    T = trainable_params or P
    value_bytes = 2 if mixed_precision else 4
    base = base_weight_bytes(P, quantized_params, value_bytes)  # the whole base, unsharded
    adapters = w * trainable_params  # LoRA's trained parameters, beside the base's (0 without LoRA)
    if rollout_engine == "server":  # rollout.mode=server: the engines have devices of their own
        rollout = 0.0
    elif rollout_engine == "vllm":
        rollout = vllm_fraction * gpu_memory_gb * GiB
    else:  # the hf engine samples from the policy: full weights when they are sharded, plus the KV cache
        gathered = base if stage >= 3 or offload_params else 0.0
        rollout = gathered + kv_cache_bytes(shape, rollout_sequences, ASSUMED_PROMPT_TOKENS + max_new_tokens,
                                            value_bytes)
    return MemoryEstimate(
        weights=base * w / value_bytes + adapters, gradients=g * T, optimizer=o * T,  # w / value_bytes: 1/N, ZeRO-3
        activations=activation_bytes(shape, micro_batch_tokens, gradient_checkpointing=gradient_checkpointing,
                                     bytes_per_value=value_bytes),
        mask=group_mask_bytes(micro_batch_tokens, value_bytes) if packing in ("groups", AUTO) else 0.0,
        logits=3 * LOGIT_CHUNK * shape.vocab_size * 4,
        rollout=rollout, reference=P * value_bytes if with_reference else 0.0,
        critic=(w + g + o) * critic_params, stage=stage_name, world_size=world_size, trainable=trainable_params,
        quantized=quantized_params,
    )


def base_weight_bytes(num_params: int, quantized_params: int, value_bytes: int) -> float:
    """Bytes of the base model's whole weights: `value_bytes` each, or with `quantized_params` > 0 (QLoRA)
    those in NF4 (0.5159 bytes) and the others in float32 (peft's prepare_model_for_kbit_training casts them)."""
    if not quantized_params:
        return float(num_params * value_bytes)
    return quantized_params * NF4_BYTES + (num_params - quantized_params) * 4.0


def meta_model(config) -> torch.nn.Module:
    """The causal LM of a transformers config on the meta device: its modules and parameter shapes, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def model_shape(config) -> ModelShape:
    """The shape of a transformers config; parameters counted on the meta device (no memory)."""
    model = meta_model(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return ModelShape(num_params=sum(p.numel() for p in model.parameters()), hidden_size=config.hidden_size,
                      num_layers=config.num_hidden_layers, vocab_size=config.vocab_size, kv_dim=kv_heads * head_dim)


def critic_params(config) -> int:
    """Parameters of PPO's value model on a transformers config: the causal LM's backbone (counted on the
    meta device) under a one-output head, `hidden + 1` (grpo.algorithms.ppo.load_critic)."""
    model = meta_model(config)
    head = model.get_output_embeddings()
    backbone = sum(p.numel() for p in model.parameters())
    if not getattr(config, "tie_word_embeddings", False):
        backbone -= head.weight.numel()
    return backbone + config.hidden_size + 1


def lora_trainable_params(config, target_modules: list[str], modules_to_save: list[str], r: int) -> int:
    """Parameters LoRA of rank r trains on a transformers config (built on the meta device): r x (in + out)
    per adapted linear layer (named in `target_modules`, or every linear layer but the output head, as
    peft's all-linear), and every parameter of `modules_to_save`."""
    model = meta_model(config)
    head = model.get_output_embeddings()
    count = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in modules_to_save:
            count += sum(p.numel() for p in module.parameters())
        elif isinstance(module, torch.nn.Linear) and module is not head and (
                not target_modules or leaf in target_modules):
            count += r * (module.in_features + module.out_features)
    return count


def quantized_params(config) -> int:
    """Weights QLoRA stores in 4-bit on a transformers config (built on the meta device): those of every linear
    layer but the output head (transformers keeps the head unquantised); their biases stay unquantised."""
    model = meta_model(config)
    head = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)


def estimate_from_config(cfg, world_size: int, gpu_memory_gb: float = 80.0) -> MemoryEstimate:
    """The plan of a run config (model facts from `grpo.model.facts` when known, else its config.json)."""
    facts = facts_for(cfg.model.path)
    if facts is not None:
        config = transformers_config(facts)
    else:
        config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    b, lora = cfg.backend, cfg.model.lora
    stage = int(b.name.removeprefix("deepspeed_zero")) if b.name.startswith("deepspeed") else 0
    trainable = lora_trainable_params(config, list(lora.target_modules), list(lora.modules_to_save), lora.r) \
        if lora.r else 0
    return estimate(
        model_shape(config), stage=stage, world_size=world_size, mixed_precision=cfg.model.dtype == "bfloat16",
        micro_batch_tokens=b.micro_batch_tokens, gradient_checkpointing=b.gradient_checkpointing,
        rollout_engine="server" if cfg.rollout.mode == "server" else cfg.rollout.engine,
        rollout_sequences=cfg.rollout.batch_size,
        max_new_tokens=cfg.rollout.max_new_tokens, gpu_memory_gb=b.gpu_memory_gb or gpu_memory_gb,
        vllm_fraction=cfg.rollout.gpu_memory_utilization,
        with_reference=cfg.algorithm.uses_reference() and not lora.r,  # LoRA: the base, adapters off
        offload_optimizer=b.offload_optimizer, offload_params=b.offload_params, stage_name=b.name,
        trainable_params=trainable, critic_params=critic_params(config) if cfg.algorithm.loop == "ppo" else 0,
        quantized_params=quantized_params(config) if lora.qlora else 0, packing=b.packing,
    )


def check_fits(plan: MemoryEstimate, capacity_gb: float) -> None:
    """Raise ConfigError with the numbers when the plan exceeds the device."""
    if plan.total > capacity_gb * GiB:
        raise ConfigError(
            f"backend: the plan needs an estimated {plan.total / GiB:.1f} GiB per GPU but the device has "
            f"{capacity_gb:.1f} GiB (weights {plan.weights / GiB:.1f}, gradients {plan.gradients / GiB:.1f}, "
            f"optimiser {plan.optimizer / GiB:.1f}, activations {plan.activations / GiB:.1f}, "
            f"rollout {plan.rollout / GiB:.1f}): use a higher ZeRO stage, more GPUs, offload, "
            f"gradient checkpointing or a smaller backend.micro_batch_tokens / rollout.batch_size"
        )
