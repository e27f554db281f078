"""The trainer's update against a short, independent re-implementation of the papers' formulas.

For every aggregation x ratio level x clipping setting, with 2 epochs x 2 mini-batches and old
log-probs that differ from the current ones (so ratios are not 1 and the clip acts), each optimiser
step's gradient from `update_policy` (micro-batched at several sizes) equals the gradient of the
loss written out below on the whole mini-batch in one forward. The recording backend does not move
the weights, so every step's reference is taken at the same parameters. The same holds for every other
policy loss (`algorithm.policy_loss`: CISPO, GMPO, SAPO, Clip-Cov, KL-Cov) against its paper's formula.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from grpo.config import AlgorithmConfig, CISPOOptions, ClipCovOptions, GMPOOptions, KLCovOptions, SAPOOptions
from grpo.core.batch import layout_batch
from grpo.training.update import update_policy
from tests.integration.test_trainer import RecordingBackend, load

T = 0.7  # sampling temperature: the trainer scores logits / T
MAX_NEW = 8
OPTION_GROUPS = {"cispo": CISPOOptions, "gmpo": GMPOOptions, "sapo": SAPOOptions, "clip_cov": ClipCovOptions,
                 "kl_cov": KLCovOptions}


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


def update_matches(model, batch, algo, expected: list[dict], micro_batch_tokens: int) -> dict:
    """One real `update_policy` (2 epochs x 2 mini-batches) in micro-batches of `micro_batch_tokens`: each of its
    4 optimiser steps' gradients equals `expected[step % 2]` (the reference's per mini-batch); returns its metrics."""
    backend = RecordingBackend(model)
    metrics = update_policy(backend, batch, algo, temperature=T, micro_batch_tokens=micro_batch_tokens,
                            max_new_tokens=MAX_NEW)
    assert len(backend.grads) == 4  # 2 epochs x 2 mini-batches
    for step, grads in enumerate(backend.grads):
        for name, g in expected[step % 2].items():
            torch.testing.assert_close(grads[name], g, atol=2e-6, rtol=1e-4, msg=f"step {step}, {name}")
    return metrics


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
        metrics = update_matches(model, batch, algo, expected, rows_per_micro * width)
        assert 0.0 < metrics["train/clip_frac"] < 1.0  # the clip acted on some tokens, not all


# ---------------------------------------------------------------- the other policy losses (algorithm.policy_loss)

SAPO_HALF = 2 * math.log(1 + math.sqrt(2))  # |tau (r - 1)| beyond which SAPO's gate weight 4 s (1 - s) is below 1/2


def reference_policy_loss(name, logp, old, adv, mask, agg, opts, ref_logp, beta):
    """Each paper's loss on one mini-batch, written from its formula, and the tokens its restraint acted on."""
    m, a = mask.bool(), adv[:, None]
    log_r = torch.where(m, logp - old, 0.0)
    r = log_r.exp()
    cov = None
    if name in ("clip_cov", "kl_cov"):  # (A_t - mean A)(log pi_t - mean log pi) over the mini-batch's tokens
        a_tok, lp = a.expand_as(logp)[m], logp.detach()[m]
        cov = torch.full_like(logp, -math.inf)
        cov[m] = (a_tok - a_tok.mean()) * (lp - lp.mean())
    if name == "gmpo":  # the paper's sequence objective, gradient through the geometric mean itself
        c = torch.where(a > 0, log_r.clamp(max=opts["eps_high"]), log_r.clamp(min=-opts["eps_low"]))
        s = (torch.where(m, c, 0.0).sum(1) / mask.sum(1)).exp()
        weights = 1 / len(adv) if agg == "seq_mean_token_mean" else mask.sum(1) / mask.sum()  # token_mean: |y_i| / N
        loss = (weights * -adv * s).sum()
        clipped = m & (((a > 0) & (log_r > opts["eps_high"])) | ((a < 0) & (log_r < -opts["eps_low"])))
        if beta:
            loss = loss + beta * aggregate_reference(kl_k3(logp, ref_logp), mask, agg)
        return loss, clipped
    if name == "cispo":
        w = r.clamp(1 - opts["eps_low"], 1 + opts["eps_high"]).detach()
        per_token, clipped = -w * a * logp, m & (w != r)
    elif name == "sapo":
        tau = torch.where(a > 0, opts["tau_pos"], opts["tau_neg"])
        per_token = -a * 4 / tau * torch.sigmoid(tau * (r - 1))
        clipped = m & ((tau * (r - 1)).abs() > SAPO_HALF)
    elif name == "clip_cov":  # every candidate detached: the test keeps their count within k
        clipped = m & (cov > opts["cov_low"]) & (cov < opts["cov_high"])
        assert 1 <= int(clipped.sum()) <= max(1, int(opts["fraction"] * mask.sum())), "no or too many candidates"
        per_token = torch.where(clipped, (-a * r).detach(), -a * r)
    else:  # kl_cov: the k largest covariances get coef |log r|
        k = max(1, int(opts["fraction"] * mask.sum()))
        clipped = torch.zeros_like(m).flatten()
        clipped[cov.flatten().argsort(descending=True)[:k]] = True
        clipped = clipped.view_as(m)
        per_token = -a * r + torch.where(clipped, opts["coef"] * log_r.abs(), 0.0)
    if beta:
        per_token = per_token + beta * kl_k3(logp, ref_logp)
    return aggregate_reference(torch.where(m, per_token, 0.0), mask, agg), clipped


def kl_k3(logp, ref_logp):
    d = ref_logp - logp
    return d.exp() - 1 - d


def aggregate_reference(loss, mask, agg):
    loss = torch.where(mask.bool(), loss, 0.0)
    if agg == "token_mean":
        return loss.sum() / mask.sum()
    return (loss.sum(1) / mask.sum(1).clamp(min=1)).mean()  # seq_mean_token_mean


# (loss, aggregation, its options, KL weight, micro-batch sizes in rows). The ratio losses are checked split into
# micro-batches of 1, 3 and 4 rows; the covariance losses pick their tokens within a micro-batch, so in one.
# Clip ranges and temperatures narrower than the defaults, so the restraint acts on some of these tokens.
POLICY_LOSS_CASES = [
    ("cispo", "token_mean", {"eps_low": 0.2, "eps_high": 0.2}, 0.05, (1, 3, 4)),
    ("gmpo", "seq_mean_token_mean", {"eps_low": 0.4, "eps_high": 0.4}, 0.0, (1, 3, 4)),
    ("gmpo", "token_mean", {"eps_low": 0.3, "eps_high": 0.3}, 0.05, (1, 4)),
    ("sapo", "seq_mean_token_mean", {"tau_pos": 4.0, "tau_neg": 5.0}, 0.05, (1, 3, 4)),
    ("clip_cov", "token_mean", {"fraction": 0.5, "cov_low": 0.5, "cov_high": 5.0}, 0.0, (4,)),
    ("kl_cov", "token_mean", {"fraction": 0.2, "coef": 1.0}, 0.0, (4,)),
]


@pytest.mark.parametrize("name, agg, opts, beta, micro_rows", POLICY_LOSS_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in POLICY_LOSS_CASES])
def test_every_policy_loss_step_has_its_papers_gradient(tiny_random_dir, name, agg, opts, beta, micro_rows):
    """One real update (2 epochs x 2 mini-batches, old log-probs off the current ones) per loss: every optimiser
    step's gradient equals its paper's loss's, and train/clip_frac counts the tokens its restraint acted on.
    Mutation caught: the update ignoring algorithm.policy_loss (ppo_clip's gradient), a loss handed another loss's
    options, the KL term left out under a loss other than ppo_clip, or train/clip_frac still PPO's clip count."""
    model, tok = load(tiny_random_dir)
    algo = AlgorithmConfig(policy_loss=name, loss_agg=agg, beta=beta, group_size=4, epochs=2, mini_batches=2,
                           **{name: OPTION_GROUPS[name](**opts)})
    algo.validate()
    batch = _batch(model, tok, seed=100 + POLICY_LOSS_CASES.index((name, agg, opts, beta, micro_rows)))
    width = batch.input_ids.shape[1]
    expected, fractions = [], []
    for rows in ([0, 1, 2, 3], [4, 5, 6, 7]):
        model.zero_grad(set_to_none=True)
        logp = reference_logprobs(model, batch.input_ids[rows], batch.attention_mask[rows])
        mask = batch.completion_mask[rows]
        loss, clipped = reference_policy_loss(name, logp, batch.old_logprobs[rows], batch.advantages[rows], mask,
                                              agg, opts, batch.ref_logprobs[rows], beta)
        loss.backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        fractions.append(int(clipped.sum()) / int(mask.sum()))
    model.zero_grad(set_to_none=True)
    assert 0.0 < sum(fractions) / 2 < 1.0  # the restraint acted on some tokens, not all
    for rows_per_micro in micro_rows:
        metrics = update_matches(model, batch, algo, expected, rows_per_micro * width)
        assert metrics["train/clip_frac"] == pytest.approx(sum(fractions) / 2, abs=1e-9)
