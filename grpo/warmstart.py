"""Supervised warm start of the built-in tiny model (cached, so it runs once per machine).

GRPO needs a policy that is sometimes right. A randomly initialised model never is, so the
demo first fits the tiny model to an imperfect teacher's demonstrations (`grpo.tasks.arithmetic`)
with plain next-token cross-entropy on the completion tokens.

The warm start stops on a measured criterion, not after a fixed number of steps. Learning
addition has a plateau whose length depends on float rounding (the CPU's kernels, the seed): a
fixed budget stopped inside that transition lands on either side of it, machine by machine. So:

1. warm up, then train at a constant learning rate, checking every `check_every` steps the
   greedy answers' agreement with the teacher's most likely answer, on problems it was shown and
   on held-out problems, until both reach `anneal_at`: the model has left the plateau (or
   `max_steps` runs out: an error that names both figures);
2. anneal the learning rate linearly to zero over `anneal_steps`: at a constant rate the
   agreement of a model that has learned still swings by 0.1-0.3 from check to check, and the
   decay settles it rather than stopping wherever the last noisy step left it;
3. check the criterion, agreement at least `target` on both sets; below it is an error that
   names both figures.

The result is saved as a transformers directory under the cache, keyed by everything that
determines it, with `warm_start.json`: the criterion, the step at which it was met, the figures
and the wall time.
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

from grpo.tasks.arithmetic import Arithmetic, teacher_answer, teacher_mode, write
from grpo.tiny import build_char_tokenizer, build_tiny_model


class WarmStartError(RuntimeError):
    """The warm start did not reach its criterion within its budget."""


@dataclass
class WarmStart:
    max_steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    anneal_steps: int = 500
    check_every: int = 100
    anneal_at: float = 0.8
    target: float = 0.95
    drop_carry: float = 0.7
    num_problems: int = 0
    digits: int = 2
    reverse: bool = True
    seed: int = 0

    @classmethod
    def from_config(cls, ws, digits: int, reverse: bool) -> WarmStart:
        """The spec for a `WarmStartConfig` and the task's number format."""
        return cls(**{k: getattr(ws, k) for k in asdict(cls()) if hasattr(ws, k)}, digits=digits, reverse=reverse)


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


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions, cut at the end-of-sequence token (a row that never ends gets a "?" marker,
    so it matches no answer). The arithmetic prompts all have one length, so no padding is needed."""
    ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts])  # [N, P]
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        next_ids = model(input_ids=ids).logits[:, -1].argmax(-1)  # [N]
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
    model.train(was_training)
    out = []
    for row in ids[:, -max_new_tokens:].tolist():
        end = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else None
        out.append(tokenizer.decode(row[:end]) if end is not None else "?")
    return out


def teacher_agreement(model, tokenizer, task: Arithmetic, problems: list[tuple[int, int]], drop_carry: float) -> dict:
    """Share of `problems` whose greedy answer is the teacher's most likely answer (`agreement`),
    and share whose greedy answer is the true sum (`exact_match`)."""
    answers = greedy_answers(model, tokenizer, [task.prompt(a, b) for a, b in problems], task.digits + 2)
    modes = [write(teacher_mode(a, b, task.digits, drop_carry), task.reverse) for a, b in problems]
    sums = [write(a + b, task.reverse) for a, b in problems]
    n = len(problems)
    return {"agreement": sum(x == m for x, m in zip(answers, modes)) / n,
            "exact_match": sum(x == s for x, s in zip(answers, sums)) / n}


class TeacherFit:
    """A fresh tiny model, its optimiser and the teacher's problems: supervised steps on the teacher's
    answers, and the agreement check on 500 problems shown and 500 held out."""

    def __init__(self, spec: WarmStart):
        torch.manual_seed(spec.seed)
        self.spec, self.tokenizer = spec, build_char_tokenizer()
        tok = self.tokenizer
        self.model = build_tiny_model(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                      seed=spec.seed)
        self.model.generation_config.eos_token_id = tok.eos_token_id
        self.model.generation_config.pad_token_id = tok.pad_token_id
        self.task = Arithmetic(digits=spec.digits, reverse=spec.reverse)
        self.rng = random.Random(spec.seed)
        self.shown = self.task.train_problems()
        if spec.num_problems:
            self.shown = self.rng.sample(self.shown, spec.num_problems)
        self.check_shown = self.rng.sample(self.shown, min(500, len(self.shown)))
        self.check_held = self.rng.sample(self.task.held_out_problems(), 500)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.98))

    def step(self, lr: float) -> float:
        """One step of cross-entropy on the teacher's answers to a batch of problems shown; returns the loss."""
        spec, rng = self.spec, self.rng
        for group in self.opt.param_groups:
            group["lr"] = lr
        problems = [rng.choice(self.shown) for _ in range(spec.batch_size)]
        answers = [teacher_answer(a, b, spec.digits, spec.drop_carry, rng) for a, b in problems]
        pairs = [(self.task.prompt(a, b), write(answer, spec.reverse)) for (a, b), answer in zip(problems, answers)]
        ids, attn, loss_mask = _encode_pairs(self.tokenizer, pairs)
        logits = self.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # [B, T-1, V]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
        mask = loss_mask[:, 1:]
        loss = (nll * mask).sum() / mask.sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss.item()

    def check(self) -> tuple[dict, dict]:
        """Teacher agreement (and exact match) on the problems shown, and on held-out problems."""
        args = (self.model, self.tokenizer, self.task)
        return (teacher_agreement(*args, self.check_shown, self.spec.drop_carry),
                teacher_agreement(*args, self.check_held, self.spec.drop_carry))


def train_warm_start(spec: WarmStart, log=print):
    """Fit a fresh tiny model to the teacher until it meets the criterion; returns (model, tokenizer, report).

    Raises `WarmStartError` naming both agreement figures if `max_steps` pass without it."""
    fit = TeacherFit(spec)
    start = time.perf_counter()
    step_on, check = fit.step, fit.check
    fit.model.train()
    for step in range(spec.max_steps):
        loss = step_on(spec.lr * min(1.0, (step + 1) / spec.warmup_steps))
        if (step + 1) % spec.check_every == 0:
            on_shown, on_held = check()
            log(f"warm start step {step + 1}: loss {loss:.3f}, teacher agreement {on_shown['agreement']:.3f} shown "
                f"/ {on_held['agreement']:.3f} held out (anneals from {spec.anneal_at}), "
                f"{time.perf_counter() - start:.0f}s")
            if min(on_shown["agreement"], on_held["agreement"]) >= spec.anneal_at:
                anneal_step = step + 1
                break
    else:
        on_shown, on_held = check()  # the figures at the end of the budget, checked or not
        raise WarmStartError(
            f"warm start: after {spec.max_steps} steps (model.warm_start.max_steps) the greedy answers agree with "
            f"the teacher on {on_shown['agreement']:.3f} of the problems shown and {on_held['agreement']:.3f} of "
            f"held-out problems; annealing starts at {spec.anneal_at} on both (model.warm_start.anneal_at)")
    for i in range(spec.anneal_steps):
        step_on(spec.lr * (1 - (i + 1) / (spec.anneal_steps + 1)))
    on_shown, on_held = check()
    if min(on_shown["agreement"], on_held["agreement"]) < spec.target:
        raise WarmStartError(
            f"warm start: after annealing (steps {anneal_step + 1}-{anneal_step + spec.anneal_steps}) the greedy "
            f"answers agree with the teacher on {on_shown['agreement']:.3f} of the problems shown and "
            f"{on_held['agreement']:.3f} of held-out problems; the criterion (model.warm_start.target) is "
            f"{spec.target} on both")
    fit.model.eval()
    met_step = anneal_step + spec.anneal_steps
    report = {"criterion": f"teacher agreement >= {spec.target} on problems shown and held out",
              "anneal_step": anneal_step, "met_step": met_step, "steps": met_step,
              "shown_agreement": on_shown["agreement"], "held_out_agreement": on_held["agreement"],
              "held_out_exact_match": on_held["exact_match"], "wall_s": round(time.perf_counter() - start, 1)}
    log(f"warm start met its criterion at step {met_step} (annealed from step {anneal_step}): agreement "
        f"{report['shown_agreement']:.3f} shown / {report['held_out_agreement']:.3f} held out, held-out exact match "
        f"{report['held_out_exact_match']:.3f}, {report['wall_s']:.0f}s")
    return fit.model, fit.tokenizer, report


def warm_started_tiny(spec: WarmStart, log=print) -> Path:
    """Path of the warm-started tiny model for `spec`, training and caching it on first use."""
    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / f"tiny-arithmetic-{key}"
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    log(f"building the warm-started tiny model (once; cached at {path})")
    model, tokenizer, report = train_warm_start(spec, log=log)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "warm_start.json").write_text(json.dumps({"spec": asdict(spec), "kernels": kernel_path(),
                                                     **report}, indent=2))
    tmp.rename(path) if not path.exists() else None
    return path


def warm_start_report(model_path: str | Path) -> dict:
    """What `warm_started_tiny` recorded about how the model at `model_path` was built ({} if nothing)."""
    file = Path(model_path) / "warm_start.json"
    return json.loads(file.read_text()) if file.exists() else {}


def kernel_path() -> str:
    """The CPU kernel path torch runs on: ATEN_CPU_CAPABILITY's value, or the CPU's best."""
    return torch.backends.cpu.get_cpu_capability().lower()
