"""Chunked log-probs against the full-logits reference, on a tiny random Qwen2 model."""

import pytest
import torch

from grpo.core.logprobs import head_chunks, naive_sequence_logprobs, sequence_logprobs
from grpo.core.packing import token_budget_batches

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
VOCAB = 50


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        intermediate_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.Qwen2ForCausalLM(config).float().eval()


def left_padded(seqs: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into `input_ids, attention_mask`, both `[B, T]`."""
    T = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (T - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (9, 4, 12, 7)]
    return left_padded(seqs)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])  # 1000 > B*(T-1) = 44: a single chunk
def test_chunked_matches_naive(model, batch, chunk_size, temperature):
    ids, mask = batch
    with torch.no_grad():
        lp, ent = sequence_logprobs(
            model, ids, mask, temperature=temperature, chunk_size=chunk_size, with_entropy=True
        )
        ref_lp, ref_ent = naive_sequence_logprobs(model, ids, mask, temperature=temperature, with_entropy=True)
    assert lp.shape == ent.shape == (4, 11) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref_lp, atol=ATOL, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=ATOL, rtol=0)
    # Entropy of a distribution over 50 tokens lies in (0, log 50] where the target is real; 0 where it is padding.
    real = mask[:, 1:].bool()
    assert (ent[real] > 0).all() and (ent[real] <= torch.log(torch.tensor(50.0)) + ATOL).all()
    assert (ent[~real] == 0).all() and (lp[~real] == 0).all() and (lp[real] < 0).all()


def test_naive_is_log_softmax_of_model_logits(model, batch):
    # The reference itself, spelled out for one position: row 2 is unpadded, column 5 scores token 6.
    ids, mask = batch
    with torch.no_grad():
        ref_lp, _ = naive_sequence_logprobs(model, ids, mask, temperature=0.7)
        logits = model(input_ids=ids[2:3], attention_mask=mask[2:3]).logits[0, 5]  # [V]
    expected = torch.log_softmax(logits / 0.7, -1)[ids[2, 6]]
    torch.testing.assert_close(ref_lp[2, 5], expected, atol=ATOL, rtol=0)


def test_logits_to_keep_from_zeros_the_skipped_columns(model, batch):
    ids, mask = batch
    with torch.no_grad():
        lp, ent = sequence_logprobs(model, ids, mask, chunk_size=5, with_entropy=True, logits_to_keep_from=6)
        ref_lp, ref_ent = naive_sequence_logprobs(model, ids, mask, with_entropy=True)
    assert lp.shape == ent.shape == (4, 11)
    assert (lp[:, :6] == 0).all() and (ent[:, :6] == 0).all()
    torch.testing.assert_close(lp[:, 6:], ref_lp[:, 6:], atol=ATOL, rtol=0)
    torch.testing.assert_close(ent[:, 6:], ref_ent[:, 6:], atol=ATOL, rtol=0)
    # The reference follows the same contract.
    naive_lp, _ = naive_sequence_logprobs(model, ids, mask, logits_to_keep_from=6)
    torch.testing.assert_close(naive_lp, lp, atol=ATOL, rtol=0)


def right_padded_completions(prompts: list[list[int]], completions: list[list[int]]):
    """`[left-padded prompts | right-padded completions]` as the update lays a batch out; returns the ids,
    the mask and the prompt width P (column P-1 scores the first completion token)."""
    ids, mask = left_padded(prompts)
    C = max(len(c) for c in completions)
    tail = torch.tensor([c + [0] * (C - len(c)) for c in completions])
    tail_mask = torch.tensor([[1] * len(c) + [0] * (C - len(c)) for c in completions])
    return torch.cat([ids, tail], 1), torch.cat([mask, tail_mask], 1), ids.shape[1]


def test_the_head_sees_only_positions_that_score_a_real_completion_token(model):
    # prompts of 3 and 5 tokens (width 5), completions of 6 and 2 tokens (width 6): 2 x 6 = 12 completion
    # columns, of which 6 + 2 = 8 score a real token; the other 4 are padding and must never reach the head.
    g = torch.Generator().manual_seed(2)
    draw = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    ids, mask, P = right_padded_completions([draw(3), draw(5)], [draw(6), draw(2)])
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    try:
        lp, ent = sequence_logprobs(model, ids, mask, with_entropy=True, logits_to_keep_from=P - 1)
    finally:
        hook.remove()
    assert sum(rows) == 8
    ref_lp, ref_ent = naive_sequence_logprobs(model, ids, mask, with_entropy=True, logits_to_keep_from=P - 1)
    torch.testing.assert_close(lp, ref_lp, atol=ATOL, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=ATOL, rtol=0)
    assert (lp[1, P + 1 :] == 0).all() and (lp[1, P - 1 : P + 1] != 0).all()  # 2 real tokens, then padding: 0
    ref = _grads(model, naive_sequence_logprobs, ids, mask, logits_to_keep_from=P - 1)
    got = _grads(model, sequence_logprobs, ids, mask, logits_to_keep_from=P - 1, chunk_size=3)
    model.zero_grad(set_to_none=True)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=ATOL, rtol=0, msg=name)


def test_without_entropy_returns_none(model, batch):
    ids, mask = batch
    assert sequence_logprobs(model, ids, mask)[1] is None
    assert naive_sequence_logprobs(model, ids, mask)[1] is None


def _grads(model, fn, ids, mask, **kw):
    model.zero_grad(set_to_none=True)
    lp, ent = fn(model, ids, mask, with_entropy=True, **kw)
    loss_mask = mask[:, 1:].float()  # [B, T-1]: score real targets only
    assert not ent.requires_grad  # a metric: no graph is kept for it
    (lp * loss_mask).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gradients_match_naive(model, batch):
    ids, mask = batch
    ref = _grads(model, naive_sequence_logprobs, ids, mask, temperature=0.7)
    got = _grads(model, sequence_logprobs, ids, mask, temperature=0.7, chunk_size=7)
    model.zero_grad(set_to_none=True)
    assert ref.keys() == got.keys()
    for name in ref:
        assert ref[name].abs().sum() > 0, name  # every parameter takes part, so the comparison means something
        torch.testing.assert_close(got[name], ref[name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("packing", ["padded", "groups"])
def test_num_chunks_pads_with_empty_head_calls_in_forward_and_recomputation(model, packing):
    # Under ZeRO-3 every call of the output embedding gathers its weight, so ranks must call it as often.
    # Completions of 6 and 2 tokens score 8 positions: chunks of 3 -> 3 calls [3, 3, 2]; one chunk of 8 padded to
    # num_chunks=3 -> [8, 0, 0]. Both checkpoint their chunks, so backward recomputes each: 6 calls either way
    # (1 without num_chunks: a lone chunk is not checkpointed).
    g = torch.Generator().manual_seed(3)
    draw = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    ids, mask, P = right_padded_completions([draw(3), draw(5)], [draw(6), draw(2)])
    assert head_chunks(mask, P - 1, VOCAB, 3) == 3 and head_chunks(mask, P - 1, VOCAB, 1000) == 1
    kw = dict(logits_to_keep_from=P - 1, packing=packing)
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        ref = _grads(model, sequence_logprobs, ids, mask, chunk_size=1000, **kw)  # one chunk, not checkpointed
        got = _grads(model, sequence_logprobs, ids, mask, chunk_size=1000, num_chunks=3, **kw)
        split = _grads(model, sequence_logprobs, ids, mask, chunk_size=3, num_chunks=2, **kw)
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
    # backward recomputes the chunks last to first; num_chunks below the count pads nothing
    assert calls == [8] + [8, 0, 0] + [0, 0, 8] + [3, 3, 2] + [2, 3, 3]
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=ATOL, rtol=0, msg=name)
        torch.testing.assert_close(split[name], ref[name], atol=ATOL, rtol=0, msg=name)


def test_left_padding_invariance(model):
    short, long = [5, 17, 3, 44, 9, 21], [8, 1, 30, 2, 2, 41, 7, 13, 19, 4]
    alone_ids, alone_mask = left_padded([short])
    ids, mask = left_padded([short, long])  # short gets 4 pad tokens in front
    with torch.no_grad():
        alone, _ = sequence_logprobs(model, alone_ids, alone_mask, chunk_size=3)  # [1, 5]
        padded, _ = sequence_logprobs(model, ids, mask, chunk_size=3)  # [2, 9]
        # Same batch with the padding attended: the short sequence now sees 4 extra tokens.
        unmasked, _ = sequence_logprobs(model, ids, torch.ones_like(mask), chunk_size=3)
    # Column t scores token t+1; the short sequence's tokens 1..5 sit at 5..9 in the batch: columns 4..8.
    torch.testing.assert_close(padded[0, 4:], alone[0], atol=ATOL, rtol=0)
    assert (unmasked[0, 4:] - alone[0]).abs().max() > 1e-3  # the invariance above is not vacuous
    # Qwen2's rotary positions are relative, so a constant shift of the positions changes nothing
    # beyond rounding; explicit position ids matter for absolute-position models and for matching generate.


def test_matches_generate_scores(model):
    # The trainer must score a completion at the positions transformers' generate sampled it at.
    ids, mask = left_padded([[5, 17, 3], [8, 1, 30, 2, 2, 41]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
        full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
        lp, _ = sequence_logprobs(model, out.sequences, full_mask, logits_to_keep_from=5)  # prompt width 6
    sampler = torch.stack(out.logits, dim=1).log_softmax(-1)  # [B, 4, V]
    sampler = sampler.gather(-1, out.sequences[:, 6:, None]).squeeze(-1)  # [B, 4]
    torch.testing.assert_close(lp[:, 5:], sampler, atol=ATOL, rtol=0)


def test_refuses_softcapped_head(model, batch):
    ids, mask = batch
    model.config.final_logit_softcapping = 30.0
    try:
        with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
            sequence_logprobs(model, ids, mask)
    finally:
        model.config.final_logit_softcapping = None


def test_rejects_bad_arguments(model, batch):
    ids, mask = batch
    with pytest.raises(ValueError, match="logits_to_keep_from"):
        sequence_logprobs(model, ids, mask, logits_to_keep_from=12)
    with pytest.raises(ValueError, match="temperature"):
        sequence_logprobs(model, ids, mask, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_logprobs(model, ids, mask, chunk_size=0)


@pytest.mark.parametrize(
    "lengths, max_tokens, expected",
    [
        # [0,1] costs max(3,5)*2 = 10 <= 10; adding 2 would cost 5*3 = 15. [2,3] costs 2*2 = 4; adding 4: 8*3 = 24.
        ([3, 5, 2, 2, 8], 10, [[0, 1], [2, 3], [4]]),
        # All length 4, budget 12: three per micro-batch (4*3 = 12), the fourth starts a new one.
        ([4, 4, 4, 4, 4], 12, [[0, 1, 2], [3, 4]]),
        # A sequence over budget (20 > 10) sits alone; neighbours are not merged across it.
        ([2, 20, 2, 2], 10, [[0], [1], [2, 3]]),
        # A short sequence after a long one pays the long one's padded length: 9*2 = 18 > 10.
        ([9, 1, 1], 10, [[0], [1, 2]]),
        ([], 10, []),
    ],
)
def test_token_budget_batches(lengths, max_tokens, expected):
    batches = token_budget_batches(lengths, max_tokens)
    assert batches == expected
    assert [i for b in batches for i in b] == list(range(len(lengths)))


def test_token_budget_batches_rejects_zero_budget():
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_batches([1, 2], 0)


def test_score_logits_tempers_by_division_and_skips_no_arithmetic_at_one():
    import math

    import torch.nn.functional as F

    from grpo.core.logprobs import _score_logits

    # probabilities 0.5, 0.25, 0.25; at T = 2 they go as their square roots, 0.7071 : 0.5 : 0.5,
    # so token 0 has 0.7071 / 1.7071 = 0.4142 -> log -0.8814 (untempered it would be log 0.5 = -0.6931)
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]])
    lp, _ = _score_logits(logits, torch.tensor([0]), 2.0, False)
    assert lp.item() == pytest.approx(math.log(math.sqrt(0.5) / (math.sqrt(0.5) + 1.0)), abs=1e-6)
    # At T = 1 the division is skipped: log-probs and their gradients are bit for bit those of x / 1.
    x = torch.randn(5, 49, generator=torch.Generator().manual_seed(0), requires_grad=True)
    targets = torch.arange(5) * 7
    ours, _ = _score_logits(x, targets, 1.0, False)
    (g_ours,) = torch.autograd.grad((ours * torch.arange(1.0, 6.0)).sum(), x)
    ref = F.log_softmax(x.float() / 1.0, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    (g_ref,) = torch.autograd.grad((ref * torch.arange(1.0, 6.0)).sum(), x)
    assert torch.equal(ours, ref) and torch.equal(g_ours, g_ref)


def test_entropy_with_denormals_flushed_is_the_plain_sum_and_leaves_the_flag_off():
    from grpo.core.logprobs import _score_logits

    # logits spread over +-80: about a quarter of exp(log p) are below 1.2e-38 (denormal), flushed while summing
    logits = torch.randn(16, 4000, generator=torch.Generator().manual_seed(0)) * 20  # [N, V]
    logp = torch.log_softmax(logits, -1)
    assert ((logp.exp() > 0) & (logp.exp() < torch.finfo(torch.float32).tiny)).any()
    _, ent = _score_logits(logits, torch.zeros(16, dtype=torch.long), 1.0, True)
    assert torch.equal(ent, -(logp.exp() * logp).sum(-1))
    assert (torch.tensor([torch.finfo(torch.float32).tiny]) * 0.5).item() > 0  # back on for what follows
