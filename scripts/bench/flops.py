"""What a training step's forwards run, counted while it runs, and the matmul FLOPs that makes.

`Meter` counts, for one side of the comparison, every forward made with gradients on (the training forwards,
not sampling): the `[rows, width]` of each batch the model's backbone runs, and how many positions go through the
vocabulary projection (the head). Each side's head is counted where that side calls it: ours at
`grpo.core.logprobs._score_in_chunks` (the rows it is handed), TRL's at `_ChunkedLogProbFunction.apply` as
`trl.trainer.utils` calls it (the rows of hidden states it is handed: every position on CPU, the completion
tokens only on its GPU path).

`training_flops` turns those counts into matmul FLOPs of forward + backward from the model's shapes:

- per position through the backbone, per layer: 2 x (q, k, v, o projections + gate, up, down);
- attention, per row of width W, per layer: 2 x 2 x heads x head_dim x W^2 (scores and the weighted sum over every
  pair a masked kernel computes: the padding and the causal upper triangle included, since a kernel given a mask
  computes them);
- per head position: 2 x hidden x vocabulary;
- backward = 2 x forward. Recomputation (activation checkpointing, a chunked head that recomputes its logits in
  backward) is not counted: these are model FLOPs, the convention of model-FLOPs utilisation, so an arm with
  checkpointing does the same model FLOPs as the arm without.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import trl.trainer.utils as trl_utils

import grpo.core.logprobs as core_logprobs
from grpo.core.logprobs import _backbone


@dataclass(frozen=True)
class Shapes:
    """The matmul shapes of a decoder-only transformer."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config) -> Shapes:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, config.num_hidden_layers, heads, config.num_key_value_heads, head_dim,
                   config.intermediate_size, config.vocab_size)

    def layer_weights(self) -> int:
        """Weights one position multiplies by in one layer: q and o (hidden x heads*head_dim each), k and v
        (hidden x kv_heads*head_dim each), gate, up and down (hidden x intermediate each)."""
        return self.hidden * self.head_dim * 2 * (self.heads + self.kv_heads) + 3 * self.hidden * self.intermediate


def training_flops(shapes: Shapes, forwards: list[tuple[int, int]], head_positions: int) -> dict:
    """Matmul FLOPs of forward + backward (module docstring) for backbone forwards of `[rows, width]` each and
    `head_positions` positions through the head; the parts and the total."""
    s = shapes
    positions = sum(rows * width for rows, width in forwards)
    pairs = sum(rows * width * width for rows, width in forwards)
    forward = {
        "backbone": 2 * positions * s.layers * s.layer_weights(),
        "attention": 2 * 2 * pairs * s.layers * s.heads * s.head_dim,
        "head": 2 * head_positions * s.hidden * s.vocab,
    }
    out = {f"{k}_flops": 3 * v for k, v in forward.items()}  # backward: 2 x forward
    out["flops"] = sum(out.values())
    return out


@dataclass
class Meter:
    """While entered: counts the training forwards of `model` (module docstring). `side` is ours or trl."""

    model: torch.nn.Module
    side: str
    forwards: list[tuple[int, int]] = field(default_factory=list)
    head_positions: int = 0

    def __enter__(self):
        self.handle = _backbone(self.model).register_forward_pre_hook(self._count_forward, with_kwargs=True)
        module, name = (core_logprobs, "_score_in_chunks") if self.side == "ours" else \
            (trl_utils, "_ChunkedLogProbFunction")
        self.patched = (module, name, getattr(module, name))
        setattr(module, name, self._counting_head(self.patched[2]))
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        module, name, original = self.patched
        setattr(module, name, original)

    def take(self) -> dict:
        """What was counted since the last `take`: `forwards` [[rows, width], ...], `positions` (their sum) and
        `head_positions`."""
        out = {"forwards": [list(f) for f in self.forwards], "head_positions": self.head_positions,
               "positions": sum(r * w for r, w in self.forwards)}
        self.forwards, self.head_positions = [], 0
        return out

    def _count_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if torch.is_grad_enabled() and ids is not None:
            self.forwards.append((ids.shape[0], ids.shape[1]))

    def _counting_head(self, original):
        meter = self

        if self.side == "ours":
            def score_in_chunks(head, rows, *args, **kwargs):  # rows [M, H]: the positions scored
                if torch.is_grad_enabled():
                    meter.head_positions += rows.shape[0]
                return original(head, rows, *args, **kwargs)
            return score_in_chunks

        class ChunkedLogProb:  # TRL calls `_ChunkedLogProbFunction.apply(hidden [M, H], weight, ...)`
            @staticmethod
            def apply(hidden, *args):
                if torch.is_grad_enabled():
                    meter.head_positions += hidden.shape[0]
                return original.apply(hidden, *args)
        return ChunkedLogProb
