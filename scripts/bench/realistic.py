"""Our GRPO against TRL's `GRPOTrainer` at realistic lengths: ~200-token prompts, G=8, long-tailed completions.

    python -m scripts.bench.realistic                          # CPU, the fixed default workload below
    python -m scripts.bench.realistic --out realistic.json     # the results as JSON too
    python -m scripts.bench.realistic --phases generation      # one phase (training, generation, step)
    python -m scripts.bench.realistic --packing sequences      # our side's backend.packing, where the config has it
    python -m scripts.bench.realistic --device cuda --model qwen2.5-1.5b  # bf16, sdpa attention, MFU

`scripts.bench.step_vs_trl` times 8 prompts of 9 tokens x 8 completions of exactly 32 tokens on a 1.1M-parameter
model; a real GRPO batch is long prompts shared by G completions whose lengths are long-tailed. Here:

- The model: Qwen2-shaped, random weights, built here (no download). `small` (the default): hidden 512, 8 layers,
  8 query / 2 key-value heads, intermediate 1408, vocabulary 32,000, tied embeddings: 39.0M parameters, float32
  on CPU. `qwen2.5-1.5b` / `qwen2.5-0.5b`: Qwen2.5's shapes, bf16 (meant for `--device cuda`).
- The workload, fixed by `--seed`: `--prompts` prompts (4) of `--prompt-len` +-10% tokens (200), G = `--group` (8)
  completions each, lengths log-normal (median `--median` 60, sigma `--sigma` 1.0), capped at `--max-new-tokens`
  (512; a completion that reaches it has no EOS, as a truncated one). The drawn lengths' percentiles are printed.
  Advantages: random rewards standardised within each group.

Phases, ours and TRL alternated in one process (the machine may be shared: load from elsewhere hits both alike;
read the ratios of one run), medians over `--reps`:

- training: log-probs + loss + backward + optimiser step on the same B*G sequences. Ours:
  `grpo.training.update.update_policy` on a `RolloutBatch` from `grpo.core.batch.layout_batch`, torch backend
  (`backend.micro_batch_tokens` micro-batches).
  TRL: `GRPOTrainer.compute_loss` on the inputs dict its `_generate_and_score_completions` would hand it (prompt
  left-padded, completions right-padded: the same tensors, split at the prompt width), then
  `accelerator.backward`, gradient clipping and its optimiser's step, as its training loop does. Same settings as
  `step_vs_trl`: loss_type dapo (token mean over the batch) on both, beta 0, one pass (no old-log-prob forward),
  no activation checkpointing on either side, the same dtype, AdamW (fused on both), the same clipping.
- generation: generated tokens per second of `grpo.rollout.hf.HFRolloutEngine` against transformers' `generate`
  (`num_return_sequences=G`, TRL's path without vLLM) on the same prompts, temperature 1, no top-k / top-p.
- step: the whole GRPO step, generation + scoring + training, `grpo.algorithms.grpo.train_step` against
  `GRPOTrainer.train()`, as `step_vs_trl` runs them (`scripts.bench.common.run_alternating`), on these prompts.
  The reward is our `length` reward (a length penalty, so groups have non-zero spread).
- memory: peak memory of the training phase of each side alone in a fresh process: on CPU the growth of the
  resident set (VmHWM) over one step after a warm-up step (weights and optimiser states already allocated; it
  counts freed memory malloc keeps); on CUDA `max_memory_allocated` over that step (weights and states included).

Completion lengths when sampling. A random-weights model never picks EOS often enough to stop on its own, so
both sides sample from the model with one change, made by a forward hook on the causal LM (`EosHazard`): when
gradients are off, the last position's EOS logit is set so that the probability of EOS as the k-th generated
token is the log-normal's hazard at k, P(L = k | L >= k), the others keeping their relative probabilities
(padding gets none: our engine never samples it, and now neither does `generate`).
The k-th token is counted from the padded prompt width by the KV cache's length, the same for all rows, so
the hook needs no per-row state and works unchanged when our engine drops finished rows. Lengths then follow the
workload's distribution on both sides, each row stopping by its own draw; it is exact at temperature 1. A
per-row stopping length would need each loop to know which row is which, which `generate` does not expose.
The hook costs one log-sum-exp over the vocabulary per step, on both sides alike. Training forwards run with
gradients, so the hook leaves them alone.

Packing: `--packing` sets our config's `backend.packing` (padded, sequences, groups, or auto: the layout a run would
choose for the model's attention, resolved once before anything is timed and reported as that layout) where
`BackendConfig` has that field, and passes it to `update_policy` if that takes it; without the field only `padded`
runs. Its default stays `padded`, the layout the figures in docs/benchmarks.md without `--packing` were measured in.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from unittest import mock

import torch
from hydra import compose, initialize_config_dir

import grpo.core.logprobs as core_logprobs
import grpo.training.update as update
from grpo.builtin.tiny import CHARS
from grpo.config import CONFIG_DIR, BackendConfig, register_configs, to_config
from grpo.core.batch import RolloutBatch, layout_batch
from grpo.model.loading import load_policy
from grpo.rollout.hf import HFRolloutEngine
from grpo.training.run import build_policy_backend, check_packing
from scripts.bench.common import (
    MODEL_SHAPES,
    ROOT,
    Timers,
    build_trl,
    current_rss_mb,
    mfu,
    peak_memory_mb,
    random_model_dir,
    reset_peak_rss,
    run_alternating,
    summarise,
)

SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048)  # 39.0M parameters
MINI = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048)  # the smoke test's
MODELS = {"small": SMALL, "mini": MINI, **MODEL_SHAPES}
TRAIN_PHASES = ("logprobs", "update", "optimiser", "other")  # update: backward
# What the benchmark reports as met or missed.
TARGETS = {"training_speedup": 2.0, "step_speedup": 1.5, "training_memory_ratio": 0.6}
FIRST_CHAR_ID = 3  # pad, eos, unk come first in the benchmark tokenizer (scripts.bench.common.random_model_dir)


# ---------------------------------------------------------------- the workload

@dataclass
class Workload:
    """B prompts, G completions each (rows prompt-major), as token ids; the same for both sides."""

    prompt_ids: list[list[int]]  # [B]
    completion_ids: list[list[int]]  # [B*G], ending in EOS unless they reached the cap
    advantages: list[float]  # [B*G]
    group_size: int


def completion_length(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    """A draw of L = ceil(X), X log-normal; above `cap` the completion is cut at `cap` (no EOS)."""
    return min(cap, max(1, math.ceil(rng.lognormvariate(math.log(median), sigma))))


def make_workload(args, vocab_size: int, eos: int) -> Workload:
    """The fixed synthetic batch of `args` (seeded): prompts of printable characters (they decode to text and
    back), completions of any non-special token, EOS last unless cut at the cap."""
    rng, B, G, cap = random.Random(args.seed), args.prompts, args.group, args.max_new_tokens
    lo, hi = round(0.9 * args.prompt_len), round(1.1 * args.prompt_len)
    prompts = [[rng.randrange(FIRST_CHAR_ID, FIRST_CHAR_ID + len(CHARS)) for _ in range(rng.randint(lo, hi))]
               for _ in range(B)]
    completions = []
    for _ in range(B * G):
        n = completion_length(rng, args.median, args.sigma, cap)
        body = [rng.randrange(FIRST_CHAR_ID, vocab_size) for _ in range(n)]
        completions.append(body if n == cap else body[:-1] + [eos])
    rewards = [rng.gauss(0.0, 1.0) for _ in range(B * G)]
    advantages = []
    for g in range(B):
        group = rewards[g * G : (g + 1) * G]
        mean, std = statistics.fmean(group), statistics.pstdev(group)
        advantages += [(r - mean) / (std + 1e-4) for r in group]
    return Workload(prompts, completions, advantages, G)


def percentiles(lengths: list[int]) -> dict:
    q = statistics.quantiles(lengths, n=100, method="inclusive")
    return {"min": min(lengths), "p10": q[9], "p50": q[49], "p90": q[89], "p99": q[98], "max": max(lengths),
            "mean": statistics.fmean(lengths)}


# ---------------------------------------------------------------- long-tailed stopping when sampling

def eos_hazard(median: float, sigma: float, cap: int) -> list[float]:
    """P(L = k | L >= k) for k = 1..cap, L = ceil(X), X log-normal(log median, sigma)."""
    def cdf(x: float) -> float:
        return 0.0 if x <= 0 else 0.5 * (1 + math.erf((math.log(x) - math.log(median)) / (sigma * math.sqrt(2))))

    return [min(max((cdf(k) - cdf(k - 1)) / max(1 - cdf(k - 1), 1e-300), 1e-12), 1 - 1e-7) for k in range(1, cap + 1)]


class EosHazard:
    """While entered: every causal LM's sampling forward (gradients off) gets the EOS logit of its last position
    set so that P(EOS as generated token k) = `hazard[k-1]` (module docstring)."""

    def __init__(self, eos: int, pad: int, hazard: list[float]):
        self.eos, self.pad = eos, pad
        self.log_odds = [math.log(h) - math.log1p(-h) for h in hazard]
        self.width = 0  # the padded prompt width of the current generation (seen at its prefill)

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(self.hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def hook(self, module, args, kwargs, output):
        logits, cache = getattr(output, "logits", None), getattr(output, "past_key_values", None)
        ids = kwargs.get("input_ids")
        if torch.is_grad_enabled() or logits is None or cache is None or ids is None:
            return None
        if ids.shape[1] > 1:  # a prefill: the prompt's padded width; decode steps feed one token
            self.width = ids.shape[1]
        # tokens generated so far: the cache holds the prompt and every fed token (`generate` leaves an
        # all-ones attention mask out, so the mask cannot tell)
        k = min(cache.get_seq_length() - self.width, len(self.log_odds) - 1)
        last = logits[:, -1]  # [R, V] a view: written in place
        last[:, self.pad] = float("-inf")  # never sampled (our engine suppresses it too): P(EOS) is exact on both
        rest = last.float()
        rest[:, self.eos] = float("-inf")
        last[:, self.eos] = (rest.logsumexp(-1) + self.log_odds[k]).to(last.dtype)
        return None


# ---------------------------------------------------------------- settings and model

def bench_config(args, model_path: str, run_dir: str):
    """`bench=cpu` with this workload's sizes, our length reward, `backend.packing` where it exists."""
    overrides = ["bench=cpu", f"run_dir={run_dir}", f"train.prompts_per_step={args.prompts}",
                 f"algorithm.group_size={args.group}", f"rollout.max_new_tokens={args.max_new_tokens}",
                 "rollout.min_new_tokens=0", f"model.dtype={args.dtype}", "rollout.batch_size=4096",
                 "reward.functions=[{name: length, weight: 1.0, kwargs: {max_length: 8192, buffer: 8192}}]"]
    if "packing" in {f.name for f in dataclasses.fields(BackendConfig)}:
        overrides.append(f"backend.packing={args.packing}")
    elif args.packing != "padded":
        raise SystemExit(f"--packing {args.packing}: this checkout's BackendConfig has no `packing` field; "
                         f"only --packing padded runs here")
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=overrides))
    cfg.model.builtin, cfg.model.path = None, model_path
    return cfg


def count_parameters(model_path: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once


# ---------------------------------------------------------------- training phase

def our_training_step(cfg, model_path: str, batch: RolloutBatch, device: str, timers: Timers):
    """Ours: `update_policy` on the batch, torch backend; returns a zero-argument step."""
    policy, _ = load_policy(model_path, cfg)
    policy.to(device)
    backend = build_policy_backend(cfg, policy)
    backend.backward = timers.wrap("update", backend.backward)
    backend.step = timers.wrap("optimiser", backend.step)
    kwargs = dict(temperature=cfg.rollout.temperature, micro_batch_tokens=cfg.backend.micro_batch_tokens,
                  max_new_tokens=cfg.rollout.max_new_tokens)
    if "packing" in inspect.signature(update.update_policy).parameters:
        kwargs["packing"] = cfg.backend.packing
    logprobs = timers.wrap("logprobs", timers.count_scored(core_logprobs.sequence_logprobs))

    def step():  # the update's forwards go through core.logprobs.forward_logprobs -> sequence_logprobs
        with mock.patch.object(core_logprobs, "sequence_logprobs", logprobs):
            return update.update_policy(backend, batch, cfg.algorithm, **kwargs)
    return step


def trl_inputs(batch: RolloutBatch, device: str) -> dict:
    """The inputs dict TRL's `_compute_loss` reads, from the same tensors (split at the prompt width)."""
    P = batch.prompt_width
    mask = batch.attention_mask
    inputs = {"prompt_ids": batch.input_ids[:, :P], "prompt_mask": mask[:, :P],
              "completion_ids": batch.input_ids[:, P:], "completion_mask": mask[:, P:],
              "advantages": batch.advantages, "num_items_in_batch": mask[:, P:].sum()}
    return {k: v.to(device) for k, v in inputs.items()}


def trl_training_step(cfg, model_path: str, batch: RolloutBatch, device: str, timers: Timers, rows: list[dict]):
    """TRL: `compute_loss`, `accelerator.backward`, clipping and the optimiser's step, as its training loop
    runs them; returns a zero-argument step."""
    trainer = build_trl(cfg, model_path, device, 100, timers, [], rows)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1  # set by its training loop, read by the dapo loss
    model, inputs, clip = trainer.model, trl_inputs(batch, device), trainer.args.max_grad_norm

    def step():
        model.train()
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs)
        trainer.accelerator.backward(loss)
        timers.sync()
        start = time.perf_counter()
        trainer.accelerator.clip_grad_norm_(model.parameters(), clip)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        timers.sync()
        timers.acc["optimiser"] += time.perf_counter() - start
        return float(loss.detach())
    return step


def training_sides(side, cfg, model_path, workload, device, rows) -> dict:
    """{side: (step, timers)} for `side` (ours, trl or None: both)."""
    batch = layout_batch(workload.prompt_ids, workload.completion_ids, workload.group_size,
                         pad_id=0)  # the benchmark tokenizer's pad
    batch.advantages = torch.tensor(workload.advantages)
    out = {}
    for name, build in (("ours", our_training_step), ("trl", trl_training_step)):
        if side in (None, name):
            timers = Timers(device)
            extra = (rows,) if name == "trl" else ()
            out[name] = (build(cfg, model_path, batch, device, timers, *extra), timers)
    return out


def timed(step, timers: Timers) -> dict:
    timers.take()
    timers.sync()
    start = time.perf_counter()
    step()
    timers.sync()
    total = time.perf_counter() - start
    phases, _ = timers.take()
    phases["other"] = total - sum(phases.get(p, 0.0) for p in TRAIN_PHASES[:-1])
    return {"step_s": total, **phases}


def training_phase(args, cfg, model_path, workload, rows) -> dict:
    """Warm-up, then ours and TRL alternately, `--reps` times; medians per side."""
    sides = training_sides(None, cfg, model_path, workload, args.device, rows)
    records = {name: [] for name in sides}
    for rep in range(args.warmup + args.reps):
        for name, (step, timers) in sides.items():
            record = timed(step, timers)
            if rep >= args.warmup:
                records[name].append(record)
    real = sum(len(p) for p in workload.prompt_ids) * workload.group_size + sum(map(len, workload.completion_ids))
    out = {}
    for name, recs in records.items():
        out[name] = {k: statistics.median(r.get(k, 0.0) for r in recs) for k in ("step_s", *TRAIN_PHASES)}
        out[name]["steps"] = [r["step_s"] for r in recs]
        out[name]["positions"] = statistics.median(r.get("scored_tokens", 0) for r in recs)  # forward, padded or packed
        out[name]["tokens_per_s"] = real / out[name]["step_s"]
    out["real_tokens"] = real
    return out


def training_memory(side: str, args, cfg, model_path, workload, rows) -> dict:
    """Run in a fresh process (`--only-train`): one warm-up step, then the peak of one more."""
    (step, timers), = training_sides(side, cfg, model_path, workload, args.device, rows).values()
    step()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    base = current_rss_mb()
    step()
    peak = peak_memory_mb(args.device)
    return {"side": side, "peak_mb": peak if args.device == "cuda" else peak - base}


def memory_in_fresh_process(side: str, args) -> float:
    keep = ("model", "device", "dtype", "seed", "prompts", "group", "prompt_len", "median", "sigma",
            "max_new_tokens", "packing", "threads")
    cmd = [sys.executable, "-m", __spec__.name, "--only-train", side]
    cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keep]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"memory run of {side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


# ---------------------------------------------------------------- generation phase

def generation_phase(args, model_path: str, workload: Workload, hazard: EosHazard) -> dict:
    """Tokens per second of our engine and of `generate`, alternated, `--gen-rounds` rounds after `--warmup`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(model_path)
    G, cap, eos = workload.group_size, args.max_new_tokens, tok.eos_token_id
    engine = HFRolloutEngine(model, tok, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=cap, batch_size=4096)
    enc = tok.pad([{"input_ids": p} for p in workload.prompt_ids], padding_side="left", return_tensors="pt")
    enc = {k: v.to(args.device) for k, v in enc.items()}

    def ours() -> list[int]:
        return [len(c) for c in engine.generate_from_ids(workload.prompt_ids, G).completion_ids]

    @torch.no_grad()
    def reference() -> list[int]:
        new = model.generate(**enc, do_sample=True, num_return_sequences=G, max_new_tokens=cap, temperature=1.0,
                             top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id, eos_token_id=eos)
        new = new[:, enc["input_ids"].shape[1]:].tolist()
        return [row.index(eos) + 1 if eos in row else len(row) for row in new]

    records = {"ours": [], "generate": []}
    torch.manual_seed(args.seed)
    with hazard:
        for rnd in range(args.warmup + args.gen_rounds):
            for name, fn in (("ours", ours), ("generate", reference)):
                start = time.perf_counter()
                lengths = fn()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                if rnd >= args.warmup:
                    records[name].append((time.perf_counter() - start, lengths))
    out = {}
    for name, recs in records.items():
        lengths = [n for _, ls in recs for n in ls]
        out[name] = {"tokens_per_s": sum(lengths) / sum(s for s, _ in recs),
                     "seconds_per_round": statistics.median(s for s, _ in recs), "lengths": percentiles(lengths)}
    return out


# ---------------------------------------------------------------- the whole step

def step_phase(args, cfg, model_path: str, rows: list[dict], hazard: EosHazard) -> dict:
    """`grpo.algorithms.grpo.train_step` against `GRPOTrainer.train()`, alternated (`common.run_alternating`)."""
    run_args = types.SimpleNamespace(warmup=args.warmup, steps=args.step_reps, device=args.device, only=None)
    with hazard:
        result = run_alternating(run_args, cfg, model_path, rows)
    return {"ours": summarise(result["records"]["ours"]), "trl": summarise(result["records"]["trl"])}


# ---------------------------------------------------------------- report

def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(results: dict) -> None:
    """The table: per phase ours, TRL, and TRL / ours (for times, above 1 where ours is faster); then the ratios
    against `TARGETS`."""
    print(f"\n{'':34s}{'ours':>12s}{'TRL':>12s}{'TRL/ours':>10s}")

    def row(label, a, b, fmt="{:.3f}"):
        print(f"{label:34s}{fmt.format(a):>12s}{fmt.format(b):>12s}{ratio(b, a):10.2f}")

    t = results.get("training")
    if t:
        o, x = t["ours"], t["trl"]
        row("training step (s, median)", o["step_s"], x["step_s"])
        for phase, label in zip(TRAIN_PHASES, ("  forward, log-probs (s)", "  backward (s)", "  optimiser step (s)",
                                               "  other: loss, batching (s)")):
            row(label, o[phase], x[phase])
        row("  forward positions", o["positions"], x["positions"], "{:.0f}")
        row("  tokens / s (real tokens)", o["tokens_per_s"], x["tokens_per_s"], "{:.0f}")
        if "peak_mb" in o:
            row("  peak memory (MiB)", o["peak_mb"], x["peak_mb"], "{:.0f}")
    g = results.get("generation")
    if g:
        o, x = g["ours"], g["generate"]
        row("generation, generate (tokens/s)", o["tokens_per_s"], x["tokens_per_s"], "{:.0f}")
        row("  seconds per round", o["seconds_per_round"], x["seconds_per_round"])
    s = results.get("step")
    if s:
        o, x = s["ours"], s["trl"]
        row("whole step (s, median)", o["step_s"], x["step_s"])
        for phase in ("generation", "scoring", "logprobs", "update", "weight_sync", "other"):
            row(f"  {phase} (s)", o[phase], x[phase])
        row("  generated tokens / step", o["tokens"], x["tokens"], "{:.0f}")
    if g:
        print(f"generation speed-up (ours / generate tokens per second): "
              f"{ratio(g['ours']['tokens_per_s'], g['generate']['tokens_per_s']):.2f}x")
    for key, value in results["ratios"].items():
        target = TARGETS[key]
        sign = "<=" if key.endswith("memory_ratio") else ">="
        print(f"{key}: {value:.2f} (target {sign} {target})")


def ratios(results: dict) -> dict:
    out = {}
    if "training" in results:
        t = results["training"]
        out["training_speedup"] = ratio(t["trl"]["step_s"], t["ours"]["step_s"])
        if "peak_mb" in t["ours"]:
            out["training_memory_ratio"] = ratio(t["ours"]["peak_mb"], t["trl"]["peak_mb"])
    if "step" in results:
        out["step_speedup"] = ratio(results["step"]["trl"]["step_s"], results["step"]["ours"]["step_s"])
    return out


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default="small", choices=sorted(MODELS), help="random-weight Qwen2 shape")
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--seed", type=int, default=0, help="the workload's and the sampling's seed")
    p.add_argument("--prompts", type=int, default=4, help="B: prompts per batch")
    p.add_argument("--group", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--prompt-len", type=int, default=200, help="prompt tokens, +-10%%")
    p.add_argument("--median", type=float, default=60.0, help="median completion length")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of the completion lengths")
    p.add_argument("--max-new-tokens", type=int, default=512, help="completion cap")
    p.add_argument("--packing", default="padded", choices=("padded", "sequences", "groups", "auto"),
                   help="our backend.packing (where the config has it); auto: the layout a run would choose")
    p.add_argument("--phases", default="training,generation,step", help="comma-separated subset")
    p.add_argument("--reps", type=int, default=3, help="timed training steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps, generation rounds, whole steps first")
    p.add_argument("--gen-rounds", type=int, default=2, help="timed generation rounds per side")
    p.add_argument("--step-reps", type=int, default=2, help="timed whole steps per side")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--out", help="write the results here as JSON")
    p.add_argument("--only-train", choices=("ours", "trl"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False (no GPU, or a CPU-only torch build)")
    unknown = set(args.phases.split(",")) - {"training", "generation", "step"}
    if unknown:
        raise SystemExit(f"--phases: unknown {sorted(unknown)}; choose from training, generation, step")
    return args


@contextlib.contextmanager
def quiet_process(args):
    """Quiet logs and the benchmark's torch threads while it runs; the process's settings restored after (a test
    that calls `main` leaves the logging and threads of the tests after it as they were)."""
    import transformers

    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    wandb_mode = os.environ.get("WANDB_MODE")
    os.environ.setdefault("WANDB_MODE", "disabled")
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        transformers.logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)
        if wandb_mode is None:
            os.environ.pop("WANDB_MODE", None)


def setup(args) -> tuple:
    """The model directory, config, workload and dataset rows."""
    model_path = random_model_dir(f"realistic-{args.model}", args.dtype, MODELS[args.model])
    cfg = bench_config(args, model_path, tempfile.mkdtemp(prefix="grpo-bench-"))
    if args.packing == "auto":  # resolved as a run resolves it, so the report and the memory runs name the layout
        check_packing(cfg, load_policy(model_path, cfg)[0])
        args.packing = cfg.backend.packing
    vocab = MODELS[args.model]["vocab_size"]
    workload = make_workload(args, vocab, eos=1)  # the benchmark tokenizer's EOS
    text = dict(enumerate(["<pad>", "<eos>", "<unk>", *CHARS]))
    rows = [{"prompt": "".join(text[i] for i in p), "answer": ""} for p in workload.prompt_ids]
    return model_path, cfg, workload, rows


def run_phases(args, cfg, model_path, workload, rows, results: dict) -> dict:
    """The chosen phases into `results`, written to `--out` after each (a run cut short keeps what it measured)."""
    phases = args.phases.split(",")
    hazard = EosHazard(eos=1, pad=0, hazard=eos_hazard(args.median, args.sigma, args.max_new_tokens))
    if "training" in phases:
        results["training"] = training_phase(args, cfg, model_path, workload, rows)
        save(args, results)
        if not args.no_memory:
            for side in ("ours", "trl"):
                results["training"][side]["peak_mb"] = memory_in_fresh_process(side, args)
            save(args, results)
    if "generation" in phases:
        results["generation"] = generation_phase(args, model_path, workload, hazard)
        save(args, results)
    if "step" in phases:
        results["step"] = step_phase(args, cfg, model_path, rows, hazard)
    if args.device == "cuda" and "training" in results:
        flops = 6 * count_parameters(model_path) * results["training"]["real_tokens"]
        for side in ("ours", "trl"):
            results["training"][side]["mfu"] = mfu(flops, results["training"][side]["step_s"])
    results["ratios"] = ratios(results)
    save(args, results)
    return results


def save(args, results: dict) -> None:
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with quiet_process(args):
        return measure(args)


def measure(args) -> dict:
    """The benchmark `args` asks for: printed, and returned as `--out` writes it."""
    model_path, cfg, workload, rows = setup(args)
    if args.only_train:
        print(json.dumps(training_memory(args.only_train, args, cfg, model_path, workload, rows)))
        return {}
    lengths = [len(c) for c in workload.completion_ids]
    params = count_parameters(model_path)
    print(f"model {args.model}: {params / 1e6:.1f}M parameters, {args.dtype}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '')}"
          f" ({torch.backends.cpu.get_cpu_capability()}), packing {args.packing}")
    print(f"workload: {args.prompts} prompts of {[len(p) for p in workload.prompt_ids]} tokens x {args.group}; "
          f"completion lengths {fmt_percentiles(percentiles(lengths))}")
    results = {"args": vars(args), "parameters": params, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "workload_lengths": percentiles(lengths)}
    run_phases(args, cfg, model_path, workload, rows, results)
    report(results)
    if "generation" in results:
        print(f"sampled lengths: ours {fmt_percentiles(results['generation']['ours']['lengths'])}; "
              f"generate {fmt_percentiles(results['generation']['generate']['lengths'])}")
    if args.device == "cuda" and "training" in results:
        for side in ("ours", "trl"):
            print(f"{side}: training step MFU {results['training'][side]['mfu']}")
    return results


def fmt_percentiles(p: dict) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in p.items())


if __name__ == "__main__":
    main()
