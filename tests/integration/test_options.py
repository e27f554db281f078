"""Each documented loss option through the real loop: one `train_step` with the option against the
same step without it, from the same seed (so the same completions are sampled).

A spy on `update_policy` keeps the batch the loop hands to the update; each test checks that the
option changes what it claims to change (the advantages, the rewards, the mask, the KL term, the
number of optimiser steps) and leaves the rest of that batch as it was. The options that act inside the
surrogate (`ratio_level`, the clip range, `dual_clip`) are checked on a second pass over the batch
(`algorithm.epochs=2`, where the ratio is no longer 1), through a spy on `clipped_surrogate` that keeps each
token's loss and its gradient with respect to the token's log-prob.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo.algorithms import grpo as trainer
from grpo.core import losses
from grpo.training.update import score_logprobs
from tests.conftest import compose
from tests.integration.test_trainer import _dropout_model_dir, pad_probability


def parity_reward(prompts, completions, **_):
    """1 for an even-length completion, else 0: a reward with a signal on a random model."""
    return [float(len(c) % 2 == 0) for c in completions]


PATTERN = [1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1]  # 4 groups of 4


def pattern_reward(prompts, completions, **_):
    """`PATTERN` by position, whatever the completions: groups whose advantages are worked out by hand."""
    return [float(PATTERN[i]) for i in range(len(completions))]


PATTERN_REWARD = "reward.functions=[{name: 'tests.integration.test_options:pattern_reward'}]"
REAL_UPDATE = trainer.update_policy
REAL_SURROGATE = losses.clipped_surrogate  # what the ppo_clip policy loss calls
BASE = ["model=hf", "model.dtype=float32", "train.max_steps=2", "train.eval_before=false", "train.eval_every=0",
        "tracking.progress_bar=false", "train.prompts_per_step=4", "algorithm.group_size=4",
        "rollout.max_new_tokens=6", "optim.lr=1e-3", "optim.warmup_steps=0",
        "reward.functions=[{name: 'tests.integration.test_options:parity_reward'}]"]


def steps(tmp_path, model_dir, monkeypatch, *overrides, n=1):
    """`n` real train steps; returns per step (metrics, groups, the batch and algo update_policy got,
    the optimiser steps it took) and the policy's weights after the last."""
    from grpo.training.run import build_run

    cfg = compose([*BASE, f"model.path={model_dir}", *overrides])
    cfg.run_dir = str(tmp_path / "_".join(o.split(".")[-1] for o in overrides) or "base")
    run = build_run(cfg)
    seen = []

    def spy(backend, batch, algo, **kwargs):
        optimiser_steps = []
        real_step = backend.step
        backend.step = lambda *a, **k: optimiser_steps.append(1) or real_step(*a, **k)
        try:
            out = REAL_UPDATE(backend, batch, algo, **kwargs)
        finally:
            backend.step = real_step
        seen.append(SimpleNamespace(batch=batch, algo=algo, optimiser_steps=len(optimiser_steps)))
        return out

    monkeypatch.setattr(trainer, "update_policy", spy)
    out = []
    for step in range(1, n + 1):
        result = trainer.train_step(run, step)
        assert result.skipped is None, result.skipped
        out.append(SimpleNamespace(metrics=result.metrics, groups=result.groups, **vars(seen[-1])))
    run.tracker.close(plot=False)
    return out, {name: p.detach().clone() for name, p in run.policy.named_parameters()}


def same_rollout(a, b):
    """The two steps sampled the same completions, laid out the same way."""
    assert a.groups.texts == b.groups.texts
    assert torch.equal(a.batch.input_ids, b.batch.input_ids)


def weights_differ(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def surrogate_calls(monkeypatch) -> list:
    """A list that receives, for every call of the clipped surrogate in the update, its inputs (`logp`, `old`,
    `adv` [N, 1], `mask`), each token's loss and d loss_t / d logp_t (each token's loss depends on its own
    log-prob only, at either ratio level, so the gradient of the sum gives them all)."""
    calls = []

    def spy(logp, old_logp, advantages, mask, *args):
        loss = REAL_SURROGATE(logp, old_logp, advantages, mask, *args)  # [N, T]
        (grad,) = torch.autograd.grad(loss.sum(), logp, retain_graph=True)  # [N, T]; the update's backward follows
        calls.append(SimpleNamespace(logp=logp.detach(), old=old_logp.detach(), adv=advantages[:, None],
                                     mask=mask.bool(), loss=loss.detach(), grad=grad))
        return loss

    monkeypatch.setattr(losses, "clipped_surrogate", spy)
    return calls


def second_pass(tmp_path, model_dir, monkeypatch, *overrides):
    """The surrogate's call on the second of two passes over one step's batch (`PATTERN`'s rewards), with a
    ratio `r` [N, T] the first pass's optimiser step moved away from 1; the same first pass for any clip setting,
    since its ratio is exactly 1."""
    calls = surrogate_calls(monkeypatch)
    steps(tmp_path, model_dir, monkeypatch, PATTERN_REWARD, "algorithm.epochs=2", *overrides)
    assert len(calls) == 2  # one micro-batch per pass
    first, second = calls
    assert torch.equal(first.logp[first.mask], first.old[first.mask])  # on the first pass the ratio is 1
    second.r = (second.logp - second.old).exp()  # [N, T]
    return second


def test_negative_weight_scales_only_the_negative_advantages(tmp_path, tiny_random_dir, monkeypatch):
    (base,), w_base = steps(tmp_path, tiny_random_dir, monkeypatch)
    (half,), w_half = steps(tmp_path, tiny_random_dir, monkeypatch, "algorithm.negative_weight=0.5")
    same_rollout(base, half)
    a, b = base.batch.advantages, half.batch.advantages
    assert (a < 0).any() and (a > 0).any()
    torch.testing.assert_close(b[a < 0], 0.5 * a[a < 0], atol=0, rtol=0)
    torch.testing.assert_close(b[a >= 0], a[a >= 0], atol=0, rtol=0)
    assert torch.equal(base.batch.completion_mask, half.batch.completion_mask)
    assert base.groups.rewards == half.groups.rewards
    assert weights_differ(w_base, w_half) > 0  # a different update


def test_overlong_shaping_adds_dapos_ramp_to_the_reward_and_nothing_else(tmp_path, tiny_random_dir, monkeypatch):
    (base,), _ = steps(tmp_path, tiny_random_dir, monkeypatch)
    (shaped,), _ = steps(tmp_path, tiny_random_dir, monkeypatch, "algorithm.overlong_buffer=3",
                         "algorithm.overlong_penalty=0.5")
    same_rollout(base, shaped)
    # max_new_tokens 6, buffer 3: lengths <= 3 get 0, then -0.5 * (L - 3) / 3: 4 -> -1/6, 5 -> -1/3, 6 -> -1/2
    ramp = {n: 0.0 for n in range(4)} | {4: -1 / 6, 5: -1 / 3, 6: -1 / 2}
    lengths = [len(c) for c in base.groups.completion_ids]
    assert {n for n in lengths if n > 3} and {n for n in lengths if n <= 3}  # both sides of the ramp's start
    for r, s, n in zip(base.groups.rewards, shaped.groups.rewards, lengths):
        assert s == pytest.approx(r + ramp[n], abs=1e-6), n
    # the reward function's own statistics are the unshaped ones
    assert shaped.metrics["reward/tests.integration.test_options:parity_reward_mean"] == \
        base.metrics["reward/tests.integration.test_options:parity_reward_mean"]
    assert torch.equal(base.batch.completion_mask, shaped.batch.completion_mask)


def test_mask_truncated_masks_the_truncated_completions_only(tmp_path, tiny_random_dir, monkeypatch):
    (base,), _ = steps(tmp_path, tiny_random_dir, monkeypatch)
    (masked,), _ = steps(tmp_path, tiny_random_dir, monkeypatch, "algorithm.mask_truncated=true")
    same_rollout(base, masked)
    truncated = torch.tensor(base.groups.truncated)
    assert truncated.any() and not truncated.all()
    assert masked.batch.completion_mask[truncated].sum() == 0
    assert torch.equal(masked.batch.completion_mask[~truncated], base.batch.completion_mask[~truncated])
    assert torch.equal(masked.batch.advantages, base.batch.advantages)  # the group statistics are unchanged


def test_the_kl_term_acts_once_the_policy_has_left_the_reference(tmp_path, tiny_random_dir, monkeypatch):
    base, w_base = steps(tmp_path, tiny_random_dir, monkeypatch, n=2)
    kl, w_kl = steps(tmp_path, tiny_random_dir, monkeypatch, "algorithm.beta=0.5", "algorithm.kl_estimator=k3", n=2)
    assert base[0].batch.ref_logprobs is None and "train/kl" not in base[0].metrics  # beta 0: no reference
    # step 1: the policy is the reference, so k3 and its gradient are 0: the same step as without it
    same_rollout(base[0], kl[0])
    mask = kl[0].batch.completion_mask.bool()
    assert kl[0].batch.ref_logprobs[mask].abs().min() > 0  # real log-probs of the sampled tokens
    assert kl[0].metrics["train/kl"] == pytest.approx(0.0, abs=1e-6)
    assert kl[0].metrics["train/loss"] == pytest.approx(base[0].metrics["train/loss"], abs=1e-6)
    # step 2: the policy has moved, the KL is positive and pulls the update away from beta = 0's
    assert kl[1].metrics["train/kl"] > 1e-4
    # the reference stays the starting weights: step 2's reference log-probs are the untrained model's, recomputed
    start = AutoModelForCausalLM.from_pretrained(tiny_random_dir, dtype=torch.float32)
    again = score_logprobs(start, kl[1].batch, temperature=1.0, micro_batch_tokens=100_000)
    mask = kl[1].batch.completion_mask.bool()
    torch.testing.assert_close(kl[1].batch.ref_logprobs[mask], again[mask], atol=1e-5, rtol=0)
    assert weights_differ(w_base, w_kl) > 1e-5


@pytest.mark.parametrize("epochs, mini_batches", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_epochs_and_mini_batches_set_the_optimiser_steps_and_the_old_policy(tmp_path, tiny_random_dir, monkeypatch,
                                                                            epochs, mini_batches):
    (step,), _ = steps(tmp_path, tiny_random_dir, monkeypatch, f"algorithm.epochs={epochs}",
                       f"algorithm.mini_batches={mini_batches}", "algorithm.dual_clip=3.0")
    assert step.optimiser_steps == epochs * mini_batches
    assert step.algo.dual_clip == 3.0  # the option reaches the update (its math: test_update_reference.py)
    if epochs * mini_batches == 1:  # one update: the old policy is the current one, nothing to keep
        assert step.batch.old_logprobs is None and step.metrics["train/clip_frac"] == 0.0
    else:  # the sampling policy's log-probs, kept for every later update of the batch
        mask = step.batch.completion_mask.bool()
        sampler = step.batch.sampler_logprobs
        start = AutoModelForCausalLM.from_pretrained(tiny_random_dir, dtype=torch.float32)
        p_pad = pad_probability(start, step.batch, start.config.pad_token_id, temperature=1.0)  # never sampled
        torch.testing.assert_close(step.batch.old_logprobs[mask] - torch.log1p(-p_pad[mask]), sampler[mask],
                                   atol=2e-5, rtol=0)


def test_the_length_reward_in_tokens_reads_the_lengths_the_trainer_passes(tmp_path, tiny_random_dir, monkeypatch):
    length = "{name: length, kwargs: {unit: tokens, max_length: 6, buffer: 3}}"
    (step,), _ = steps(tmp_path, tiny_random_dir, monkeypatch,
                       f"reward.functions=[{{name: 'tests.integration.test_options:parity_reward'}}, {length}]")
    # max_length 6, buffer 3: tokens <= 3 get 0, then (3 - n) / 3: 4 -> -1/3, 5 -> -2/3, 6 -> -1
    ramp = {n: 0.0 for n in range(4)} | {4: -1 / 3, 5: -2 / 3, 6: -1.0}
    lengths = [len(c) for c in step.groups.completion_ids]
    assert {n for n in lengths if n > 3} and {n for n in lengths if n <= 3}  # both sides of the ramp's start
    assert step.groups.per_reward["length"] == pytest.approx([ramp[n] for n in lengths], abs=1e-9)
    assert step.metrics["reward/length_error_frac"] == 0.0


def test_dr_grpo_drops_only_the_groups_std_from_the_advantages(tmp_path, tiny_random_dir, monkeypatch):
    (base,), _ = steps(tmp_path, tiny_random_dir, monkeypatch)
    (dr,), _ = steps(tmp_path, tiny_random_dir, monkeypatch, "algorithm.advantage=dr_grpo")
    same_rollout(base, dr)
    # grpo: (r - mean) / (std + 1e-6), std unbiased over the group; dr_grpo: r - mean
    rewards = torch.tensor(base.groups.rewards).view(-1, 4)  # [B, G]
    assert (rewards.std(1) > 0).any()  # some group has a signal
    scale = (rewards.std(1) + 1e-6).repeat_interleave(4)  # [B*G]
    torch.testing.assert_close(dr.batch.advantages, base.batch.advantages * scale, atol=1e-6, rtol=0)
    assert torch.equal(base.batch.completion_mask, dr.batch.completion_mask)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_each_loss_aggregation_reaches_the_step(tmp_path, tiny_random_dir, monkeypatch, mode):
    (step,), _ = steps(tmp_path, tiny_random_dir, monkeypatch, f"algorithm.loss_agg={mode}")
    # one update on policy: the ratio is 1 and each token's loss is -A; n_i tokens in completion i, N completions,
    # max_new_tokens 6: token_mean -sum(A n) / sum(n); seq_mean_token_mean -mean(A);
    # seq_mean_token_sum_norm -sum(A n / 6) / N
    A, n = step.batch.advantages.double(), step.batch.completion_mask.sum(1).double()  # [N] each
    expected = {"token_mean": -(A * n).sum() / n.sum(), "seq_mean_token_mean": -A.mean(),
                "seq_mean_token_sum_norm": -(A * n / 6).sum() / len(A)}[mode]
    assert A.abs().sum() > 0 and n.min() != n.max()  # the three modes differ on this batch
    assert step.metrics["train/loss"] == pytest.approx(float(expected), abs=1e-6)


def token_mean_on_policy_loss(batch) -> float:
    """One update on policy: the ratio is 1 and each token's loss is -A, so `token_mean` is -sum(A n) / sum(n)."""
    A, n = batch.advantages.double(), batch.completion_mask.sum(1).double()  # [N] each
    return float(-(A * n).sum() / n.sum())


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp"])
def test_rloo_and_reinforce_pp_advantages_reach_the_step(tmp_path, tiny_random_dir, monkeypatch, estimator):
    """Catches an estimator name that is not the one the step uses (e.g. the step's `advantage_batch` calling
    `grpo` whatever `algorithm.advantage` says), and a wrong leave-one-out factor or whitening."""
    (base,), w_base = steps(tmp_path, tiny_random_dir, monkeypatch, PATTERN_REWARD)
    (step,), w_step = steps(tmp_path, tiny_random_dir, monkeypatch, PATTERN_REWARD, f"algorithm.advantage={estimator}")
    same_rollout(base, step)
    assert step.groups.rewards == PATTERN
    third, sixth = 1 / 3, 2 / 3
    if estimator == "rloo":  # r_i - mean of the OTHER three rewards of the group
        # [1,0,0,0] -> [1, -1/3, -1/3, -1/3]; [1,1,0,0] -> [1 - 1/3, 1 - 1/3, 0 - 2/3, 0 - 2/3]
        expected = [1, -third, -third, -third, sixth, sixth, -sixth, -sixth,
                    -third, 1, -third, -third, -sixth, -sixth, sixth, sixth]
    else:  # r_i - group mean, then (a - mean(a)) / (std(a) + 1e-6) over the batch's 16
        # centred: [3/4, -1/4, -1/4, -1/4] (squares sum to 3/4), [1/2, 1/2, -1/2, -1/2] (1), then 3/4 and 1:
        # mean 0, unbiased std sqrt((3/4 + 1 + 3/4 + 1) / 15) = sqrt(7/30)
        centred = [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5,
                   -0.25, 0.75, -0.25, -0.25, -0.5, -0.5, 0.5, 0.5]
        expected = [a / ((7 / 30) ** 0.5 + 1e-6) for a in centred]
    torch.testing.assert_close(step.batch.advantages, torch.tensor(expected), atol=1e-6, rtol=0)
    # grpo on the same rewards: (r - mean) / (unbiased std + 1e-6), [1,0,0,0] -> [1.5, -0.5, -0.5, -0.5]
    torch.testing.assert_close(base.batch.advantages[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5, rtol=0)
    assert step.metrics["train/loss"] == pytest.approx(token_mean_on_policy_loss(step.batch), abs=1e-6)
    assert step.metrics["train/loss"] != pytest.approx(base.metrics["train/loss"], abs=1e-4)
    assert weights_differ(w_base, w_step) > 0


def test_sequence_ratio_gives_every_token_its_sequences_geometric_mean(tmp_path, tiny_random_dir, monkeypatch):
    """Catches `ratio_level` not reaching the surrogate (every token then has its own ratio) and a sequence
    ratio that is not the geometric mean (e.g. the log-ratios summed instead of averaged)."""
    token = second_pass(tmp_path, tiny_random_dir, monkeypatch)
    seq = second_pass(tmp_path, tiny_random_dir, monkeypatch, "algorithm.ratio_level=sequence")
    mask, A = seq.mask, seq.adv  # [N, T], [N, 1]
    # token log-ratios [0.3, -0.1] -> token ratios [e^0.3, e^-0.1]; the sequence's ratio e^0.1 on both tokens
    log_ratio = torch.where(mask, seq.logp - seq.old, 0.0)  # [N, T]
    s = (log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True)).exp().expand_as(mask)  # [N, T]
    unclipped = s * A <= s.clamp(0.8, 1.2) * A  # [N, T] where min(sA, clip(s)A) is sA: the gradient flows
    torch.testing.assert_close(seq.loss[mask], -torch.minimum(s * A, s.clamp(0.8, 1.2) * A)[mask], atol=1e-6, rtol=0)
    torch.testing.assert_close(seq.grad[mask], torch.where(unclipped, -s * A, 0.0)[mask], atol=1e-6, rtol=0)
    assert (unclipped & mask & (A != 0)).any()
    # at token level each token keeps its own ratio: losses differ within a sequence
    r = token.r
    torch.testing.assert_close(token.loss[mask], -torch.minimum(r * A, r.clamp(0.8, 1.2) * A)[mask], atol=1e-6,
                               rtol=0)
    spread = [float(token.loss[i][mask[i]].max() - token.loss[i][mask[i]].min()) for i in range(len(mask))]
    assert max(spread) > 1e-2


def test_clip_high_keeps_the_gradient_of_positive_tokens_below_it(tmp_path, tiny_random_dir, monkeypatch):
    """Catches an upper clip bound taken from `clip_low` (clip-higher silently symmetric)."""
    sym = second_pass(tmp_path, tiny_random_dir, monkeypatch, "algorithm.clip_low=0.1", "algorithm.clip_high=0.1")
    asym = second_pass(tmp_path, tiny_random_dir, monkeypatch, "algorithm.clip_low=0.1", "algorithm.clip_high=0.5")
    assert torch.equal(sym.logp, asym.logp)  # the same first pass, so the same weights
    r, A, mask = asym.r, asym.adv, asym.mask
    # A > 0, ratio 1.3: [0.9, 1.1] clips it to 1.1, a constant loss -1.1 A with no gradient;
    # [0.9, 1.5] leaves it: loss -1.3 A, gradient d(-r A)/d log p = -r A
    between = mask & (A > 0) & (r > 1.1) & (r < 1.5)  # [N, T]
    assert between.any()
    torch.testing.assert_close(sym.loss[between], (-1.1 * A).expand_as(r)[between], atol=1e-6, rtol=0)
    assert torch.equal(sym.grad[between], torch.zeros_like(sym.grad[between]))
    torch.testing.assert_close(asym.loss[between], (-r * A)[between], atol=1e-6, rtol=0)
    torch.testing.assert_close(asym.grad[between], (-r * A)[between], atol=1e-6, rtol=0)
    same = mask & ~((A > 0) & (r > 1.1))  # below 1 + clip_low, or A <= 0: the upper bound does not act
    torch.testing.assert_close(asym.loss[same], sym.loss[same], atol=0, rtol=0)


def test_dual_clip_bounds_the_loss_of_negative_tokens_whose_ratio_exploded(tmp_path, tiny_random_dir, monkeypatch):
    """Catches `dual_clip` not reaching the surrogate, and a dual clip applied to the wrong sign of advantage."""
    c = 1.1
    ppo = second_pass(tmp_path, tiny_random_dir, monkeypatch)
    dual = second_pass(tmp_path, tiny_random_dir, monkeypatch, f"algorithm.dual_clip={c}")
    assert torch.equal(ppo.logp, dual.logp)  # the same first pass (ratio 1 < c), so the same weights
    r, A, mask = dual.r, dual.adv, dual.mask
    # A = -0.5, ratio 1.4: PPO's loss -min(r A, clip(r) A) = |A| max(r, clip(r)) = 0.7, gradient 0.7;
    # dual clip: min(0.7, c |A|) = 0.55, a constant: no gradient
    exploded = mask & (A < 0) & (r > c)  # [N, T]
    assert exploded.any()
    torch.testing.assert_close(ppo.loss[exploded], (-r * A)[exploded], atol=1e-6, rtol=0)
    assert (ppo.grad[exploded].abs() > 0.1).all()
    torch.testing.assert_close(dual.loss[exploded], (-c * A).expand_as(r)[exploded], atol=1e-6, rtol=0)
    assert torch.equal(dual.grad[exploded], torch.zeros_like(dual.grad[exploded]))
    rest = mask & ~exploded
    torch.testing.assert_close(dual.loss[rest], ppo.loss[rest], atol=0, rtol=0)
    assert (mask & (A > 0) & (r > c)).any()  # positive tokens above c exist and were left alone


@pytest.mark.parametrize("estimator", ["k1", "k2"])
def test_k1_and_k2_are_the_kl_the_step_logs_and_adds(tmp_path, tiny_random_dir, monkeypatch, estimator):
    """Catches `kl_estimator` not reaching the update (k3 whatever the config says) and a wrong k1/k2 formula,
    in the metric and in the loss."""
    beta = 0.5
    calls = surrogate_calls(monkeypatch)
    _, second = steps(tmp_path, tiny_random_dir, monkeypatch, f"algorithm.beta={beta}",
                      f"algorithm.kl_estimator={estimator}", n=2)[0]
    policy, mask = calls[-1].logp, calls[-1].mask  # step 2's log-probs before its update, [N, T]
    d = (policy - second.batch.ref_logprobs)[mask]  # log p - log q on every completion token
    # k1 = d, k2 = d^2 / 2, k3 = e^-d - 1 + d: d = 0.4 gives 0.4, 0.08, 0.0703
    k = {"k1": d, "k2": d.square() / 2, "k3": torch.expm1(-d) + d}
    assert d.abs().max() > 0.3  # far enough from the reference that k2 and k3 part
    logged = second.metrics["train/kl"]
    assert logged == pytest.approx(float(k[estimator].mean()), abs=1e-6)
    assert abs(logged - float(k["k3"].mean())) > 1e-4  # a hundred times the tolerance above
    # on policy the surrogate is -A per token: loss = token mean of -A + beta * k
    assert second.metrics["train/loss"] == pytest.approx(token_mean_on_policy_loss(second.batch) + beta * logged,
                                                         abs=1e-6)


def test_model_dropout_noises_the_update_and_not_the_sampler(tmp_path, monkeypatch):
    """Catches `model.dropout=true` dropped at load (dropout then off), and a sampler that does not switch the
    policy to eval mode (with dropout its samples and log-probs would change)."""
    model_dir = _dropout_model_dir(tmp_path)  # attention dropout 0.5
    calls = surrogate_calls(monkeypatch)
    (off,), _ = steps(tmp_path, model_dir, monkeypatch, "algorithm.epochs=2")
    (on,), _ = steps(tmp_path, model_dir, monkeypatch, "algorithm.epochs=2", "model.dropout=true")
    first_off, _, first_on, _ = calls
    same_rollout(off, on)  # sampled in eval mode: dropout does not reach the sampler
    torch.testing.assert_close(on.batch.sampler_logprobs, off.batch.sampler_logprobs, atol=0, rtol=0)
    # the old log-probs and the first pass's are two train-mode forwards of the same weights: equal without
    # dropout (ratio 1), different with it (the ratio is noised before any update)
    mask = first_on.mask
    assert torch.equal(first_off.logp[mask], first_off.old[mask])
    assert (first_on.logp - first_on.old)[mask].abs().max() > 1e-2
    assert on.metrics["train/loss"] != pytest.approx(off.metrics["train/loss"], abs=1e-4)
