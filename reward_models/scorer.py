"""The `reward_model` reward: a trained preference reward model scores each prompt + completion.

    reward:
      functions:
        - {name: math_accuracy, weight: 1.0}
        - {name: reward_model, weight: 0.5, kwargs: {path: runs/rm/reward_model, normalize: batch}}

The text scored is exactly what `reward_models.train` trained on: ``prompt + completion + eos`` (EOS appended
unless already there), tokenized with the model's tokenizer, right-padded; the score is the classifier's one
output at the last non-padding token. Sequences longer than `max_length` tokens keep their *last*
`max_length` tokens (the start of the prompt is cut), so the completion and the end token are always scored.

A reward model trained with `train.head=likelihood` is a causal LM with a `reward_head.json` beside its
weights: its score is `scale * log p(completion + eos | prompt)`, summed over the completion's tokens (the
prompt's last `max_length` tokens are kept), with `scale` fitted by Bradley-Terry on the training pairs.

Rows are sorted by length and packed into batches of at most `batch_tokens` padded tokens, so one long
completion does not pad the whole batch. The model is loaded once per (path, device) and kept for the
process. Under multi-process training every rank calls the reward on its own share of the batch and scores
it on its own device (`cuda:$LOCAL_RANK` by default when CUDA is there).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from grpo.core.packing import greedy_batches
from rewards.registry import Reward, RewardConfigError

NORMALIZE_MODES = ("none", "batch")

_models: dict[tuple[str, str], tuple[Any, Any]] = {}
_lock = threading.Lock()
_counts: Counter[str] = Counter()


def default_device() -> str:
    """This rank's GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


LIKELIHOOD_HEAD = "reward_head.json"


class LikelihoodRewardModel(torch.nn.Module):
    """A causal LM scored by its log-likelihood of the completion, times a scale fitted on preference pairs."""

    def __init__(self, lm, scale: float):
        super().__init__()
        self.lm, self.scale = lm, float(scale)

    def completion_logprob(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           completion_mask: torch.Tensor) -> torch.Tensor:
        """Sum of log p(token | earlier tokens) over the tokens where `completion_mask` is 1; [b]."""
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # [b, T-1, V]
        logp = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # [b, T-1]
        return (logp * completion_mask[:, 1:]).sum(-1)  # [b]

    def save(self, directory: str | Path, tokenizer) -> None:
        self.lm.save_pretrained(str(directory), safe_serialization=True)
        tokenizer.save_pretrained(str(directory))
        (Path(directory) / LIKELIHOOD_HEAD).write_text(json.dumps({"kind": "likelihood", "scale": self.scale}))


def read_reward_model(path: str | Path, device: str = "cpu"):
    """(model, tokenizer) of the reward model directory at `path`, on `device`, in eval mode (not cached)."""
    if not Path(path).expanduser().exists():
        raise RewardConfigError(f"reward_model: path {path} does not exist (train one with grpo-rm-train)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    head = Path(path).expanduser() / LIKELIHOOD_HEAD
    if head.exists():
        scale = json.loads(head.read_text())["scale"]
        lm = AutoModelForCausalLM.from_pretrained(str(path))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return LikelihoodRewardModel(lm, scale).to(device).eval(), tokenizer
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).to(device).eval()
    if model.config.num_labels != 1:
        raise RewardConfigError(f"reward_model: {path} has {model.config.num_labels} outputs, expected 1")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_reward_model(path: str | Path, device: str | None = None):
    """`read_reward_model`, once per (path, device) per process: later calls return the same objects."""
    device = device or default_device()
    key = (str(Path(path).expanduser().resolve()), device)
    with _lock:
        if key not in _models:
            _models[key] = read_reward_model(key[0], device)
        return _models[key]


def encode(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], bool]:
    """Token ids of ``prompt + completion + eos`` as the reward trainer builds them; the last `max_length` kept."""
    text = prompt + completion
    if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    ids = tokenizer(text)["input_ids"]
    return ids[-max_length:], len(ids) > max_length


def token_budget_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped so that rows x longest row <= `batch_tokens` (a longer row goes alone), shortest first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return greedy_batches(order, lambda rows: len(rows) * lengths[rows[-1]], batch_tokens)  # the last is the longest


def right_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [b, T] and attention mask [b, T] of `seqs`, right-padded as in training (positions start at 0)."""
    ids = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)  # [b, T]
    attn = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        attn[row, : len(seq)] = 1
    return ids, attn


@torch.inference_mode()
def score_texts(model, tokenizer, prompts: list[str], completions: list[str], *, batch_tokens: int = 8192,
                max_length: int = 512, counts: Counter | None = None) -> list[float]:
    """The reward model's score of each prompt + completion (see the module docstring).

    `counts["truncated"]`, when given, is increased by the number of sequences cut to `max_length`."""
    if isinstance(model, LikelihoodRewardModel):
        return score_likelihood(model, tokenizer, prompts, completions, batch_tokens=batch_tokens,
                                max_length=max_length, counts=counts)
    encoded = [encode(tokenizer, p, c, max_length) for p, c in zip(prompts, completions)]
    if counts is not None:
        counts["truncated"] += sum(t for _, t in encoded)
    device = next(model.parameters()).device
    scores = [0.0] * len(encoded)
    for batch in token_budget_batches([len(ids) for ids, _ in encoded], batch_tokens):
        ids, attn = right_padded([encoded[i][0] for i in batch], tokenizer.pad_token_id)  # [b, T] each
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits  # [b, 1]
        for row, value in zip(batch, logits[:, 0].float().cpu().tolist()):
            scores[row] = value
    return scores


@torch.inference_mode()
def score_likelihood(model: LikelihoodRewardModel, tokenizer, prompts: list[str], completions: list[str], *,
                     batch_tokens: int = 8192, max_length: int = 512, counts: Counter | None = None) -> list[float]:
    """`scale * log p(completion + eos | prompt)` for each row (the likelihood head)."""
    scores = completion_logprobs(model, tokenizer, prompts, completions, batch_tokens=batch_tokens,
                                 max_length=max_length, counts=counts)
    return [model.scale * v for v in scores]


def completion_logprobs(model: LikelihoodRewardModel, tokenizer, prompts: list[str], completions: list[str], *,
                        batch_tokens: int = 8192, max_length: int = 512, counts: Counter | None = None) -> list[float]:
    """log p(completion + eos | prompt) under the model's LM, summed over the completion's tokens."""
    rows = []  # (ids, completion length in tokens)
    for p, c in zip(prompts, completions):
        done = tokenizer(c + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        ids = tokenizer(p, add_special_tokens=False)["input_ids"] + done
        if counts is not None:
            counts["truncated"] += len(ids) > max_length
        rows.append((ids[-max_length:], min(len(done), max_length - 1)))
    device = next(model.parameters()).device
    out = [0.0] * len(rows)
    for batch in token_budget_batches([len(ids) for ids, _ in rows], batch_tokens):
        ids, attn = right_padded([rows[i][0] for i in batch], tokenizer.pad_token_id)  # [b, T] each
        mask = torch.zeros_like(ids, dtype=torch.float32)  # 1 on the completion's tokens
        for row, i in enumerate(batch):
            seq, n = rows[i]
            mask[row, len(seq) - n : len(seq)] = 1
        values = model.completion_logprob(ids.to(device), attn.to(device), mask.to(device))  # [b]
        for row, value in zip(batch, values.cpu().tolist()):
            out[row] = value
    return out


def normalize_scores(scores: list[float], mode: str) -> list[float]:
    """`none`: unchanged; `batch`: (r - mean) / (std + 1e-6) over the batch (std with ddof=0)."""
    if mode == "none" or not scores:
        return scores
    mean = math.fsum(scores) / len(scores)
    std = math.sqrt(math.fsum((s - mean) ** 2 for s in scores) / len(scores))
    return [(s - mean) / (std + 1e-6) for s in scores]


def check_options(*, path: str | None = None, batch_tokens: int = 8192, max_length: int = 512,
                  normalize: str = "none", device: str | None = None) -> None:
    """Refuse a configuration that cannot work, before training (called by `rewards.RewardScorer`)."""
    if not path:
        raise RewardConfigError("reward_model: kwargs.path must name a trained reward model directory")
    if normalize not in NORMALIZE_MODES:
        raise RewardConfigError(f"reward_model: normalize={normalize!r} is not one of {', '.join(NORMALIZE_MODES)}")
    if max_length < 1 or batch_tokens < 1:
        raise RewardConfigError(
            f"reward_model: max_length and batch_tokens must be >= 1, got {max_length}, {batch_tokens}"
        )
    if not Path(path).expanduser().exists():
        raise RewardConfigError(f"reward_model: path {path} does not exist (train one with grpo-rm-train)")


def reward_model(prompts: list[str], completions: list[str], *, path: str | None = None, batch_tokens: int = 8192,
                 max_length: int = 512, normalize: str = "none", device: str | None = None) -> list[float | None]:
    """Score each completion with the trained reward model at `path`.

    Options (``RewardSpec.kwargs``):
        path: directory written by ``grpo-rm-train`` (``<run_dir>/reward_model``).
        batch_tokens: padded tokens per forward pass at most.
        max_length: tokens scored per sequence; longer ones keep their last `max_length` tokens.
        normalize: ``none`` (raw scores) or ``batch`` (zero mean, unit std over the batch scored in this call).
        device: where the model runs (default: ``cuda:$LOCAL_RANK`` if CUDA is available, else ``cpu``).
    """
    check_options(path=path, batch_tokens=batch_tokens, max_length=max_length, normalize=normalize, device=device)
    model, tokenizer = load_reward_model(path, device)
    scores = score_texts(model, tokenizer, list(prompts), list(completions), batch_tokens=batch_tokens,
                         max_length=max_length, counts=_counts)
    return normalize_scores(scores, normalize)


def pop_metrics() -> dict[str, float]:
    """Sequences cut to `max_length` since the last call (logged as ``reward/reward_model_truncated``)."""
    out = {k: float(v) for k, v in _counts.items()}
    _counts.clear()
    return out


# The `reward_model` reward, registered through the `grpo.rewards` entry point (pyproject.toml).
REWARD_MODEL = Reward(reward_model, check_options=check_options, metrics=pop_metrics)
