"""Supervised warm start of the built-in tiny model (cached, so it runs once per machine).

GRPO needs a policy that is sometimes right. A randomly initialised model never is, so the
demo first fits the tiny model to teacher demonstrations (`grpo.tasks.arithmetic`) with plain
next-token cross-entropy on the completion tokens. The result is saved as a transformers
directory under the cache, keyed by everything that determines it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from grpo.tasks.arithmetic import Arithmetic
from grpo.tiny import build_char_tokenizer, build_tiny_model


@dataclass
class WarmStart:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    drop_carry: float = 0.0
    num_problems: int = 0
    digits: int = 2
    reverse: bool = True
    seed: int = 0


def cache_root() -> Path:
    return Path(os.environ.get("GRPO_CACHE", Path.home() / ".cache" / "grpo"))


def _encode_pairs(tokenizer, pairs: list[tuple[str, str]]):
    """Right-padded ids with a loss mask on the completion and its end-of-sequence token."""
    rows, masks = [], []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + c)
        masks.append([0] * len(p) + [1] * len(c))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    loss_mask = torch.zeros(len(rows), width)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, : len(r)] = torch.tensor(r)
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
        attn[i, : len(r)] = 1
    return ids, attn, loss_mask


def train_warm_start(spec: WarmStart, log=print):
    """Fit a fresh tiny model to the teacher; returns (model, tokenizer)."""
    torch.manual_seed(spec.seed)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(
        len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, seed=spec.seed
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    task = Arithmetic(digits=spec.digits, reverse=spec.reverse)
    pairs = task.teacher_texts(spec.steps * spec.batch_size, spec.drop_carry, seed=spec.seed, num_problems=spec.num_problems)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / spec.steps, 1.0))))
    )
    model.train()
    start = time.perf_counter()
    for step in range(spec.steps):
        batch = pairs[step * spec.batch_size : (step + 1) * spec.batch_size]
        ids, attn, loss_mask = _encode_pairs(tokenizer, batch)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # [B, T-1, V]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
        mask = loss_mask[:, 1:]
        loss = (nll * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, spec.steps // 10) == 0:
            log(f"warm start {step + 1}/{spec.steps}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f}s")
    model.eval()
    return model, tokenizer


def warm_started_tiny(spec: WarmStart, log=print) -> Path:
    """Path of the warm-started tiny model for `spec`, training and caching it on first use."""
    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / f"tiny-arithmetic-{key}"
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    log(f"building the warm-started tiny model (once; cached at {path})")
    model, tokenizer = train_warm_start(spec, log=log)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "warm_start.json").write_text(json.dumps(asdict(spec), indent=2))
    tmp.rename(path) if not path.exists() else None
    return path
