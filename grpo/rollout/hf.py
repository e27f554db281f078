"""Rollout with transformers' `generate`, sharing the policy module (no weight copy needed).

Sampling follows the config: temperature, top-p, top-k, max new tokens, stop strings. The
sampler's log-probs are those of the temperature-scaled distribution before top-k/top-p
filtering, which is the distribution the trainer's log-probs are computed under.
"""

from __future__ import annotations

import time

import torch

from grpo.rollout import Completions, decode_completion


class HFRolloutEngine:
    def __init__(self, model, tokenizer, *, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8,
                 min_new_tokens=0, stop=(), batch_size=512, return_logprobs=True):
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.max_new_tokens, self.stop, self.batch_size = max_new_tokens, list(stop), batch_size
        self.min_new_tokens = min_new_tokens  # sampling only: greedy evaluation stops at EOS
        self.return_logprobs = return_logprobs

    def sync_weights(self, model) -> float:
        # The engine samples from the policy module itself: nothing to copy.
        self.model = model
        return 0.0

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, *, greedy: bool = False) -> Completions:
        tok = self.tokenizer
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        rows_per_call = max(1, self.batch_size // n)
        out = Completions(prompt_ids=prompt_ids, completion_ids=[], texts=[], truncated=[],
                          logprobs=[] if self.return_logprobs and not greedy else None)
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            for lo in range(0, len(prompts), rows_per_call):
                self._generate_chunk(prompt_ids[lo : lo + rows_per_call], n, greedy, out)
        finally:
            self.model.train(was_training)
        out.metrics["time/generate_s"] = time.perf_counter() - start
        return out

    def _generate_chunk(self, prompt_ids, n, greedy, out: Completions) -> None:
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        width = max(map(len, prompt_ids))
        ids = torch.full((len(prompt_ids), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):  # left padding: the completion starts at the same column for all
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        kwargs = dict(max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, return_dict_in_generate=True)
        if tok.pad_token_id != tok.eos_token_id:
            kwargs["suppress_tokens"] = [tok.pad_token_id]  # a sampled pad would be taken for padding
        if greedy:
            kwargs.update(do_sample=False, num_return_sequences=1)
        else:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p,
                          top_k=self.top_k or None, num_return_sequences=n, min_new_tokens=self.min_new_tokens,
                          output_logits=out.logprobs is not None)
        if self.stop:
            kwargs.update(stop_strings=self.stop, tokenizer=tok)
        gen = self.model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs)
        new = gen.sequences[:, width:].cpu()  # [rows, <=max_new_tokens]
        if out.logprobs is not None:
            logits = torch.stack(gen.logits, dim=1).float().cpu() / self.temperature  # [rows, steps, V]
            token_logp = logits.log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)  # [rows, steps]
        for r in range(new.shape[0]):
            seq, truncated = self._cut(new[r].tolist())
            out.completion_ids.append(seq)
            out.truncated.append(truncated)
            out.texts.append(self._text(seq))
            if out.logprobs is not None:
                out.logprobs.append(token_logp[r, : len(seq)].tolist())

    def _cut(self, seq: list[int]) -> tuple[list[int], bool]:
        """Keep the sampled tokens up to and including EOS; drop the padding after a finished row."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        if eos in seq:
            return seq[: seq.index(eos) + 1], False
        if pad != eos:
            while seq and seq[-1] == pad:
                seq = seq[:-1]
        stopped = any(s in self._text(seq) for s in self.stop)
        return seq, not stopped and len(seq) >= self.max_new_tokens

    def _text(self, seq: list[int]) -> str:
        return decode_completion(self.tokenizer, seq, self.stop)
