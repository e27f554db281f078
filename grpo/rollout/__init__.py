"""Rollout engines: sample G completions per prompt from the current policy.

An engine is anything with the `RolloutEngine` methods (a `typing.Protocol`: tests pass fakes
without inheriting). Engines are named by string and imported only when chosen, so
`import grpo` never imports vLLM.
"""

from __future__ import annotations

import copy
import importlib
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class Completions:
    """What one `generate` call returns, for B prompts and n samples each (B*n rows, prompt-major)."""

    prompt_ids: list[list[int]]  # [B] token ids of each prompt
    completion_ids: list[list[int]]  # [B*n] sampled ids, ending with EOS when the model stopped
    texts: list[str]  # [B*n] decoded completions, special tokens and stop strings removed
    truncated: list[bool]  # [B*n] True when max_new_tokens ran out before EOS or a stop string
    logprobs: list[list[float]] | None = None  # [B*n] the sampler's log-prob of each sampled token
    metrics: dict = field(default_factory=dict)
    # Multi-turn episodes (grpo.rollout.episodes) only: per token, 1 for the model's, 0 for the environment's
    loss_masks: list[list[int]] | None = None  # [B*n]
    episodes: list[dict] | None = None  # [B*n] per episode: turns, tool calls and failures, truncated, reward

    @property
    def completion_lengths(self) -> list[int]:
        """[B*n] tokens of each completion: the column rewards read as `completion_length` (unit=tokens)."""
        return [len(c) for c in self.completion_ids]


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: list[str], n: int, *, greedy: bool = False) -> Completions:
        """Sample n completions per prompt (or one greedy completion when `greedy`)."""
        ...

    def sync_weights(self, model) -> float:
        """Load the policy's current weights into the engine; returns the seconds it took."""
        ...


@runtime_checkable
class TokenRolloutEngine(Protocol):
    """An engine that can also continue token-id contexts, as multi-turn episodes need."""

    def generate_from_ids(self, prompt_ids: list[list[int]], n: int, *, greedy: bool = False,
                          max_new_tokens: int | None = None) -> Completions:
        """Sample n continuations of each token-id context, at most `max_new_tokens` tokens each."""
        ...


ENGINES = {"hf": "grpo.rollout.hf:HFRolloutEngine", "vllm": "grpo.rollout.vllm:VLLMRolloutEngine",
           "server": "grpo.rollout.remote:ServerRolloutEngine"}  # server: rollout.mode=server


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """The token ids every engine samples after, one list per prompt text: the text as it is, with no
    special tokens added. A chat template is already in the prompt text (`grpo.data.loading.chat_prompts`), and
    this is how `apply_chat_template` tokenises its rendering: the ids are the template's."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def decode_completion(tokenizer, seq: list[int], stop: list[str]) -> str:
    """The completion's text: special tokens dropped, cut before the first stop string it contains."""
    text = tokenizer.decode(seq, skip_special_tokens=True)
    for s in stop:
        if s in text:
            text = text[: text.index(s)]
    return text


def build_rollout_engine(name: str, **kwargs) -> RolloutEngine:
    """Import the engine named in the config and build it."""
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)


class WithFullWeights:
    """A rollout engine whose `generate` and `sync_weights` run inside `context()`.

    Under ZeRO-3 each rank holds a shard of every parameter; the backend's context gathers the
    full weights for the duration of one call (and releases them after), so the engine samples
    from, or copies, the same complete weights on every rank.
    """

    def __init__(self, engine: RolloutEngine, context):
        self.engine, self.context = engine, context

    def generate(self, prompts: list[str], n: int, *, greedy: bool = False) -> Completions:
        with self.context():
            return self.engine.generate(prompts, n, greedy=greedy)

    def generate_from_ids(self, prompt_ids: list[list[int]], n: int, *, greedy: bool = False,
                          max_new_tokens: int | None = None) -> Completions:
        with self.context():
            return self.engine.generate_from_ids(prompt_ids, n, greedy=greedy, max_new_tokens=max_new_tokens)

    def sync_weights(self, model) -> float:
        with self.context():
            return self.engine.sync_weights(model)


class OnOwnCopy:
    """A rollout engine that samples from its own copy of the policy module, for asynchronous rollout
    (`rollout.max_staleness`): the trainer updates the policy while the engine samples from the copy, and
    `sync_weights` copies the trainer's weights into it (inside `gather()`, e.g. ZeRO's full-weight context).
    Engines that hold their own weights (vLLM) need no copy. The copy costs one more policy's memory."""

    holds_own_weights = True

    def __init__(self, build_engine, model: torch.nn.Module, gather=nullcontext):
        self.copy = copy.deepcopy(model).eval().requires_grad_(False)
        self.engine, self.gather = build_engine(self.copy), gather

    def generate(self, prompts: list[str], n: int, *, greedy: bool = False) -> Completions:
        return self.engine.generate(prompts, n, greedy=greedy)

    def generate_from_ids(self, prompt_ids: list[list[int]], n: int, *, greedy: bool = False,
                          max_new_tokens: int | None = None) -> Completions:
        return self.engine.generate_from_ids(prompt_ids, n, greedy=greedy, max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def sync_weights(self, model) -> float:
        start = time.perf_counter()
        with self.gather():
            self.copy.load_state_dict(model.state_dict())
        return time.perf_counter() - start
