"""The rollout batch: B*G sampled sequences laid out for the trainer.

Each row is one prompt and one of its completions: the prompt left-padded and the completion
right-padded, so that every completion starts at one column P. Log-prob column t scores token
t+1, so the completion's tokens are scored in columns P-1 .. P-1+len-1 (`completion_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RolloutBatch:
    """B*G sampled sequences laid out for the trainer: prompt left-padded, completion right-padded."""

    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # [N, T-1] 1 where input_ids[:, t+1] is a completion token that gets a gradient
    prompt_width: int  # P: completions start at column P
    advantages: torch.Tensor  # [N], or [N, T-1] per token (PPO)
    sampler_logprobs: torch.Tensor | None = None  # [N, T-1]
    old_logprobs: torch.Tensor | None = None  # [N, T-1]
    ref_logprobs: torch.Tensor | None = None  # [N, T-1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> RolloutBatch:
        """The batch with every tensor on `device` (the policy's), one copy per micro-batch."""
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return RolloutBatch(move(self.input_ids), move(self.attention_mask), move(self.completion_mask),
                            self.prompt_width, move(self.advantages), move(self.sampler_logprobs),
                            move(self.old_logprobs), move(self.ref_logprobs))

    def select(self, rows: list[int]) -> RolloutBatch:
        """The given rows, with columns that are padding in all of them trimmed away."""
        idx = torch.tensor(rows)
        attn = self.attention_mask[idx]
        used = attn.any(0).nonzero().squeeze(-1)
        lo, hi = int(used[0]), int(used[-1]) + 1

        def pick(t):  # [n, T-1] columns
            return None if t is None else t[idx][:, lo : hi - 1]

        return RolloutBatch(
            input_ids=self.input_ids[idx][:, lo:hi], attention_mask=attn[:, lo:hi],
            completion_mask=pick(self.completion_mask), prompt_width=self.prompt_width - lo,
            advantages=self.advantages[idx] if self.advantages.ndim == 1 else pick(self.advantages),
            sampler_logprobs=pick(self.sampler_logprobs),
            old_logprobs=pick(self.old_logprobs), ref_logprobs=pick(self.ref_logprobs),
        )


def layout_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], group_size: int, pad_id: int,
                 sampler_logprobs: list[list[float]] | None = None,
                 loss_masks: list[list[int]] | None = None) -> RolloutBatch:
    """Left-pad each prompt and right-pad each completion so all completions start at one column.

    `loss_masks` (multi-turn episodes): per completion token, 0 where the environment wrote it; those
    tokens stay in the context but are left out of `completion_mask`, so no loss or count sees them."""
    n = len(completion_ids)
    P = max(map(len, prompt_ids))
    C = max(1, max(map(len, completion_ids)))
    ids = torch.full((n, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros((n, P + C), dtype=torch.long)
    cmask = torch.zeros((n, P + C - 1))
    slp = torch.zeros((n, P + C - 1)) if sampler_logprobs is not None else None
    for i, comp in enumerate(completion_ids):
        prompt = prompt_ids[i // group_size]
        ids[i, P - len(prompt) : P] = torch.tensor(prompt, dtype=torch.long)
        ids[i, P : P + len(comp)] = torch.tensor(comp, dtype=torch.long)
        attn[i, P - len(prompt) : P + len(comp)] = 1
        cmask[i, P - 1 : P - 1 + len(comp)] = 1  # log-prob column t scores token t+1
        if loss_masks is not None:
            cmask[i, P - 1 : P - 1 + len(comp)] *= torch.tensor(loss_masks[i], dtype=cmask.dtype)
        if slp is not None:
            slp[i, P - 1 : P - 1 + len(comp)] = torch.tensor(sampler_logprobs[i])
    return RolloutBatch(ids, attn, cmask, P, torch.zeros(n), sampler_logprobs=slp)
