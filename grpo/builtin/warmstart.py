"""Supervised warm start of the built-in tiny model (cached, so it runs once per machine).

GRPO needs a policy that is sometimes right. A randomly initialised model never is, so the
demo first fits the tiny model to an imperfect teacher's demonstrations (`grpo.builtin.arithmetic`)
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
3. check the criterion, agreement at least `target` on both sets. Annealing can, rarely, leave
   the model worse than the check that started it (measured: the tools demo's seed 2 on the avx2
   path went from 0.98 / 0.97 to 0.865 / 0.770); then the weights of that check are kept if they
   meet the criterion. Below it on both is an error that names the figures.

Two teachers (`kind`):

- "answer" (the demo's): the teacher answers `a+b=` itself, dropping an overflowing leading digit
  `drop_carry` of the time (`grpo.builtin.arithmetic`); agreement is the greedy answer being the
  teacher's most likely one.
- "tools" (the tool-use demo's): the demonstrations are whole calculator episodes, rendered and
  tokenised by the functions that run episodes at train time (`grpo.rollout.episodes`), so the model
  is fitted on exactly the contexts it will meet. On a problem the teacher either calls
  `calculate("a*b")` and writes the tool's result as its answer, or answers in its head (the true
  result: a small model fitted to it gets it wrong). It calls the calculator with probability
  `tool_rate` on problems of one kind and `1 - tool_rate` on the others
  (`grpo.builtin.arithmetic.calls_calculator`). Agreement is a greedy episode doing what the teacher
  mostly does: on the first kind, one call with the problem's expression and the tool's result copied
  as the answer; on the others, a number without a call. Checked on 200 problems shown and 200 held
  out (each a greedy episode of up to two turns).

The result is saved as a transformers directory under the cache, keyed by everything that
determines it, with `warm_start.json`: the criterion, the step at which it was met, the figures
and the wall time.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from grpo.builtin.arithmetic import Arithmetic, calls_calculator, teacher_answer, teacher_mode, write
from grpo.builtin.tiny import build_char_tokenizer, build_tiny_model
from grpo.envs.calculator import calculator_environment
from grpo.rollout.episodes import run_episodes, start_episode, take_turn
from grpo.rollout.hf import HFRolloutEngine

# The tools warm start's vocabulary beyond characters: the chat markup and the calculator call's fixed parts as
# whole tokens. In characters an episode is ~156 tokens and copying an operand spans ~60 of them; with these it
# is ~45, which is what makes the copy learnable in minutes on a CPU.
TOOL_WORDS = ("<tool_call>", "</tool_call>", '{"name":"calculate","arguments":{"expression":"', '"}}', "<tools>",
              "</tools>", "calculate", "<user>", "<assistant>", "<tool>")
# The calculator episodes of the "tools" warm start's checks; configs/experiment/tools_demo.yaml trains with
# the same (a call is ~80 tokens, its result ~20, the answer ~6).
TOOL_EPISODE = {"max_turns": 2, "max_new_tokens": 96, "max_episode_tokens": 128}


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
    drops: str = "overflow"  # which carries the teacher forgets (`grpo.builtin.arithmetic.teacher_answer`)
    num_problems: int = 0
    digits: int = 2
    reverse: bool = True
    seed: int = 0
    kind: str = "answer"  # a key of FITS: the teacher answers, or calls the calculator
    op: str = "+"
    digits_b: int = 0
    tool_rate: float = 0.8
    max_positions: int = 64
    max_carries: int | None = None  # the task's: the teacher shows only sums with at most this many carries

    @classmethod
    def from_config(cls, ws, digits: int, reverse: bool, op: str = "+", digits_b: int = 0,
                    max_carries: int | None = None) -> WarmStart:
        """The spec for a `WarmStartConfig` and the task's problems and number format."""
        return cls(**{k: getattr(ws, k) for k in asdict(cls()) if hasattr(ws, k)}, digits=digits, reverse=reverse,
                   op=op, digits_b=digits_b, max_carries=max_carries)

    def key(self) -> dict:
        """What determines the model: every field, less those added since the first cache at their defaults (so
        a cached model keeps its key)."""
        since = {"drops": "overflow", "max_carries": None}
        return {k: v for k, v in asdict(self).items() if k not in since or v != since[k]}


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
    return _pad(tokenizer, rows, masks)


def _pad(tokenizer, rows: list[list[int]], masks: list[list[int]]):
    """Right-padded ids [B, T], attention mask [B, T] and loss mask [B, T] of token rows and their masks."""
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


def teacher_agreement(model, tokenizer, task: Arithmetic, problems: list[tuple[int, int]], drop_carry: float,
                      drops: str = "overflow") -> dict:
    """Share of `problems` whose greedy answer is the teacher's most likely answer (`agreement`),
    and share whose greedy answer is the true sum (`exact_match`)."""
    answers = greedy_answers(model, tokenizer, [task.prompt(a, b) for a, b in problems], task.digits + 2)
    modes = [write(teacher_mode(a, b, task.digits, drop_carry, drops), task.reverse) for a, b in problems]
    sums = [write(a + b, task.reverse) for a, b in problems]
    n = len(problems)
    return {"agreement": sum(x == m for x, m in zip(answers, modes)) / n,
            "exact_match": sum(x == s for x, s in zip(answers, sums)) / n}


class Fit:
    """A fresh tiny model, its AdamW, the task's problems shown (all, or `num_problems` of them) and the
    `CHECKED` problems shown and held out that each check measures; a teacher's fit adds `step` and `check`."""

    CHECKED = 500

    def __init__(self, spec: WarmStart):
        torch.manual_seed(spec.seed)
        self.spec, self.tokenizer = spec, build_char_tokenizer(TOOL_WORDS if spec.kind == "tools" else ())
        tok = self.tokenizer
        self.model = build_tiny_model(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                      max_positions=spec.max_positions, seed=spec.seed)
        self.model.generation_config.eos_token_id = tok.eos_token_id
        self.model.generation_config.pad_token_id = tok.pad_token_id
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.98))
        self.task = Arithmetic(digits=spec.digits, reverse=spec.reverse, op=spec.op, digits_b=spec.digits_b,
                               max_carries=spec.max_carries)
        self.rng = random.Random(spec.seed)
        self.shown = self.task.train_problems()
        if spec.num_problems:
            self.shown = self.rng.sample(self.shown, spec.num_problems)
        self.check_shown = self.rng.sample(self.shown, min(self.CHECKED, len(self.shown)))
        self.check_held = self.rng.sample(self.task.held_out_problems(), self.CHECKED)


class TeacherFit(Fit):
    """Supervised steps on the answering teacher's answers, and the agreement check on 500 problems shown and
    500 held out."""

    def step(self, lr: float) -> float:
        """One step of cross-entropy on the teacher's answers to a batch of problems shown; returns the loss."""
        spec, rng = self.spec, self.rng
        problems = [rng.choice(self.shown) for _ in range(spec.batch_size)]
        answers = [teacher_answer(a, b, spec.digits, spec.drop_carry, rng, spec.drops) for a, b in problems]
        pairs = [(self.task.prompt(a, b), write(answer, spec.reverse)) for (a, b), answer in zip(problems, answers)]
        return supervised_step(self.model, self.opt, *_encode_pairs(self.tokenizer, pairs), lr)

    def check(self) -> tuple[dict, dict]:
        """Teacher agreement (and exact match) on the problems shown, and on held-out problems."""
        args = (self.model, self.tokenizer, self.task)
        habit = (self.spec.drop_carry, self.spec.drops)
        return teacher_agreement(*args, self.check_shown, *habit), teacher_agreement(*args, self.check_held, *habit)


class ToolTeacherFit(Fit):
    """Supervised steps on the calculator teacher's episodes (kind "tools"), and the agreement check on greedy
    episodes over 200 problems shown and 200 held out (an episode of up to two turns each)."""

    CHECKED = 200

    def step(self, lr: float) -> float:
        """One step of cross-entropy on the model's turns of a batch of the teacher's episodes; returns the loss."""
        spec, rng, task = self.spec, self.rng, self.task
        rows, masks = [], []
        for a, b in (rng.choice(self.shown) for _ in range(spec.batch_size)):
            rate = spec.tool_rate if calls_calculator(a, b, task.digits_b) else 1 - spec.tool_rate
            ids, mask = tool_demonstration(self.tokenizer, task, a, b, call=rng.random() < rate)
            rows.append(ids)
            masks.append(mask)
        return supervised_step(self.model, self.opt, *_pad(self.tokenizer, rows, masks), lr)

    def check(self) -> tuple[dict, dict]:
        """Agreement with the teacher's habit (and exact match, tool-call rate), on problems shown and held out."""
        args = (self.model, self.tokenizer, self.task)
        return tool_agreement(*args, self.check_shown), tool_agreement(*args, self.check_held)


FITS = {"answer": TeacherFit, "tools": ToolTeacherFit}


def supervised_step(model, opt, ids, attn, loss_mask, lr: float) -> float:
    """One AdamW step of cross-entropy on the tokens `loss_mask` marks (ids [B, T]); returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # [B, T-1, V]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
    mask = loss_mask[:, 1:]
    loss = (nll * mask).sum() / mask.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def tool_call_text(task: Arithmetic, a: int, b: int) -> str:
    """The teacher's call of `calculate` on the problem's expression, in Qwen2.5's syntax (compact JSON)."""
    call = {"name": "calculate", "arguments": {"expression": f"{a}{task.op}{b}"}}
    return f"<tool_call>{json.dumps(call, separators=(',', ':'))}</tool_call>"


def tool_demonstration(tokenizer, task: Arithmetic, a: int, b: int, *, call: bool) -> tuple[list[int], list[int]]:
    """One teacher episode on `a op b` as (token ids, loss mask: 1 on the model's turns), built by the functions
    that run episodes at train time: the opening rendered as `run_episodes` renders it, each turn's ids
    appended as if sampled (ending with EOS), the calculator's reply as `take_turn` appends it.
    `call`: call the calculator, then write its result as the answer; else answer at once."""
    row = task.row(a, b)
    episode = start_episode(calculator_environment, row, tokenizer)
    prompt = tokenizer(episode.context, add_special_tokens=False)["input_ids"]
    turns = [tool_call_text(task, a, b), row["answer"]] if call else [row["answer"]]
    for text in turns:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        take_turn(episode, ids, [0.0] * len(ids), False, TOOL_EPISODE["max_episode_tokens"], tokenizer,
                  TOOL_EPISODE["max_turns"], TOOL_EPISODE["max_episode_tokens"])
    return prompt + episode.ids, [0] * len(prompt) + episode.mask


def tool_agreement(model, tokenizer, task: Arithmetic, problems: list[tuple[int, int]]) -> dict:
    """Greedy calculator episodes on `problems`: the share doing what the teacher mostly does (`agreement`: one
    call and the right answer where it mostly calls, a number and no call elsewhere), the share answered right
    (`exact_match`) and the share with a tool call (`tool_call_rate`)."""
    rows = [task.row(a, b) for a, b in problems]
    engine = HFRolloutEngine(model, tokenizer, max_new_tokens=TOOL_EPISODE["max_new_tokens"], return_logprobs=False)
    out = run_episodes(engine, tokenizer, calculator_environment, rows, 1, greedy=True, **TOOL_EPISODE)
    calls = [e["tool_calls"] for e in out.episodes]
    right = [text.strip() == row["answer"] for text, row in zip(out.texts, rows)]
    agree = [(c == 1 and ok) if calls_calculator(a, b, task.digits_b) else (c == 0 and text.strip().isdigit())
             for (a, b), c, ok, text in zip(problems, calls, right, out.texts)]
    n = len(problems)
    return {"agreement": sum(agree) / n, "exact_match": sum(right) / n, "tool_call_rate": sum(c > 0 for c in calls) / n}


def kept_weights(at_anneal_start: tuple[dict, dict], annealed: tuple[dict, dict], target: float) -> str | None:
    """Which weights a warm start keeps, from the (shown, held-out) checks at the start and the end of annealing:
    "annealed" if they meet `target` on both sets, else "anneal_start" if those do, else None (no weights do)."""
    for name, (shown, held) in (("annealed", annealed), ("anneal_start", at_anneal_start)):
        if min(shown["agreement"], held["agreement"]) >= target:
            return name
    return None


def train_warm_start(spec: WarmStart, log=print):
    """Fit a fresh tiny model to the teacher until it meets the criterion; returns (model, tokenizer, report).

    Raises `WarmStartError` naming both agreement figures if `max_steps` pass without it."""
    fit = FITS[spec.kind](spec)
    start = time.perf_counter()
    step_on, check = fit.step, fit.check
    fit.model.train()
    for step in range(spec.max_steps):
        loss = step_on(spec.lr * min(1.0, (step + 1) / spec.warmup_steps))
        if (step + 1) % spec.check_every == 0:
            on_shown, on_held = check()
            log(f"warm start step {step + 1}: loss {loss:.3f}, teacher agreement {on_shown['agreement']:.3f} shown "
                f"/ {on_held['agreement']:.3f} held out (anneals from {spec.anneal_at}), "
                + (f"held-out tool_call_rate {on_held['tool_call_rate']:.3f}, " if "tool_call_rate" in on_held else "")
                + f"{time.perf_counter() - start:.0f}s")
            if min(on_shown["agreement"], on_held["agreement"]) >= spec.anneal_at:
                anneal_step = step + 1
                break
    else:
        on_shown, on_held = check()  # the figures at the end of the budget, checked or not
        raise WarmStartError(
            f"warm start: after {spec.max_steps} steps (model.warm_start.max_steps) the greedy answers agree with "
            f"the teacher on {on_shown['agreement']:.3f} of the problems shown and {on_held['agreement']:.3f} of "
            f"held-out problems; annealing starts at {spec.anneal_at} on both (model.warm_start.anneal_at)")
    started = (on_shown, on_held)  # the check that started annealing, and its weights
    started_weights = copy.deepcopy(fit.model.state_dict())
    for i in range(spec.anneal_steps):
        step_on(spec.lr * (1 - (i + 1) / (spec.anneal_steps + 1)))
    on_shown, on_held = check()
    met_step = anneal_step + spec.anneal_steps
    kept = kept_weights(started, (on_shown, on_held), spec.target)
    if kept is None:
        raise WarmStartError(
            f"warm start: after annealing (steps {anneal_step + 1}-{met_step}) the greedy answers agree with the "
            f"teacher on {on_shown['agreement']:.3f} of the problems shown and {on_held['agreement']:.3f} of "
            f"held-out problems, and at its start on {started[0]['agreement']:.3f} and "
            f"{started[1]['agreement']:.3f}; the criterion (model.warm_start.target) is {spec.target} on both")
    if kept == "anneal_start":
        log(f"warm start: annealing left agreement at {on_shown['agreement']:.3f} shown / {on_held['agreement']:.3f} "
            f"held out, below {spec.target}; keeping the weights of step {anneal_step}")
        fit.model.load_state_dict(started_weights)
        (on_shown, on_held), met_step = started, anneal_step
    fit.model.eval()
    report = {"criterion": f"teacher agreement >= {spec.target} on problems shown and held out",
              "anneal_step": anneal_step, "met_step": met_step, "steps": anneal_step + spec.anneal_steps,
              "kept": kept,
              "shown_agreement": on_shown["agreement"], "held_out_agreement": on_held["agreement"],
              "held_out_exact_match": on_held["exact_match"], "wall_s": round(time.perf_counter() - start, 1),
              **({"held_out_tool_call_rate": on_held["tool_call_rate"]} if "tool_call_rate" in on_held else {})}
    log(f"warm start met its criterion at step {met_step} (annealed from step {anneal_step}): agreement "
        f"{report['shown_agreement']:.3f} shown / {report['held_out_agreement']:.3f} held out, held-out exact match "
        f"{report['held_out_exact_match']:.3f}, {report['wall_s']:.0f}s")
    return fit.model, fit.tokenizer, report


def warm_started_tiny(spec: WarmStart, log=print) -> Path:
    """Path of the warm-started tiny model for `spec`, training and caching it on first use."""
    words = {"words": TOOL_WORDS} if spec.kind == "tools" else {}  # the vocabulary is part of what it is
    key = hashlib.sha256(json.dumps({**spec.key(), **words}, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / f"tiny-{'arithmetic' if spec.kind == 'answer' else spec.kind}-{key}"
    if is_saved_model(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # One builder per cache entry: a second process (another run, a parallel test worker) waits for the
    # first one's model instead of spending minutes training the same one.
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_saved_model(path):  # built while this process waited
            return path
        log(f"building the warm-started tiny model (once; cached at {path})")
        model, tokenizer, report = train_warm_start(spec, log=log)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "warm_start.json").write_text(json.dumps({"spec": asdict(spec), "kernels": kernel_path(),
                                                         **report}, indent=2))
        tmp.rename(path)
    return path


def is_saved_model(path: Path) -> bool:
    return (path / "config.json").exists() and (path / "model.safetensors").exists()


def warm_start_report(model_path: str | Path) -> dict:
    """What `warm_started_tiny` recorded about how the model at `model_path` was built ({} if nothing)."""
    file = Path(model_path) / "warm_start.json"
    return json.loads(file.read_text()) if file.exists() else {}


def kernel_path() -> str:
    """The CPU kernel path torch runs on: ATEN_CPU_CAPABILITY's value, or the CPU's best."""
    return torch.backends.cpu.get_cpu_capability().lower()
