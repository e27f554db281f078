"""Rollout on the policy module itself (no weight copy), with a sampling loop written for GRPO.

transformers' `generate` is general: it prefills each prompt once per returned sequence, and
every step runs its logits processors, stopping criteria and cache bookkeeping. A GRPO rollout
is one narrow case (n samples of each prompt, a few sampling settings), so this engine runs its
own loop over the model's forward:

- each prompt is prefilled once, then its KV cache is repeated for its n samples;
- each step is one forward of the last sampled tokens, then temperature, the EOS/pad
  suppressions, top-k, top-p and a multinomial draw, all batched over the rows;
- rows that finish (EOS, or a stop string found by transformers' `StopStringCriteria`) leave the
  forward: their rows of the KV cache are dropped (`Cache.batch_select_indices`), so each step runs
  only the unfinished rows (`generate` feeds finished rows padding until all finish). The draw still
  runs over all rows, finished ones on placeholder logits whose token is discarded, so the random
  stream is consumed as before and the loop samples exactly the tokens `generate` samples.

Sampling follows transformers' conventions (temperature, then top-k, then top-p; top-p keeps the
smallest set of tokens whose probability reaches `top_p`), and positions follow its left-padding
convention (`attention_mask.cumsum(-1) - 1`), which `grpo.core.logprobs` uses too. The sampler's
log-probs are the behaviour policy's, those of the distribution each token was drawn from: after
temperature, the pad (and early EOS) suppression, top-k and top-p, renormalised, as vLLM's
`processed_logprobs` are. The trainer's log-probs are the unfiltered policy's, so importance
corrections (TIS, MIS) see the filters' mass on both engines alike, and `rollout/logprob_abs_diff`
includes it (and the pad token's probability, which a trained model keeps near 0).
`python -m scripts.bench.rollout_throughput` measures the loop against `generate`.
"""

from __future__ import annotations

import time

import torch
from transformers import StopStringCriteria

from grpo.core.logprobs import flush_denormals
from grpo.rollout import Completions, decode_completion, encode_prompts


class HFRolloutEngine:
    def __init__(self, model, tokenizer, *, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8,
                 min_new_tokens=0, stop=(), batch_size=512, return_logprobs=True):
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.max_new_tokens, self.stop, self.batch_size = max_new_tokens, list(stop), batch_size
        self.min_new_tokens = min_new_tokens  # sampling only: greedy evaluation stops at EOS
        self.return_logprobs = return_logprobs
        self.stop_criteria = StopStringCriteria(tokenizer, self.stop) if self.stop else None

    def sync_weights(self, model) -> float:
        # The engine samples from the policy module itself: nothing to copy.
        self.model = model
        return 0.0

    def generate(self, prompts: list[str], n: int, *, greedy: bool = False) -> Completions:
        tok = self.tokenizer
        return self.generate_from_ids(encode_prompts(tok, prompts), n, greedy=greedy)

    @torch.no_grad()
    def generate_from_ids(self, prompt_ids: list[list[int]], n: int, *, greedy: bool = False,
                          max_new_tokens: int | None = None) -> Completions:
        """`generate` from token-id contexts (a multi-turn episode's whole context so far), at most
        `max_new_tokens` (default: the engine's) new tokens each."""
        rows_per_call = max(1, self.batch_size // n)
        out = Completions(prompt_ids=prompt_ids, completion_ids=[], texts=[], truncated=[],
                          logprobs=[] if self.return_logprobs and not greedy else None)
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            for lo in range(0, len(prompt_ids), rows_per_call):
                self._generate_chunk(prompt_ids[lo : lo + rows_per_call], 1 if greedy else n, greedy, out,
                                     max_new_tokens or self.max_new_tokens)
        finally:
            self.model.train(was_training)
        out.metrics["time/generate_s"] = time.perf_counter() - start
        return out

    def _generate_chunk(self, prompt_ids: list[list[int]], n: int, greedy: bool, out: Completions,
                        max_new_tokens: int) -> None:
        tok, model, device = self.tokenizer, self.model, next(self.model.parameters()).device
        eos, pad = tok.eos_token_id, tok.pad_token_id
        ids, attn = left_padded(prompt_ids, pad, device)  # [B, W] each
        position = (attn.cumsum(-1) - 1).clamp(min=0)  # [B, W]

        # Prefill each prompt once, then give each of its n samples a copy of its cache.
        prefill = model(input_ids=ids, attention_mask=attn, position_ids=position, use_cache=True, logits_to_keep=1)
        cache = prefill.past_key_values
        cache.batch_repeat_interleave(n)
        logits = prefill.logits[:, -1].float().repeat_interleave(n, dim=0)  # [R, V], R = B*n rows
        attn = attn.repeat_interleave(n, dim=0)  # [R, W]
        position = position[:, -1:].repeat_interleave(n, dim=0)  # [R, 1]

        rows = logits.shape[0]
        # Added to the logits before filtering: -inf on pad (a sampled pad would be taken for padding)
        # and, for the first `min_new_tokens` sampled tokens, on EOS.
        suppress = torch.zeros(logits.shape[-1], device=device)  # [V]
        if pad != eos:
            suppress[pad] = float("-inf")
        suppress_eos = suppress.clone()
        suppress_eos[eos] = float("-inf")
        tokens, logps = [], []
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        length = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
        active = torch.arange(rows, device=device)  # [A] the rows still in the forward (and the cache)
        for step in range(max_new_tokens):
            bias = suppress_eos if step < self.min_new_tokens and not greedy else suppress
            token, logp = self._sample(logits, bias, greedy)  # [R], [R]
            token = token.masked_fill(finished, pad)
            tokens.append(token)
            logps.append(logp)
            done = token == eos
            if self.stop_criteria is not None:
                done |= self.stop_criteria(torch.stack(tokens, dim=1), None).to(device)
            length = torch.where(done & ~finished, step + 1, length)
            finished |= done
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            keep = (~finished[active]).nonzero().squeeze(1)  # [A'] positions in the active rows
            if len(keep) < len(active):  # rows finished: drop them from the cache and the forward
                cache.batch_select_indices(keep)
                active, attn, position = active[keep], attn[keep], position[keep]
            attn = torch.cat([attn, attn.new_ones(len(active), 1)], dim=1)  # [A, W + step + 1]
            position = position + 1  # [A, 1]
            step_logits = model(input_ids=token[active, None], attention_mask=attn, position_ids=position,
                                past_key_values=cache, use_cache=True).logits[:, -1].float()  # [A, V]
            # finished rows draw on placeholder logits (their token is replaced by padding): the draw
            # consumes the random stream as `generate`'s does
            logits = step_logits if len(active) == rows else (  # [R, V]
                step_logits.new_zeros(rows, step_logits.shape[-1]).index_copy_(0, active, step_logits))

        self._append(out, torch.stack(tokens, dim=1).cpu(), torch.stack(logps, dim=1).cpu(), length.tolist(),
                     finished.tolist())  # [R, steps] tokens and log-probs

    def _append(self, out: Completions, new: torch.Tensor, token_logp: torch.Tensor, length: list[int],
                finished: list[bool]) -> None:
        """Each row's completion (its first `length` tokens), text, truncation and log-probs, added to `out`."""
        for r in range(new.shape[0]):
            seq = new[r, : length[r]].tolist()
            out.completion_ids.append(seq)
            out.truncated.append(not finished[r])
            out.texts.append(decode_completion(self.tokenizer, seq, self.stop))
            if out.logprobs is not None:
                out.logprobs.append(token_logp[r, : length[r]].tolist())

    def _sample(self, logits: torch.Tensor, bias: torch.Tensor, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if greedy:
            return (logits + bias).argmax(-1), torch.zeros(logits.shape[0], device=logits.device)
        return sample_tokens(logits, bias, self.temperature, self.top_k, self.top_p)


def sample_tokens(logits: torch.Tensor, bias: torch.Tensor, temperature: float, top_k: int,
                  top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of every row [R], drawn from `softmax(top_k_top_p(logits / temperature + bias))`, and its
    log-prob under that same distribution (the behaviour policy's: filtered and renormalised)."""
    scaled = logits / temperature if temperature != 1.0 else logits  # x / 1 is x exactly: one pass less
    filtered = top_k_top_p(scaled + bias, top_k, top_p)  # [R, V] -inf outside what may be drawn
    token = draw(filtered.softmax(-1))  # [R]
    return token, filtered.log_softmax(-1).gather(-1, token[:, None]).squeeze(1)


def draw(probs: torch.Tensor) -> torch.Tensor:
    """`torch.multinomial(probs, 1)` [R], the same token from the same random stream, with denormals flushed to
    zero while it runs. The draw is argmax(p / q), q ~ Exp(1) over the whole vocabulary; a peaked softmax has
    probabilities below 1.2e-38 whose quotients are denormal and slow (`grpo.core.logprobs.flush_denormals`).
    Flushed, they become 0, never the row's maximum (some p is at least 1 / V, and q is a normal float), so the
    argmax is unchanged."""
    with flush_denormals():
        return torch.multinomial(probs, 1).squeeze(1)


def left_padded(prompt_ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask [B, W] of the prompts left-padded to the longest: every completion starts at
    the same column."""
    width = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    return ids.to(device), attn.to(device)


def top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """`logits` [R, V] with the tokens outside the top-k, then outside the top-p nucleus, set to -inf.

    Top-k keeps the k largest logits (ties with the k-th kept too); 0 keeps all. Top-p keeps the
    smallest set of most likely tokens whose probability reaches `top_p`: a token goes when the
    tokens more likely than it already hold `top_p`, so the most likely token always stays.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [R, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = logits.scatter(-1, order, sorted_logits)
    return logits
