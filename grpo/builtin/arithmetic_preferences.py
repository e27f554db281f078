"""The built-in preference set: the policy's own answers to arithmetic prompts, right against wrong.

Made offline, so the demo trains a reward model with no download:

1. sample `samples_per_prompt` completions from a policy (the warm-started tiny model) for `num_prompts`
   training problems of `grpo.builtin.arithmetic` (held-out problems are never used);
2. score them with the verifiable reward `math_accuracy`;
3. for each prompt with at least one right and one wrong answer, pair a right answer (chosen) with a wrong
   one (rejected): up to `pairs_per_prompt` pairs, each with a different wrong answer.

The pairs are the policy's own mistakes, which is what a reward model must rank during GRPO. The rows keep
the gold `answer`, so the set can also be scored with `math_accuracy`. The set is cached as JSONL, keyed by
the policy and every option.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from grpo.builtin.arithmetic import Arithmetic
from grpo.builtin.warmstart import cache_root
from grpo.model.loading import load_tokenizer, pad_left
from grpo.rollout.hf import HFRolloutEngine
from rewards import get_reward


@dataclass
class ArithmeticPreferences:
    num_prompts: int = 2000  # training problems to sample on (0: all of them)
    samples_per_prompt: int = 8  # completions sampled per problem
    pairs_per_prompt: int = 2  # pairs kept per problem at most, each with a different wrong answer
    temperature: float = 1.0  # sampling temperature
    max_new_tokens: int = 8  # longest completion, in tokens
    digits: int = 2  # task: operands have up to this many digits
    reverse: bool = True  # task: numbers written least significant digit first
    max_carries: int | None = None  # task: only sums with at most this many carries (None: every sum)
    seed: int = 0  # seed of problem choice, sampling and pairing


def pair_completions(
    prompt: str, completions: list[str], scores: list[float | None], pairs_per_prompt: int, rng: random.Random
) -> list[tuple[str, str]]:
    """(chosen, rejected) pairs for one prompt: a right completion (score 1) against a wrong one (score 0).

    Duplicates are merged first, so each pair has a distinct wrong answer; right answers are reused in turn.
    Empty completions and unscored ones (None) are left out. No pair when either side is missing.
    """
    right = sorted({c for c, s in zip(completions, scores) if s == 1.0 and c.strip()})
    wrong = sorted({c for c, s in zip(completions, scores) if s == 0.0 and c.strip()})
    if not right or not wrong:
        return []
    rng.shuffle(right)
    rng.shuffle(wrong)
    return [(right[i % len(right)], w) for i, w in enumerate(wrong[:pairs_per_prompt])]


def build_arithmetic_preferences(model_path: str | Path, spec: ArithmeticPreferences, log=print) -> list[dict]:
    """Sample from the policy at `model_path` and pair right against wrong answers (see the module docstring)."""
    rng = random.Random(spec.seed)
    rows = Arithmetic(digits=spec.digits, reverse=spec.reverse, max_carries=spec.max_carries).train_rows()
    if spec.num_prompts:
        rows = rng.sample(rows, min(spec.num_prompts, len(rows)))
    tokenizer = pad_left(load_tokenizer(str(model_path)))
    model = AutoModelForCausalLM.from_pretrained(str(model_path)).eval()
    engine = HFRolloutEngine(model, tokenizer, temperature=spec.temperature, max_new_tokens=spec.max_new_tokens,
                             return_logprobs=False)
    accuracy = get_reward("math_accuracy")
    torch.manual_seed(spec.seed)
    start = time.perf_counter()
    n = spec.samples_per_prompt
    out = engine.generate([r["prompt"] for r in rows], n=n)
    prompts = [r["prompt"] for r in rows for _ in range(n)]
    scores = accuracy(prompts, out.texts, answer=[r["answer"] for r in rows for _ in range(n)])
    pairs = []
    for i, row in enumerate(rows):
        group = slice(i * n, (i + 1) * n)
        for chosen, rejected in pair_completions(row["prompt"], out.texts[group], scores[group],
                                                 spec.pairs_per_prompt, rng):
            pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "answer": row["answer"]})
    right = sum(s == 1.0 for s in scores) / max(len(scores), 1)
    log(f"preference set: {len(pairs)} pairs from {len(rows)} prompts x {n} samples "
        f"({right:.1%} of samples right) in {time.perf_counter() - start:.0f}s")
    return pairs


def arithmetic_preferences(model_path: str | Path, spec: ArithmeticPreferences, cache_dir: str | Path | None = None,
                           log=print) -> Path:
    """Path of the cached JSONL preference set for this policy and `spec`, building it on first use."""
    model_path = Path(model_path).resolve()
    weights = model_path / "model.safetensors"
    stamp = {"model": str(model_path), "weights_bytes": weights.stat().st_size if weights.exists() else None,
             **asdict(spec)}
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir or cache_root()) / f"arithmetic-preferences-{key}.jsonl"
    if path.exists():
        return path
    pairs = build_arithmetic_preferences(model_path, spec, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tmp.rename(path)
    return path
