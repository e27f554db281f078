"""Loading the policy, and what the trainer does to a model it loads before training it.

`load_policy` reads a model directory (or a checkpoint's `policy/`) with transformers; where the directory
of the built-in `model=tiny` comes from is `grpo.training.run.resolve_model_path`.
Dropout is turned off (`model.dropout=false`, the default). With dropout on, the log-probs the
trainer computes for a completion are not those the sampler drew it with, the PPO ratio is
noised at 1 before any update, and a critic's values (GAE, the returns, the value-clip anchor)
are noised too. TRL and verl turn it off for the same reason.

With `model.lora.r > 0` the trained policy is the model wrapped in LoRA adapters (`grpo.model.lora`):
`load_train_policy` adds fresh adapters, or loads a checkpoint's `adapter/` over the base model.
`load_policy` of an adapter directory (for `grpo-eval`) loads its base and merges the adapters in.
With `model.lora.qlora=true` the base is loaded in 4-bit (`grpo.model.lora.quantization_config`) and prepared for
adapters, fresh or resumed alike; `grpo-eval` of a QLoRA adapter merges it into the float base, which
computes close to, not exactly, what was trained (the 4-bit rounding of the base is not in it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from grpo.config import Config
from grpo.errors import CheckpointError, ConfigError
from grpo.model.lora import (
    adapter_base,
    add_adapters,
    is_adapter_dir,
    load_adapters,
    prepare_quantized,
    quantization_config,
    trainable_parameters,
)

log = logging.getLogger("grpo")

# The tokenizer classes that are their tokenizer.json and nothing more (transformers 5 names the second an alias of
# the first): a directory that saved one means its file's pipeline, whatever the model's type.
FILE_DEFINED_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def disable_dropout(model: torch.nn.Module) -> list[str]:
    """Set every dropout probability in `model` to 0: `nn.Dropout` modules, and the attention
    dropout rates that attention modules keep as float attributes. Returns the names changed."""
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p = 0.0
            changed.append(name)
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            module.attention_dropout = 0.0
            changed.append(f"{name}.attention_dropout")
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "classifier_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(config, key, None), float) and getattr(config, key) > 0:
            setattr(config, key, 0.0)  # so a saved checkpoint says what was trained
    return changed


def load_train_policy(cfg: Config, checkpoint: Path | None):
    """The policy a run trains, and its tokenizer: `model.path`, or the checkpoint's `policy/` when resuming;
    with `model.lora.r > 0`, `model.path` wrapped in fresh adapters, or in the checkpoint's `adapter/`."""
    if not cfg.model.lora.r:
        path = str(checkpoint / "policy") if checkpoint is not None else cfg.model.path
        return load_policy(path, cfg, checkpoint=checkpoint is not None)
    model, tokenizer = load_policy(cfg.model.path, cfg, quantize=cfg.model.lora.qlora)
    if cfg.model.lora.qlora:
        model = prepare_quantized(model, cfg.backend.gradient_checkpointing)
    if checkpoint is None:
        policy = add_adapters(model, cfg.model.lora, seed=cfg.seed)  # the same on every rank
    else:
        try:
            policy = load_adapters(model, checkpoint / "adapter")
        except Exception as e:  # noqa: BLE001 - a missing or corrupt adapter file
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"checkpoint {checkpoint / 'adapter'} is unreadable: {first}") from None
    trainable, total = trainable_parameters(policy)
    log.info("%s r=%d: %d trainable parameters of %d (%.2f%%)", "QLoRA" if cfg.model.lora.qlora else "LoRA",
             cfg.model.lora.r, trainable, total, 100 * trainable / total)
    return policy, tokenizer


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """The tokenizer at `path` (a directory, or a name transformers resolves). One saved as defined by its
    tokenizer.json alone (`FILE_DEFINED_TOKENIZERS`, as the built-in tiny model's is) is read as saved:
    `AutoTokenizer` would build the class registered for the model's type instead (Qwen2's, for the tiny model),
    whose own pre-tokenizer replaces the file's, and the tiny model's character tokenizer would then drop every
    space of every prompt, unlike the warm start, which tokenised them."""
    directory = Path(path)
    config = directory / "tokenizer_config.json"
    if (directory / "tokenizer.json").is_file() and config.is_file():
        if json.loads(config.read_text()).get("tokenizer_class") in FILE_DEFINED_TOKENIZERS:
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def pad_left(tokenizer):
    """`tokenizer`, set up for batches of prompts: padded on the left, so that every prompt ends where its
    completion begins, with the EOS token as the pad token where the tokenizer has none."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(path: str, cfg: Config, *, checkpoint: bool = False, quantize: bool = False):
    """The model and tokenizer at `path`. Code shipped with a model runs only with
    `model.trust_remote_code=true`; a checkpoint's weights are read from safetensors only.
    An adapter directory (a LoRA checkpoint's `adapter/`) gives its base model with the adapters merged.
    With `quantize` the linear layers are loaded in 4-bit NF4 (QLoRA's base), computing in `model.dtype`."""
    if is_adapter_dir(path):
        base, tokenizer = load_policy(adapter_base(path), cfg)
        return load_adapters(base, path).merge_and_unload(), tokenizer
    dtype = getattr(torch, cfg.model.dtype)
    trust = cfg.model.trust_remote_code
    quantized = quantization_config(dtype) if quantize else None
    try:
        tokenizer = load_tokenizer(path, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust,
                                                     use_safetensors=True if checkpoint else None,
                                                     quantization_config=quantized)
    except Exception as e:  # noqa: BLE001 - OSError, a refused remote-code prompt, a corrupt safetensors header...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if checkpoint:
            raise CheckpointError(f"checkpoint {path} is unreadable: {first}") from None
        if "trust_remote_code" in str(e) and not trust:
            raise ConfigError(f"model.path: {path!r} ships its own code; set model.trust_remote_code=true "
                              f"only if you trust it") from None
        raise ConfigError(f"model.path: cannot load {path!r}: {first}") from None
    if not cfg.model.dropout:
        changed = disable_dropout(model)
        if changed:
            log.info("dropout off in %d places of %s (model.dropout=true keeps it)", len(changed), path)
    return model, pad_left(tokenizer)


def context_length(model) -> int | None:
    """The longest sequence the model's position embeddings cover, where its config says."""
    return getattr(model.config, "max_position_embeddings", None)
