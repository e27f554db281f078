"""The hf engine's log-prob of a sampled token is the behaviour policy's: that of the distribution the token was
drawn from, after the pad suppression, top-k and top-p, renormalised (as vLLM's `processed_logprobs`)."""

from __future__ import annotations

import math

import torch

from grpo.rollout.hf import sample_tokens

# probabilities 0.4, 0.3, 0.2, 0.1 over a vocabulary of 4
LOGITS = torch.tensor([[math.log(0.4), math.log(0.3), math.log(0.2), math.log(0.1)]]).repeat(400, 1)  # [R, V]
NO_BIAS = torch.zeros(4)


def draw(bias=NO_BIAS, temperature=1.0, top_k=0, top_p=1.0) -> dict[int, set[float]]:
    """Each token drawn, with the log-probs reported for it (400 draws)."""
    torch.manual_seed(0)
    token, logp = sample_tokens(LOGITS, bias, temperature, top_k, top_p)
    seen: dict[int, set[float]] = {}
    for t, lp in zip(token.tolist(), logp.tolist()):
        seen.setdefault(t, set()).add(round(lp, 6))
    return seen


def test_top_k_reports_the_renormalised_truncated_distribution():
    # top-k 2 keeps 0.4 and 0.3: renormalised 4/7 and 3/7 (the unfiltered log(0.4) = -0.916 would be wrong)
    seen = draw(top_k=2)
    assert seen == {0: {round(math.log(4 / 7), 6)}, 1: {round(math.log(3 / 7), 6)}}


def test_top_p_and_a_suppressed_token_report_what_is_left():
    # top-p 0.5: token 1 stays (0.4 before it < 0.5), token 2 goes (0.7 before it): again 4/7 and 3/7
    assert draw(top_p=0.5) == {0: {round(math.log(4 / 7), 6)}, 1: {round(math.log(3 / 7), 6)}}
    # the pad token (here 0) suppressed: 0.3, 0.2, 0.1 renormalised over 0.6 -> 1/2, 1/3, 1/6
    pad = torch.tensor([float("-inf"), 0.0, 0.0, 0.0])
    assert draw(bias=pad) == {1: {round(math.log(1 / 2), 6)}, 2: {round(math.log(1 / 3), 6)},
                              3: {round(math.log(1 / 6), 6)}}


def test_temperature_scales_before_the_filter():
    # T = 0.5 squares the probabilities: 0.16, 0.09, 0.04, 0.01 (sum 0.30); top-k 2 -> 16/25 and 9/25
    assert draw(temperature=0.5, top_k=2) == {0: {round(math.log(16 / 25), 6)}, 1: {round(math.log(9 / 25), 6)}}


def test_temperature_one_draws_and_reports_exactly_what_dividing_by_one_does():
    # the sampler skips `logits / 1`: the same random draws, the same log-probs, bit for bit
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))  # [R, V]
    bias = torch.zeros(40)
    bias[3] = float("-inf")
    torch.manual_seed(0)
    token, logp = sample_tokens(logits, bias, 1.0, 0, 1.0)
    torch.manual_seed(0)
    scaled = logits / 1.0 + bias
    ref = torch.multinomial(scaled.softmax(-1), 1).squeeze(1)
    assert torch.equal(token, ref)
    assert torch.equal(logp, scaled.log_softmax(-1).gather(-1, ref[:, None]).squeeze(1))


def test_the_draw_with_denormals_flushed_is_multinomials_and_leaves_the_flag_off():
    from grpo.rollout.hf import draw

    # logits spread over +-80: about a quarter of the probabilities fall below 1.2e-38 (denormal)
    probs = (torch.randn(32, 500, generator=torch.Generator().manual_seed(0)) * 20).softmax(-1)  # [R, V]
    assert ((probs > 0) & (probs < torch.finfo(torch.float32).tiny)).any()
    torch.manual_seed(3)
    ours = draw(probs)
    torch.manual_seed(3)
    assert torch.equal(ours, torch.multinomial(probs, 1).squeeze(1))
    tiny = torch.tensor([torch.finfo(torch.float32).tiny])
    assert (tiny * 0.5).item() > 0  # denormals are back on for the model's own arithmetic
