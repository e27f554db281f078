"""Padding-free layouts of a micro-batch for the log-prob and value forwards (`backend.packing`).

A rollout micro-batch arrives padded (`grpo.core.batch`): row i holds its prompt left-padded to column P
and its completion right-padded after it. With ~200-token prompts shared by G completions of
long-tailed lengths, most of that tensor is padding and every prompt is forwarded G times. Two
layouts forward real tokens only; each maps its scored positions back to the padded `[n, T-1]`
columns, so the loss code never sees the difference:

- `sequences`: each row's prompt + completion is one sequence; sequences are packed first-fit by
  decreasing length into rows no wider than the longest one (under flash attention: all in one row,
  which its varlen kernel takes as is). Position ids restart at 0 at every sequence start, and
  transformers builds the mask that keeps attention inside a sequence from them when it is given
  no attention mask (`masking_utils.find_packed_sequence_indices`; flash: `_is_packed_sequence`).
- `groups`: consecutive rows with the same prompt are one group, laid out as the prompt followed by
  its completions in one row; every completion's positions start at the prompt length, and a 4D
  mask lets a completion see the prompt and its own earlier tokens only. The prompt is forwarded
  once per group and micro-batch, and its last hidden state scores the first token of every
  completion. A custom 4D mask needs sdpa or eager attention.

`auto` (the default) is not a layout: the run resolves it once, when it is built, to the layout the policy's
attention can isolate sequences in (`auto_packing`): `groups` under sdpa or eager, `sequences` under flash
attention (its varlen kernel) or flex attention, `padded` under any other.

Scored positions are those that predict a completion token (every one, multi-turn environment
tokens included: `completion_mask` decides later which count). Padded-layout columns that score
no completion token come back as 0, where the padded forward computed a value over padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from grpo.core.batch import RolloutBatch

PACKINGS = ("padded", "sequences", "groups")  # the layouts a forward runs
AUTO = "auto"  # `backend.packing`'s default: one of PACKINGS, chosen when the run is built (`auto_packing`)
MASK_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4D mask
MASK_ALIGNMENT = 8  # elements: the groups mask's row stride is a multiple of it (`group_mask`)


@dataclass
class PackedRows:
    """A micro-batch in a packed layout, and where each scored position goes in the padded one."""

    input_ids: torch.Tensor  # [R, W]
    position_ids: torch.Tensor  # [R, W]
    attention_mask: torch.Tensor | None  # [R, 1, W, W] (groups, `group_mask`), or None (sequences)
    source: torch.Tensor  # [M] flat index into [R*W]: the hidden state that scores a completion token
    targets: torch.Tensor  # [M] the token it scores
    dest: torch.Tensor  # [M] flat index into the padded [n, T-1] log-prob columns

    def to_padded(self, values: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        """Per-scored-position `values` [M] (in `source` order) -> the padded layout [rows, columns] (`n`, `T-1`),
        zeros where nothing was scored; differentiable in `values`."""
        return values.new_zeros(rows * columns).index_copy(0, self.dest, values).view(rows, columns)


def layout_refusal(impl: str, sliding: bool, packing: str) -> str | None:
    """Why attention implementation `impl` (with sliding-window layers, `sliding`) cannot keep the sequences of the
    layout `packing` apart; None when it can."""
    if packing == "groups" and (impl not in MASK_ATTENTION or sliding):
        return (f"backend.packing=groups needs a custom 4D attention mask, which attention implementation {impl!r} "
                f"(or sliding-window layers) cannot take; use backend.packing=sequences or padded")
    if packing == "sequences" and impl not in (*MASK_ATTENTION, "flex_attention") and "flash" not in impl:
        return (f"backend.packing=sequences: attention implementation {impl!r} is not known to separate "
                f"packed sequences by their position ids; use backend.packing=padded")
    return None


def auto_packing(impl: str, sliding: bool = False) -> tuple[str, str]:
    """The layout `backend.packing=auto` runs under attention implementation `impl`, and why: the first of
    `groups` (each prompt forwarded once per group), `sequences` (no padding), `padded` that `impl` takes."""
    for packing in ("groups", "sequences"):
        if layout_refusal(impl, sliding, packing) is None:
            takes = "a custom 4D mask" if packing == "groups" else "packed sequences by their position ids"
            return packing, f"attention implementation {impl!r} takes {takes}"
    layers = " with sliding-window layers" if sliding else ""
    return "padded", f"attention implementation {impl!r}{layers} takes neither a 4D mask nor packed sequences"


def spans(attention_mask: torch.Tensor, prompt_width: int) -> tuple[list[int], list[int]]:
    """Per row, (prompt length, completion length) in real tokens: real tokens sit in columns
    `P - prompt_len .. P + completion_len - 1` of the padded layout."""
    real = attention_mask.bool()  # [n, T]
    return real[:, :prompt_width].sum(1).tolist(), real[:, prompt_width:].sum(1).tolist()


def group_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> list[int]:
    """Per row, the index of its group: runs of consecutive rows with the same prompt share one.
    (Two groups with equal prompts next to each other merge, which is still exact.)"""
    prompt = torch.where(attention_mask[:, :prompt_width].bool(), input_ids[:, :prompt_width], -1)  # [n, P]
    new = torch.ones(len(prompt), dtype=torch.bool)
    new[1:] = (prompt[1:] != prompt[:-1]).any(1).cpu()
    return (new.long().cumsum(0) - 1).tolist()


def token_budget_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Split sequence indices into contiguous micro-batches that fit a padded-token budget.

    A micro-batch of indices `I` costs `max(lengths[i] for i in I) * len(I)` tokens (every sequence
    padded to the longest in its micro-batch). Indices are taken in order and a micro-batch is closed
    when the next sequence would push its cost over `max_tokens`, so concatenating the micro-batches
    gives `0..len(lengths)-1` back, and per-micro-batch results can be concatenated in order.
    A sequence longer than `max_tokens` gets a micro-batch of its own (never an empty one).
    Greedy is optimal here: among contiguous splits it gives the fewest micro-batches.

    Example: `token_budget_batches([3, 5, 2, 2, 8], 10) == [[0, 1], [2, 3], [4]]`
    (`[0, 1]` costs 5 * 2 = 10, `[0, 1, 2]` would cost 15; `[2, 3]` costs 4, `[2, 3, 4]` would cost 24).
    """
    negative = next((i for i, n in enumerate(lengths) if n < 0), None)
    if negative is not None:
        raise ValueError(f"lengths[{negative}] is negative: {lengths[negative]}")
    return greedy_batches(list(range(len(lengths))), lambda rows: max(lengths[i] for i in rows) * len(rows),
                          max_tokens)


def micro_batches(batch: RolloutBatch | None, max_tokens: int, packing: str) -> list[list[int]]:
    """This rank's micro-batches of `batch` (None: no rows) within the budget, costed in the layout
    `packing` forwards: padded rows, or the packed layout's tokens (`grpo.core.packing.plan_micro_batches`)."""
    if batch is None:
        return []
    if packing == "padded":
        return token_budget_batches(batch.attention_mask.sum(1).tolist(), max_tokens)
    return plan_micro_batches(batch.input_ids, batch.attention_mask, batch.prompt_width, max_tokens, packing)


def greedy_batches(items: list[int], cost: Callable[[list[int]], int], max_tokens: int) -> list[list[int]]:
    """`items` in order, cut into consecutive batches: a batch is closed when adding the next item would make its
    `cost` exceed `max_tokens`, so an item that costs more alone gets a batch of its own (never an empty one).
    For a cost that never falls when an item is added, greedy gives the fewest batches among such cuts."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    batches: list[list[int]] = []
    current: list[int] = []
    for item in items:
        if current and cost(current + [item]) > max_tokens:
            batches.append(current)
            current = []
        current.append(item)
    return batches + [current] if current else batches


def plan_micro_batches(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, max_tokens: int,
                       packing: str) -> list[list[int]]:
    """Contiguous micro-batches of the rows whose packed layout fits `max_tokens` (a row alone may exceed it).

    Cost of a micro-batch: `sequences`, its real tokens; `groups`, its groups times its widest group
    row (prompt + the group's completions in this micro-batch; a group split over micro-batches
    forwards its prompt in each). `padded` is `token_budget_batches`' padded cost.
    Example, `groups`: prompts of 2 tokens, rows (group, completion) = (0, 3), (0, 3), (1, 1) and
    max_tokens 8: [0] costs 5, [0, 1] costs 8, [0, 1, 2] would cost 2 groups x 8 = 16: [[0, 1], [2]].
    """
    prompt_lens, completion_lens = spans(attention_mask, prompt_width)
    groups = group_ids(input_ids, attention_mask, prompt_width) if packing == "groups" else None
    return greedy_batches(list(range(len(prompt_lens))),
                          lambda rows: _cost(rows, prompt_lens, completion_lens, groups), max_tokens)


def _cost(rows: list[int], prompt_lens: list[int], completion_lens: list[int], groups: list[int] | None) -> int:
    """Tokens of the packed layout of `rows` (see `plan_micro_batches`)."""
    if groups is None:
        return sum(prompt_lens[i] + completion_lens[i] for i in rows)
    widths: dict[int, int] = {}
    for i in rows:
        widths[groups[i]] = widths.get(groups[i], prompt_lens[i]) + completion_lens[i]
    return len(widths) * max(widths.values())


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, packing: str, *,
         one_row: bool = False, mask_dtype: torch.dtype = torch.bool) -> PackedRows:
    """The micro-batch `input_ids` [n, T] (padded layout, completions from column `prompt_width`) packed
    as `packing` says; `one_row` (sequences under flash attention) puts every sequence in a single row;
    `mask_dtype`: the groups mask's (`group_mask`)."""
    prompt_lens, completion_lens = spans(attention_mask, prompt_width)
    if min(prompt_lens, default=1) < 1:
        raise ValueError("backend.packing: every sequence needs a prompt token to score its first completion token")
    ids = input_ids.cpu()
    if packing == "sequences":
        rows, scored = _sequence_rows(ids, prompt_width, prompt_lens, completion_lens, one_row)
    elif packing == "groups":
        rows, scored = _group_rows(ids, prompt_width, prompt_lens, completion_lens,
                                   group_ids(input_ids, attention_mask, prompt_width))
    else:
        raise ValueError(f"backend.packing must be one of {PACKINGS[1:]} here, got {packing!r}"
                         + (" (auto is resolved to one of them when the run is built)"
                            if packing == AUTO else ""))
    R, W = len(rows), max(len(tokens) for tokens, _, _ in rows)
    packed = torch.zeros((R, W), dtype=torch.long)
    positions = torch.zeros((R, W), dtype=torch.long)
    segments = torch.full((R, W), -1, dtype=torch.long)  # groups: 0 prompt, j >= 1 a completion, -1 padding
    for r, (tokens, pos, seg) in enumerate(rows):
        L = len(tokens)
        packed[r, :L] = torch.tensor(tokens)
        positions[r, :L] = torch.tensor(pos)
        positions[r, L:] = torch.arange(W - L)  # the tail padding is a sequence of its own
        segments[r, :L] = torch.tensor(seg)
    device = input_ids.device
    mask = group_mask(segments.to(device), mask_dtype) if packing == "groups" else None
    source = torch.tensor([r * W + at for r, at, _, _ in scored], dtype=torch.long)  # [M]
    dest = torch.tensor([d for _, _, d, _ in scored], dtype=torch.long)  # [M]
    targets = torch.tensor([t for _, _, _, t in scored], dtype=torch.long)  # [M]
    return PackedRows(packed.to(device), positions.to(device), mask,
                      source.to(device), targets.to(device), dest.to(device))


def group_mask(segments: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The groups layout's attention mask [R, 1, W, W] from its segments [R, W] (0 the prompt, j >= 1 completion
    j, -1 padding): a query sees the keys up to itself in its own segment or in the prompt (so padding sees the
    prompt and earlier padding, and no query sees none).

    `torch.bool`: True where it may attend. A float dtype, the attention's: additive, 0 where it may attend and
    the dtype's minimum elsewhere, which sdpa takes as it is and eager adds to its scores, so every layer uses
    this one tensor (a bool mask sdpa converts to a float one in each layer, and each copy is saved for
    backward). Its rows are a multiple of `MASK_ALIGNMENT` elements apart: CUDA's memory-efficient sdpa copies
    a mask whose strides are not multiples of 8 into an aligned one, also in each layer."""
    R, W = segments.shape
    allowed = segments[:, :, None] == segments[:, None, :]  # [R, W, W] the key is in the query's segment
    allowed |= segments[:, None, :] == 0  # or in the prompt
    allowed &= torch.ones(W, W, dtype=torch.bool, device=segments.device).tril()  # and not after the query
    if dtype == torch.bool:
        return allowed[:, None]
    stride = -(-W // MASK_ALIGNMENT) * MASK_ALIGNMENT
    mask = torch.full((R, 1, W, stride), torch.finfo(dtype).min, dtype=dtype, device=segments.device)[..., :W]
    return mask.masked_fill_(allowed[:, None], 0.0)


def _sequence_rows(ids, P, prompt_lens, completion_lens, one_row):
    """Rows of whole sequences, first-fit by decreasing length into the longest one's width, as
    (tokens, positions, segments) lists; and the scored positions as (row, offset in the row,
    padded flat index into [n, T-1], target)."""
    n, T = ids.shape
    lengths = [p + c for p, c in zip(prompt_lens, completion_lens)]
    width = sum(lengths) if one_row else max(lengths)
    fill: list[int] = []  # tokens in each row so far
    where: dict[int, tuple[int, int]] = {}  # sequence -> (row, offset)
    for i in sorted(range(n), key=lambda i: -lengths[i]):
        r = next((r for r, used in enumerate(fill) if used + lengths[i] <= width), len(fill))
        if r == len(fill):
            fill.append(0)
        where[i] = (r, fill[r])
        fill[r] += lengths[i]
    rows = [([], [], []) for _ in fill]
    scored = []
    for i in sorted(range(n), key=lambda i: where[i]):  # each row's sequences in offset order: no gaps
        r, offset = where[i]
        start = P - prompt_lens[i]  # row i's first real column in the padded layout
        tokens, pos, seg = rows[r]
        tokens += ids[i, start : start + lengths[i]].tolist()
        pos += list(range(lengths[i]))
        seg += [0] * lengths[i]
        for k in range(prompt_lens[i] - 1, lengths[i] - 1):  # position k scores token k+1, a completion token
            scored.append((r, offset + k, i * (T - 1) + start + k, tokens[offset + k + 1]))
    return rows, scored


def _group_rows(ids, P, prompt_lens, completion_lens, groups):
    """One row per group: its prompt, then each completion (as `_sequence_rows` returns them)."""
    T = ids.shape[1]
    rows, scored = [], []
    for i, g in enumerate(groups):
        if i == 0 or g != groups[i - 1]:
            p = prompt_lens[i]
            rows.append((ids[i, P - p : P].tolist(), list(range(p)), [0] * p))
            completions = 0
        tokens, pos, seg = rows[-1]
        r, c, start = len(rows) - 1, completion_lens[i], len(tokens)
        completions += 1
        tokens += ids[i, P : P + c].tolist()
        pos += list(range(p, p + c))
        seg += [completions] * c
        for k in range(c):  # column P-1+k scores completion token k; token 0 from the prompt's last position
            scored.append((r, start + k - 1 if k else p - 1, i * (T - 1) + P - 1 + k, tokens[start + k]))
    return rows, scored
