"""The trainer's update against a short, independent re-implementation of the papers' formulas.

For every aggregation x ratio level x clipping setting, with 2 epochs x 2 mini-batches and old
log-probs that differ from the current ones (so ratios are not 1 and the clip acts), each optimiser
step's gradient from `update_policy` (micro-batched at several sizes) equals the gradient of the
loss written out below on the whole mini-batch in one forward. The recording backend does not move
the weights, so every step's reference is taken at the same parameters.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from grpo.config import AlgorithmConfig
from grpo.core.batch import layout_batch
from grpo.training.update import update_policy
from tests.integration.test_trainer import RecordingBackend, load

T = 0.7  # sampling temperature: the trainer scores logits / T
MAX_NEW = 8


def reference_logprobs(model, input_ids, attention_mask):
    """log pi(token_t+1 | tokens <= t) / T-scaled, [N, T-1], positions counted over real tokens."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, :-1]
    return (logits.float() / T).log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def reference_loss(logp, old, adv, mask, agg, ratio_level, clip_low, clip_high, dual_clip, ref_logp, beta, kl):
    """PPO-clip (Schulman 2017) with DAPO's asymmetric range, GSPO's sequence ratio, dual clip (Ye 2020),
    a KL penalty, and GRPO / DAPO / Dr. GRPO aggregation, written from the formulas."""
    m = mask.bool()
    if ratio_level == "token":
        ratio = torch.exp(torch.where(m, logp - old, 0.0))
    else:  # GSPO-token: s_i = exp(mean_t (logp - old)), value s_i, gradient of exp(logp - sg(logp))
        s = torch.exp(torch.where(m, logp - old, 0.0).sum(1) / mask.sum(1).clamp(min=1)).detach()
        ratio = s[:, None] * torch.exp(logp - logp.detach())
    a = adv[:, None]
    loss = -torch.minimum(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
    if dual_clip is not None:
        loss = torch.where(a < 0, torch.minimum(loss, -dual_clip * a), loss)
    if beta > 0:
        d = ref_logp - logp  # log(pi_ref / pi)
        loss = loss + beta * {"k1": -d, "k2": 0.5 * d**2, "k3": d.exp() - 1 - d}[kl]
    loss = torch.where(m, loss, 0.0)
    if agg == "token_mean":
        return loss.sum() / mask.sum()
    if agg == "seq_mean_token_mean":
        return (loss.sum(1) / mask.sum(1).clamp(min=1)).mean()
    return (loss.sum(1) / MAX_NEW).mean()  # seq_mean_token_sum_norm: Dr. GRPO's constant length


def _batch(model, tok, seed):
    g = torch.Generator().manual_seed(seed)
    n, group = 8, 4
    prompts = [torch.randint(3, 60, (int(k),), generator=g).tolist()
               for k in torch.randint(2, 6, (n // group,), generator=g)]
    completions = [torch.randint(3, 60, (int(k),), generator=g).tolist()
                   for k in torch.randint(1, MAX_NEW + 1, (n,), generator=g)]
    batch = layout_batch(prompts, completions, group, tok.pad_token_id)
    batch.advantages = torch.randn(n, generator=g)
    with torch.no_grad():
        now = reference_logprobs(model, batch.input_ids, batch.attention_mask)
        # per token e^{+-0.4} around a per-sequence shift of e^{+-0.3}: token and sequence ratios both spread
        noise = 0.4 * torch.randn(now.shape, generator=g) + 0.3 * torch.randn(now.shape[0], 1, generator=g)
        batch.old_logprobs = torch.where(batch.completion_mask.bool(), now + noise, 0.0)
        batch.ref_logprobs = torch.where(batch.completion_mask.bool(), now - noise.flip(0), 0.0)
    return batch


CASES = list(itertools.product(
    ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"],
    ["token", "sequence"],
    [(0.2, 0.2, None), (0.2, 0.28, 3.0), (0.0003, 0.0004, None)],
))


@pytest.mark.parametrize("agg, ratio_level, clip", CASES)
def test_every_optimiser_step_has_the_papers_gradient(tiny_random_dir, agg, ratio_level, clip):
    model, tok = load(tiny_random_dir)
    clip_low, clip_high, dual_clip = clip
    beta, kl = (0.05, "k3") if ratio_level == "token" else (0.0, "k3")
    algo = AlgorithmConfig(loss_agg=agg, ratio_level=ratio_level, clip_low=clip_low, clip_high=clip_high,
                           dual_clip=dual_clip, beta=beta, kl_estimator=kl, group_size=4, epochs=2, mini_batches=2)
    batch = _batch(model, tok, seed=CASES.index((agg, ratio_level, clip)))  # fixed: str hashes vary by process
    width = batch.input_ids.shape[1]
    minis = [list(range(0, 4)), list(range(4, 8))]
    expected = []
    for rows in minis:
        model.zero_grad(set_to_none=True)
        ids, attn = batch.input_ids[rows], batch.attention_mask[rows]
        logp = reference_logprobs(model, ids, attn)
        loss = reference_loss(logp, batch.old_logprobs[rows], batch.advantages[rows], batch.completion_mask[rows],
                              agg, ratio_level, clip_low, clip_high, dual_clip, batch.ref_logprobs[rows], beta, kl)
        loss.backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    for rows_per_micro in (1, 3, 4):  # micro-batches of 1, 3 (uneven) and 4 rows
        backend = RecordingBackend(model)
        metrics = update_policy(backend, batch, algo, temperature=T, micro_batch_tokens=rows_per_micro * width,
                                max_new_tokens=MAX_NEW)
        assert len(backend.grads) == 4  # 2 epochs x 2 mini-batches
        for step, grads in enumerate(backend.grads):
            for name, g in expected[step % 2].items():
                torch.testing.assert_close(grads[name], g, atol=2e-6, rtol=1e-4, msg=f"step {step}, {name}")
        assert 0.0 < metrics["train/clip_frac"] < 1.0  # the clip acted on some tokens, not all
