"""Completions of planned lengths on every sampler: the same number of tokens per prompt on both sides.

A sampling comparison is fair only if both sides generate the same tokens' worth of work. A random-weights model
never stops on its own, and a real model stops where its own draws take it, differently on each side. So the
benchmark fixes a plan, `lengths[i][j]`: the j-th completion of prompt i is exactly that many tokens long, EOS last
(a length equal to the cap: no EOS, cut there). Every other token is the model's own draw.

- `ForcedLengths` (a forward hook on every module, active while entered) does it for any sampler that calls the
  causal LM with a KV cache, one token per decode step: our engine and transformers' `generate` (TRL's path without
  vLLM). On each sampling forward (gradients off) it sets the last position's EOS logit: -inf before a row's planned
  length, the only finite logit at it. It finds which row is which without the sampler's help:
  - at the prefill (more than one input column) it reads each row's prompt (its unpadded ids) and looks it up in the
    plan; rows of one prompt take its lengths in order. Our engine prefills each prompt once for its G samples (its
    rows are then distinct prompts), `generate` prefills every sample;
  - at each decode step it counts the tokens generated so far from the KV cache's length (the same for every row),
    and maps the forward's rows to the plan's: all of them (`generate` keeps finished rows), or, when there are
    fewer, those not yet finished in their original order (our engine drops finished rows, keeping the order). Any
    other count is an error, not a silent mismatch.
  The first token cannot be forced per row where the prefill is shared by G samples, so planned lengths are at
  least 2 (`LengthPlan` raises them).
- `planned_request_lengths` does it for transformers' continuous batching (`generate_batch`, TRL's
  `use_transformers_continuous_batching`), whose forwards pack many requests into one row and give the hook no
  per-row view: each request is added with `max_new_tokens` = its planned length and no EOS, so it stops there.
  Its tokens are then all the model's draws, EOS included as an ordinary token.

The pad token's logit is set to -inf as well (unless it is EOS): our engine never samples it, and now neither does
`generate`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass

import torch
from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager

MIN_LENGTH = 2  # the first token of a shared prefill is drawn for G samples at once: it cannot be forced per row


@dataclass
class LengthPlan:
    """`lengths[i]`: the G planned completion lengths of prompt `prompts[i]` (token ids), each in [2, cap]."""

    prompts: list[list[int]]
    lengths: list[list[int]]
    cap: int

    @classmethod
    def of(cls, prompts: list[list[int]], completion_lengths: list[int], group: int, cap: int) -> LengthPlan:
        """The plan of `completion_lengths` [B*G] (prompt-major), raised to at least `MIN_LENGTH`."""
        if len(completion_lengths) != len(prompts) * group:
            raise ValueError(f"{len(completion_lengths)} lengths for {len(prompts)} prompts x {group}")
        lengths = [[min(cap, max(MIN_LENGTH, n)) for n in completion_lengths[i * group : (i + 1) * group]]
                   for i in range(len(prompts))]
        return cls([list(p) for p in prompts], lengths, cap)

    @property
    def group(self) -> int:
        return len(self.lengths[0])

    def total(self) -> int:
        return sum(map(sum, self.lengths))

    def prompt_index(self, ids) -> int:
        index = {tuple(p): i for i, p in enumerate(self.prompts)}.get(tuple(ids))
        if index is None:
            raise ValueError(f"a sampler's prompt ({len(ids)} tokens, starting {list(ids)[:8]}) is not in the length "
                             f"plan: the two sides tokenised a prompt differently")
        return index

    def row_lengths(self, prompt_rows: list[list[int]]) -> list[int]:
        """The planned length of each sampled row, given the rows' prompts: rows of one prompt take its lengths in
        order (cycling: a prompt drawn twice in one batch takes them again)."""
        seen = Counter()
        out = []
        for ids in prompt_rows:
            i = self.prompt_index(ids)
            out.append(self.lengths[i][seen[i] % self.group])
            seen[i] += 1
        return out


class ForcedLengths:
    """While entered, every sampler's completions have the plan's lengths (module docstring)."""

    def __init__(self, plan: LengthPlan, eos: int, pad: int):
        self.plan, self.eos, self.pad = plan, eos, pad
        self.targets: list[int] = []  # the planned length of every sampled row of the current generation
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
        last = logits[:, -1]  # [R, V] a view: written in place
        if ids.shape[1] > 1:  # a prefill: decode steps feed one token
            self.prefill(ids, kwargs.get("attention_mask"))
            last[:, self.eos] = float("-inf")  # every planned length is >= 2
        else:
            self.force(last, cache.get_seq_length() - self.width)
        if self.pad != self.eos:
            last[:, self.pad] = float("-inf")
        return None

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        mask = torch.ones_like(ids) if mask is None else mask
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        self.width = ids.shape[1]
        distinct = len({tuple(p) for p in prompts}) == len(prompts)
        if distinct and self.plan.group > 1:  # one row per prompt, its cache repeated for its G samples after
            prompts = [p for p in prompts for _ in range(self.plan.group)]
        self.targets = self.plan.row_lengths(prompts)

    def force(self, last: torch.Tensor, generated: int) -> None:
        """EOS on the rows whose planned length is `generated + 1`, banned on those still short of theirs and on
        those planned at the cap."""
        rows = range(len(self.targets))
        if last.shape[0] != len(self.targets):  # finished rows left the forward
            rows = [r for r, n in enumerate(self.targets) if n > generated]
            if len(rows) != last.shape[0]:
                raise RuntimeError(f"forced lengths: the forward has {last.shape[0]} rows after {generated} tokens; "
                                   f"the plan has {len(rows)} unfinished of {len(self.targets)}")
        targets = torch.tensor([self.targets[r] for r in rows], device=last.device)  # [R]
        truncated = targets == self.plan.cap  # [R] cut at the cap: no EOS at all
        ends = (targets == generated + 1) & ~truncated  # [R]
        last[(targets > generated + 1) | truncated, self.eos] = float("-inf")
        last[ends] = float("-inf")
        last[ends, self.eos] = 0.0


@contextlib.contextmanager
def planned_request_lengths(plan: LengthPlan):
    """While entered, every request added to a continuous-batching manager generates exactly its planned length
    (module docstring)."""
    original = ContinuousBatchingManager.add_request
    seen = Counter()

    def add_request(self, input_ids, *args, **kwargs):
        i = plan.prompt_index(input_ids)
        kwargs["max_new_tokens"] = plan.lengths[i][seen[i] % plan.group]
        kwargs["eos_token_id"] = -1  # no EOS: the request stops at its max_new_tokens
        seen[i] += 1
        return original(self, input_ids, *args, **kwargs)

    ContinuousBatchingManager.add_request = add_request
    try:
        yield
    finally:
        ContinuousBatchingManager.add_request = original
