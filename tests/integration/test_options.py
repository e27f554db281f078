"""Each documented loss option through the real loop: one `train_step` with the option against the
same step without it, from the same seed (so the same completions are sampled).

A spy on `update_policy` keeps the batch the loop hands to the update; each test checks that the
option changes what it claims to change (the advantages, the rewards, the mask, the KL term, the
number of optimiser steps) and leaves the rest of that batch as it was.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo.algorithms import grpo as trainer
from grpo.training.update import score_logprobs
from tests.conftest import compose
from tests.integration.test_trainer import pad_probability


def parity_reward(prompts, completions, **_):
    """1 for an even-length completion, else 0: a reward with a signal on a random model."""
    return [float(len(c) % 2 == 0) for c in completions]


REAL_UPDATE = trainer.update_policy
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
