"""Configuration of `grpo-rm-train`: one dataclass per group, validated when loaded (as `grpo.config`).

The base model reuses `grpo.config.ModelConfig` and the Hydra group `configs/model/` (`model=tiny` is the
warm-started tiny model, `model=hf model.path=...` any causal LM directory): the reward model is that
network with its language-model head replaced by a one-output score head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from grpo.config import ModelConfig, choice, positive
from grpo.errors import ConfigError


@dataclass
class ArithmeticPreferencesConfig:
    num_prompts: int = field(default=2000, metadata={"help": "training problems sampled on (0: all)"})
    samples_per_prompt: int = field(default=8, metadata={"help": "completions sampled per problem"})
    pairs_per_prompt: int = field(default=2, metadata={
        "help": "pairs per problem at most, each with another wrong answer"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the policy"})
    digits: int = field(default=2, metadata={"help": "operands have up to this many digits (as task.arithmetic)"})
    reverse: bool = field(default=True, metadata={"help": "least significant digit first (as task.arithmetic)"})
    max_carries: int | None = field(default=None, metadata={
        "help": "only sums making at most this many carries (as task.arithmetic); null: every sum"})
    policy_path: str | None = field(default=None, metadata={"help": "policy that answers; null: the base model"})
    seed: int = field(default=0, metadata={"help": "seed of problem choice, sampling and pairing"})


@dataclass
class PreferenceDataConfig:
    builtin: str | None = field(default="arithmetic", metadata={"help": "built-in preference set, or null for files"})
    train_file: str | None = field(default=None, metadata={"help": "JSONL or Parquet file of preference pairs"})
    eval_file: str | None = field(default=None, metadata={"help": "held-out pairs; null: split off eval_fraction"})
    hf_dataset: str | None = field(default=None, metadata={"help": "Hugging Face `datasets` name (local cache)"})
    hf_train_split: str = field(default="train", metadata={"help": "split of hf_dataset for training"})
    hf_eval_split: str | None = field(default=None, metadata={
        "help": "split of hf_dataset held out; null: eval_fraction"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompt"})
    chosen_column: str = field(default="chosen", metadata={"help": "column holding the preferred completion"})
    rejected_column: str = field(default="rejected", metadata={"help": "column holding the other completion"})
    eval_fraction: float = field(default=0.1, metadata={"help": "prompts held out when no eval file or split is given"})
    arithmetic: ArithmeticPreferencesConfig = field(default_factory=ArithmeticPreferencesConfig)


@dataclass
class RMTrainConfig:
    head: str = field(default="classifier", metadata={
        "help": "classifier: a score head at the last token, trained by RewardTrainer; likelihood: the (supervised) "
                "LM's log-likelihood of the completion, its scale fitted by Bradley-Terry"})
    sft_steps: int = field(default=0, metadata={
        "help": "fine-tune the base LM on the chosen completions first (0: off)"})
    sft_batch_size: int = field(default=64, metadata={"help": "completions per supervised step"})
    sft_lr: float = field(default=3e-3, metadata={"help": "peak learning rate of the supervised stage"})
    max_steps: int = field(default=300, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=32, metadata={"help": "pairs per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate of AdamW"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up steps, then linear decay to 0"})
    max_length: int = field(default=512, metadata={"help": "pairs with a longer side (in tokens) are dropped"})
    center_rewards: float | None = field(default=None, metadata={"help": "weight of mean((r_c + r_r)^2); null: off"})
    log_every: int = field(default=10, metadata={"help": "steps between metrics.jsonl lines"})
    eval_every: int = field(default=100, metadata={"help": "steps between held-out evaluations (and at the end)"})
    eval_batch_tokens: int = field(default=8192, metadata={"help": "padded tokens per forward pass when evaluating"})


@dataclass
class RMConfig:
    run_dir: str = field(default=MISSING, metadata={"help": "directory of this run"})
    seed: int = field(default=0, metadata={"help": "seed of the score head, data order and split"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = torch's default"})
    progress_bar: bool = field(default=True, metadata={"help": "show a progress bar"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: RMTrainConfig = field(default_factory=RMTrainConfig)


def register_rm_configs() -> None:
    """Register the schema with Hydra's ConfigStore (configs/rm/config.yaml lists it first)."""
    ConfigStore.instance().store(name="rm_schema", node=RMConfig)


def validate_rm(cfg: RMConfig) -> RMConfig:
    """Check choices and ranges; raise ConfigError naming the first bad field."""
    d = cfg.data
    sources = [s for s in (d.builtin, d.train_file, d.hf_dataset) if s]
    if len(sources) != 1:
        raise ConfigError("data: set exactly one of data.builtin, data.train_file, data.hf_dataset")
    if d.builtin not in (None, "arithmetic"):
        raise ConfigError(f"data.builtin: {d.builtin!r} is not one of arithmetic (or null)")
    if d.eval_file and not d.train_file:
        raise ConfigError("data.eval_file: only with data.train_file")
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {d.eval_fraction}")
    a = d.arithmetic
    positive("data.arithmetic.num_prompts", a.num_prompts, zero_ok=True)
    positive("data.arithmetic.samples_per_prompt", a.samples_per_prompt)
    if a.samples_per_prompt < 2:
        raise ConfigError("data.arithmetic.samples_per_prompt: a pair needs at least 2 samples per prompt")
    positive("data.arithmetic.pairs_per_prompt", a.pairs_per_prompt)
    positive("data.arithmetic.temperature", a.temperature)
    t = cfg.train
    for name in ("max_steps", "batch_size", "max_length", "log_every", "eval_every", "eval_batch_tokens"):
        positive(f"train.{name}", getattr(t, name))
    positive("train.lr", t.lr)
    choice("train.head", t.head, ("classifier", "likelihood"))
    positive("train.sft_steps", t.sft_steps, zero_ok=True)
    positive("train.sft_batch_size", t.sft_batch_size)
    positive("train.sft_lr", t.sft_lr)
    positive("train.weight_decay", t.weight_decay, zero_ok=True)
    positive("train.warmup_steps", t.warmup_steps, zero_ok=True)
    if t.center_rewards is not None:
        positive("train.center_rewards", t.center_rewards, zero_ok=True)
    choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16"))
    if cfg.model.builtin is None and not cfg.model.path:
        raise ConfigError("model.path: give a causal LM directory (or model=tiny for the built-in model)")
    if cfg.model.builtin not in (None, "tiny"):
        raise ConfigError(f"model.builtin: {cfg.model.builtin!r} is not one of tiny (or null)")
    return cfg
