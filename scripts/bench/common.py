"""What the benchmarks against TRL share: phase timers, random-weight models, the two sides' GRPO steps
(ours: `grpo.algorithms.grpo.train_step`; TRL's `GRPOTrainer`, same settings), their alternation, peak memory and
model-FLOPs utilisation. `scripts.bench.step_vs_trl` and `scripts.bench.realistic` use them; see their
docstrings for what is compared and how.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from grpo.core.packing import pack
from grpo.data.loading import PromptSampler

ROOT = Path(__file__).resolve().parents[2]  # the repository: the memory runs relaunch a module from it

PHASES = ("generation", "scoring", "logprobs", "update", "weight_sync", "other")
# Dense bf16 peak of the accelerator, for the model-FLOPs utilisation of the update phase.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
MODEL_SHAPES = {  # random-weight models built here (no download): Qwen2.5's published shapes
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768),
}


# ---------------------------------------------------------------- timers

class Timers:
    """Seconds spent in named phases since the last `take`, and generated tokens."""

    def __init__(self, device: str):
        self.device = device
        self.acc = defaultdict(float)
        self.tokens = 0  # generated
        self.scored = 0  # positions through the training forward (padded or packed), for the update's FLOPs

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.acc[phase] += time.perf_counter() - start
        return timed

    def sync(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def count_scored(self, fn):
        def counted(model, input_ids, *args, **kwargs):
            if torch_grad_enabled():
                self.scored += forward_positions(input_ids, *args, **kwargs)
            return fn(model, input_ids, *args, **kwargs)
        return counted

    def take(self) -> tuple[dict, int]:
        out, tokens = dict(self.acc), self.tokens
        out["scored_tokens"] = self.scored
        self.acc.clear()
        self.tokens = self.scored = 0
        return out, tokens


def forward_positions(input_ids, attention_mask=None, *args, packing: str = "padded", logits_to_keep_from: int = 0,
                      **kwargs) -> int:
    """Positions the training forward runs: the padded micro-batch's, or its packed layout's (`backend.packing`)."""
    if packing in (None, "padded"):
        return input_ids.numel()
    return pack(input_ids, attention_mask, logits_to_keep_from + 1, packing).input_ids.numel()


def torch_grad_enabled() -> bool:
    import torch

    return torch.is_grad_enabled()


# ---------------------------------------------------------------- models

def random_model_dir(name: str, dtype: str, shape: dict | None = None) -> str:
    """A Qwen2 model of a published shape (`MODEL_SHAPES[name]`, or `shape`) with random weights, and a
    tokenizer covering its vocabulary, saved once under the temporary directory.

    The tokenizer is the built-in character one padded with placeholder tokens up to the model's
    vocabulary, so prompts are the task's own text and any sampled id decodes.
    """
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from grpo.builtin.tiny import CHARS, EOS, PAD, UNK

    shape = shape or MODEL_SHAPES[name]
    path = Path(tempfile.gettempdir()) / f"grpo-bench-{name}-{dtype}"
    if (path / "config.json").exists():
        return str(path)
    base = [PAD, EOS, UNK, *CHARS]
    vocab = {tok: i for i, tok in enumerate(base + [f"<x{i}>" for i in range(shape["vocab_size"] - len(base))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                  padding_side="left")
    config = Qwen2Config(**shape, tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=None,
                         head_dim=shape["hidden_size"] // shape["num_attention_heads"])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------- the two sides

def build_ours(cfg, device: str, timers: Timers, rows: list[dict] | None = None):
    """Our run (grpo.training.run.build_run), its phases wrapped in timers; returns a zero-argument step.
    `rows` (dataset rows with a "prompt"), when given, replace the task's training prompts."""
    import grpo.algorithms.grpo as trainer
    import grpo.core.logprobs as logprobs
    from grpo.training.run import build_run

    run = build_run(cfg)
    if rows is not None:
        run.train_rows, run.sampler = rows, PromptSampler(len(rows), seed=cfg.seed)
    run.policy.to(device)  # in place: the optimiser holds the same Parameter objects
    engine_generate = run.engine.generate

    def generate(prompts, n, **kw):
        out = engine_generate(prompts, n, **kw)
        timers.tokens += sum(map(len, out.completion_ids))
        return out

    run.engine.generate = timers.wrap("generation", generate)
    run.engine.sync_weights = timers.wrap("weight_sync", run.engine.sync_weights)
    run.scorer = timers.wrap("scoring", run.scorer)
    run.backend.backward = timers.wrap("update", run.backend.backward)
    run.backend.step = timers.wrap("update", run.backend.step)
    # every forward of the step's log-probs goes through core.logprobs.forward_logprobs -> sequence_logprobs
    logprobs.sequence_logprobs = timers.wrap("logprobs", timers.count_scored(logprobs.sequence_logprobs))
    def step():
        return trainer.train_step(run, 1)

    step.run = run  # the run it steps (its policy, its engine)
    return step


def trl_reward(cfg):
    """Our configured reward functions, weighted and summed, under TRL's calling convention."""
    from rewards import RewardScorer, RewardSpec

    scorer = RewardScorer([RewardSpec(f.name, f.weight, dict(f.kwargs)) for f in cfg.reward.functions])

    def reward(prompts, completions, answer, **_):
        return scorer(prompts, completions, {"answer": answer}).total

    reward.__name__ = "reward"
    return reward


def build_trl(cfg, model_path: str, device: str, max_steps: int, timers: Timers, callbacks: list,
              rows: list[dict] | None = None, *, model=None, micro_batch: int | None = None, accumulation: int = 1,
              gradient_checkpointing: bool | None = None, continuous_batching: dict | None = None):
    """TRL's GRPOTrainer with the same settings; `trainer.train()` runs it. `rows`: as `build_ours`.
    `model`: the causal LM to train (default: loaded from `model_path`). `micro_batch` x `accumulation`: TRL's
    per_device_train_batch_size x gradient_accumulation_steps (default: the whole batch x 1).
    `gradient_checkpointing`: default `backend.gradient_checkpointing`. `continuous_batching`: generate with
    transformers' continuous batching, these `ContinuousBatchingConfig` settings (default: `generate`)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from grpo.data.loading import load_task
    from grpo.model.loading import load_tokenizer, pad_left

    r, a, o = cfg.rollout, cfg.algorithm, cfg.optim
    tokenizer = pad_left(load_tokenizer(model_path))  # as grpo.model.loading.load_policy
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.model.dtype))
    if rows is None:
        rows, _ = load_task(cfg.task, {"answer"})
    batch = cfg.train.prompts_per_step * a.group_size
    checkpointing = cfg.backend.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    generation = {} if continuous_batching is None else dict(use_transformers_continuous_batching=True,
                                                             transformers_continuous_batching_config=continuous_batching)
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), max_steps=max_steps, seed=cfg.seed,
        per_device_train_batch_size=micro_batch or batch, gradient_accumulation_steps=accumulation,
        num_generations=a.group_size,
        num_iterations=a.epochs, beta=a.beta, loss_type="dapo", epsilon=a.clip_low, epsilon_high=a.clip_high,
        max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
        generation_kwargs={"min_new_tokens": r.min_new_tokens} if r.min_new_tokens else None,
        learning_rate=o.lr, adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps,
        weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=10**9, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=device == "cpu", bf16=cfg.model.dtype == "bfloat16", dataloader_num_workers=0,
        gradient_checkpointing=checkpointing,  # TRL's default is on; the same work on both sides unless asked
        **generation,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward(cfg)], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=callbacks)
    generate = trainer._generate_single_turn

    def generate_counted(*args, **kwargs):
        completion_ids, logprobs = generate(*args, **kwargs)
        timers.tokens += sum(map(len, completion_ids))
        return completion_ids, logprobs

    trainer._generate_single_turn = timers.wrap("generation", generate_counted)
    trainer._calculate_rewards = timers.wrap("scoring", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timers.wrap(
        "logprobs", timers.count_scored(trainer._get_per_token_logps_and_entropies))
    trainer.accelerator.backward = timers.wrap("update", trainer.accelerator.backward)
    return trainer


# ---------------------------------------------------------------- measurement

def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    # VmHWM, not getrusage's ru_maxrss: a child started by fork + exec inherits its parent's peak
    # in ru_maxrss, which made the fresh-process memory runs report the parent's size.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB


def reset_peak_rss() -> None:
    """Set the peak resident set (VmHWM) to the current one, so later peaks are this run's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_alternating(args, cfg, model_path: str, rows: list[dict] | None = None) -> dict:
    """Warm-up steps, then TRL and ours alternately (`args`: warmup, steps, device, only); per-step
    records of each side. `rows`: as `build_ours`."""
    import torch
    from transformers import TrainerCallback

    device = args.device
    records = {"ours": [], "trl": []}
    ours_timers, trl_timers = Timers(device), Timers(device)
    only = args.only
    ours_step = build_ours(cfg, device, ours_timers, rows) if only in (None, "ours") else None
    steps = args.warmup + args.steps
    base_rss = {}

    def one_ours(record: bool):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ours_timers.sync()
        start = time.perf_counter()
        metrics = ours_step().metrics
        ours_timers.sync()
        total = time.perf_counter() - start
        phases, tokens = ours_timers.take()
        if record:
            records["ours"].append(dict(step_s=total, tokens=tokens, peak_mb=peak_memory_mb(device),
                                        logprob_abs_diff=metrics.get("rollout/logprob_abs_diff"), **phases))

    if only == "ours":
        for i in range(steps):
            if i == args.warmup:
                reset_peak_rss()
                base_rss["ours"] = current_rss_mb()
            one_ours(i >= args.warmup)
        return {"records": records, "base_rss": base_rss}

    class Alternate(TrainerCallback):
        """Times TRL's step from the end of our previous step, then runs one of ours."""

        def __init__(self):
            self.mark, self.step = None, 0
            self.optim_start = 0.0

        def on_train_begin(self, *a, **k):
            trl_timers.take()
            self.mark = time.perf_counter()

        def on_step_begin(self, *a, **k):
            if self.step == args.warmup and "trl" not in base_rss:
                reset_peak_rss()
                base_rss["trl"] = current_rss_mb()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()

        def on_pre_optimizer_step(self, *a, **k):
            trl_timers.sync()
            self.optim_start = time.perf_counter()

        def on_optimizer_step(self, *a, **k):
            trl_timers.sync()
            trl_timers.acc["update"] += time.perf_counter() - self.optim_start

        def on_step_end(self, *a, **k):
            trl_timers.sync()
            total = time.perf_counter() - self.mark
            phases, tokens = trl_timers.take()
            record = self.step >= args.warmup
            if record:
                records["trl"].append(dict(step_s=total, tokens=tokens, peak_mb=peak_memory_mb(device), **phases))
            if ours_step is not None:
                one_ours(record)
            self.step += 1
            trl_timers.take()
            self.mark = time.perf_counter()

    trainer = build_trl(cfg, model_path, device, steps, trl_timers, [Alternate()], rows)
    trainer.train()
    return {"records": records, "base_rss": base_rss}


def summarise(side_records: list[dict]) -> dict:
    if not side_records:
        return {}
    med = lambda key: statistics.median(r.get(key, 0.0) for r in side_records)  # noqa: E731
    times = sorted(r["step_s"] for r in side_records)
    out = {"step_s": med("step_s"), "step_min": times[0], "step_max": times[-1],
           "step_iqr": _iqr(times), "tokens": med("tokens")}
    for p in PHASES[:-1]:
        out[p] = med(p)
    out["other"] = statistics.median(r["step_s"] - sum(r.get(p, 0.0) for p in PHASES[:-1]) for r in side_records)
    out["scored_tokens"] = med("scored_tokens")
    out["tokens_per_s"] = out["tokens"] / out["step_s"]
    out["gen_tokens_per_s"] = out["tokens"] / out["generation"] if out["generation"] else float("nan")
    diffs = [r["logprob_abs_diff"] for r in side_records if r.get("logprob_abs_diff") is not None]
    if diffs:
        out["logprob_abs_diff"] = max(diffs)
    return out


def _iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return xs[-1] - xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def update_flops(model_path: str, tokens_in_update: float) -> float:
    """Model FLOPs of one update: 6 * parameters * tokens (forward 2, backward 4), attention left out."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    h, layers, inter = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    per_layer = h * h * 2 + 2 * h * kv + 3 * h * inter  # q, o, k, v, gate/up/down
    params = layers * per_layer + c.vocab_size * h  # the head (embedding lookups are free)
    return 6 * params * tokens_in_update



def mfu(flops: float, seconds: float) -> str:
    """`flops` in `seconds` as a fraction of this GPU's dense bf16 peak (`PEAK_TFLOPS`)."""
    import torch

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return f"{flops / seconds / (peak * 1e12):.1%} of {name}" if peak else f"unknown peak ({name})"
