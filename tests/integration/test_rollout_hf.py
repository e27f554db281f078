"""The transformers rollout engine's own sampling loop, checked against transformers' `generate`
and its logits warpers on a tiny random model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TopKLogitsWarper, TopPLogitsWarper

from grpo.rollout.hf import HFRolloutEngine, top_k_top_p

PROMPTS = ["1+1=", "12+345=", "9=", "abc def+1="]  # different lengths: left padding differs per row


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_random_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_random_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_random_dir)


def reference_generate(model, tok, prompts, n, **kwargs) -> list[list[int]]:
    """transformers' `generate` on the same left-padded batch, completions cut after EOS."""
    enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt", padding_side="left")
    if tok.pad_token_id != tok.eos_token_id:
        kwargs["suppress_tokens"] = [tok.pad_token_id]
    seqs = model.generate(**enc, num_return_sequences=n, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, **kwargs)[:, enc["input_ids"].shape[1]:]
    out = []
    for row in seqs.tolist():
        out.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return out


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (7, 0.6), (0, 0.05)])
def test_filter_keeps_the_tokens_transformers_warpers_keep(top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g) * 3  # [R, V]
    expected = logits
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = top_k_top_p(logits, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got[~torch.isinf(got)], logits[~torch.isinf(got)])
    assert (~torch.isinf(got)).any(-1).all()  # every row keeps its most likely token


def test_greedy_equals_generate_under_left_padding(model_and_tokenizer):
    model, tok = model_and_tokenizer
    engine = HFRolloutEngine(model, tok, max_new_tokens=10)
    out = engine.generate(PROMPTS, n=1, greedy=True)
    assert out.completion_ids == reference_generate(model, tok, PROMPTS, 1, do_sample=False, max_new_tokens=10)
    assert out.logprobs is None


def test_sampling_draws_what_generate_draws_from_the_same_seed(model_and_tokenizer):
    # Same distribution per step and the same multinomial calls on the same random stream: the
    # loop samples exactly the tokens `generate` samples (prefilling each prompt once changes no logit
    # by more than float32 rounding).
    model, tok = model_and_tokenizer
    settings = dict(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=8)
    torch.manual_seed(3)
    out = HFRolloutEngine(model, tok, **settings).generate(PROMPTS, n=3)
    torch.manual_seed(3)
    ref = reference_generate(model, tok, PROMPTS, 3, do_sample=True, **settings)
    assert out.completion_ids == ref
    assert sum(map(len, ref)) > 2 * len(ref)  # several tokens per completion


def test_min_new_tokens_holds_eos_back_and_logprobs_are_the_samplers(model_and_tokenizer):
    model, tok = model_and_tokenizer
    engine = HFRolloutEngine(model, tok, temperature=1.3, max_new_tokens=6, min_new_tokens=6)
    out = engine.generate(PROMPTS, n=2)
    assert all(len(c) == 6 and tok.eos_token_id not in c for c in out.completion_ids)
    assert out.truncated == [True] * 8
    # Each log-prob is that of the sampled token under the distribution it was drawn from: softmax(logits / T)
    # with EOS (held back) and pad (never sampled) removed and the rest renormalised, by a plain forward.
    for i, (comp, lps) in enumerate(zip(out.completion_ids, out.logprobs)):
        prompt = out.prompt_ids[i // 2]
        logits = model(torch.tensor([prompt + comp])).logits[0, len(prompt) - 1 : -1]  # [C, V]
        logits[:, [tok.eos_token_id, tok.pad_token_id]] = float("-inf")
        expected = (logits / 1.3).log_softmax(-1).gather(-1, torch.tensor(comp)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lps), expected, atol=1e-5, rtol=0)


def test_a_stop_string_ends_its_row_only(model_and_tokenizer):
    model, tok = model_and_tokenizer
    torch.manual_seed(0)
    free = HFRolloutEngine(model, tok, temperature=1.5, max_new_tokens=12, min_new_tokens=12).generate(PROMPTS, n=4)
    # A stop string that some sampled rows contain and others do not: their most common character.
    chars = [c for t in free.texts for c in t if c.strip()]
    stop = max(set(chars), key=chars.count)
    assert 0 < sum(stop in t for t in free.texts) < len(free.texts)
    torch.manual_seed(0)
    out = HFRolloutEngine(model, tok, temperature=1.5, max_new_tokens=12, min_new_tokens=12,
                          stop=[stop]).generate(PROMPTS, n=4)
    assert out.completion_ids != free.completion_ids
    for full, ids, text, truncated in zip(free.texts, out.completion_ids, out.texts, out.truncated):
        if stop in full:  # cut right after the token that completed the stop string; the text before it
            assert not truncated and tok.decode(ids).endswith(stop) and text == full[: full.index(stop)]
        else:
            assert truncated and len(ids) == 12 and text == full


def test_finished_rows_leave_the_forward_and_the_draws_stay_generates(model_and_tokenizer):
    # EOS made likely (a logit bias while sampling), so rows finish at different steps: the loop then runs
    # only the unfinished rows, yet samples the tokens `generate` samples, which feeds every row to the end.
    model, tok = model_and_tokenizer
    rows_per_forward = []

    def eos_bias(module, args, output):
        if not torch.is_grad_enabled():
            output.logits[:, -1, tok.eos_token_id] += 4.0
            rows_per_forward.append(output.logits.shape[0])

    handle = model.register_forward_hook(eos_bias)
    try:
        settings = dict(temperature=1.0, top_k=0, max_new_tokens=12)  # generate: no top-k either
        torch.manual_seed(5)
        out = HFRolloutEngine(model, tok, **settings).generate(PROMPTS, n=4)
        ours_rows = list(rows_per_forward)
        torch.manual_seed(5)
        ref = reference_generate(model, tok, PROMPTS, 4, do_sample=True, **settings)
    finally:
        handle.remove()
    assert out.completion_ids == ref
    lengths = sorted(map(len, ref))
    assert lengths[0] < lengths[-1] and lengths[-1] > 2  # rows finished at different steps
    # prefill (4 prompts), then one forward per step after the first of the rows not yet finished
    expected = [len(PROMPTS)] + [sum(n > step for n in lengths) for step in range(1, lengths[-1])]
    assert ours_rows == expected
    # and the sampler's log-probs are those of the biased distribution, as before
    assert all(len(lp) == len(c) for lp, c in zip(out.logprobs, out.completion_ids))
