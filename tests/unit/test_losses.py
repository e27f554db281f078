import math

import pytest
import torch

from grpo.core.losses import (
    AGGREGATION_MODES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate,
    cispo,
    clip_cov,
    clip_fraction,
    clipped_surrogate,
    gmpo,
    kl_cov,
    kl_divergence,
    masked_importance_keep,
    sapo,
    truncated_importance_weights,
)

ATOL = 1e-6
LOG = math.log


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ---------------------------------------------------------------- KL


def test_kl_hand_values():
    # pi = 0.5, pi_ref = 0.25: k1 = log 2 = 0.6931472, k2 = 0.5 * log(2)^2 = 0.2402265,
    # k3 = exp(-log 2) + log 2 - 1 = 0.5 + 0.6931472 - 1 = 0.1931472
    logp, ref = torch.tensor([[LOG(0.5)]]), torch.tensor([[LOG(0.25)]])
    close(kl_divergence(logp, ref, "k1"), [[math.log(2)]])
    close(kl_divergence(logp, ref, "k2"), [[0.5 * math.log(2) ** 2]])
    close(kl_divergence(logp, ref, "k3"), [[0.5 + math.log(2) - 1]])


def test_kl_zero_when_equal_and_k2_k3_nonnegative():
    torch.manual_seed(0)
    logp, ref = torch.randn(3, 5), torch.randn(3, 5)
    for name in ("k1", "k2", "k3"):
        assert torch.equal(kl_divergence(logp, logp, name), torch.zeros(3, 5))
    assert (kl_divergence(logp, ref, "k2") >= 0).all()
    assert (kl_divergence(logp, ref, "k3") >= 0).all()


@pytest.mark.parametrize("name", ["k1", "k3"])
def test_unbiased_estimators_average_to_exact_kl(name):
    # Expectation under pi taken exactly: sum_x pi(x) k(x) = KL(pi || pi_ref) for k1 and k3.
    torch.manual_seed(1)
    logp = torch.randn(1, 7, dtype=torch.float64).log_softmax(-1)  # [1, V]
    ref = torch.randn(1, 7, dtype=torch.float64).log_softmax(-1)  # [1, V]
    exact = (logp.exp() * (logp - ref)).sum()
    estimate = (logp.exp() * kl_divergence(logp, ref, name)).sum()
    close(estimate, exact, atol=1e-12)


def test_kl_registry_and_unknown():
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_divergence(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# ---------------------------------------------------------------- clipped surrogate

# Two sequences, clip 0.2 both sides.
# row 0: A = +1, ratios [1.5, 0.5, 1.0]; row 1: A = -2, ratios [1.5, 0.5, 1.1], last token masked.
RATIOS = torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.1]])
ADV = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def _logps(ratios):
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.5]])
    return (old + ratios.log()).requires_grad_(), old


def test_clipped_surrogate_token_hand_values_and_gradient():
    logp, old = _logps(RATIOS)
    loss = clipped_surrogate(logp, old, ADV, MASK, 0.2, 0.2, "token")
    # row 0 (A=+1): unclipped [1.5, 0.5, 1.0], clipped [1.2, 0.8, 1.0], min [1.2, 0.5, 1.0]
    # row 1 (A=-2): unclipped [-3, -1, -2.2], clipped [-2.4, -1.6, -2.2], min [-3, -1.6, .]; masked -> 0
    close(loss, [[-1.2, -0.5, -1.0], [3.0, 1.6, 0.0]])
    loss.sum().backward()
    # d(-r A)/dlogp = -A r where the unclipped branch is active, 0 where clipped or masked:
    # row 0: [0 (clipped), -0.5, -1.0]; row 1: [2 * 1.5 = 3, 0 (clipped), 0 (masked)]
    close(logp.grad, [[0.0, -0.5, -1.0], [3.0, 0.0, 0.0]])


def test_clip_higher_is_asymmetric():
    logp, old = _logps(RATIOS)
    loss = clipped_surrogate(logp, old, ADV, MASK, 0.2, 0.28, "token")
    # only row 0 token 0 hits the upper bound: clipped 1.28 instead of 1.2; row 1 token 1 still 0.8 * -2
    close(loss, [[-1.28, -0.5, -1.0], [3.0, 1.6, 0.0]])


def test_dual_clip_caps_negative_advantage_loss():
    ratios = torch.tensor([[5.0, 2.0, 0.5]])
    logp, old = _logps(torch.cat([ratios, ratios]))
    adv = torch.tensor([-2.0, 1.0])
    loss = clipped_surrogate(logp, old, adv, torch.ones(2, 3), 0.2, 0.2, "token", dual_clip=3.0)
    # A=-2: -min(r A, clip(r) A) = [10, 4, 1.6]; capped at -3 * A = 6 -> [6, 4, 1.6]
    # A=+1: dual clip does not apply: -min([5, 2, .5], [1.2, 1.2, .8]) = [-1.2, -1.2, -0.5]
    close(loss, [[6.0, 4.0, 1.6], [-1.2, -1.2, -0.5]])
    loss.sum().backward()
    # the capped token is constant in logp; r=2 unclipped: -A r = 4; r=0.5 clipped: 0
    close(logp.grad[0], [0.0, 4.0, 0.0])
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        clipped_surrogate(logp, old, adv, torch.ones(2, 3), 0.2, 0.2, "token", dual_clip=1.0)


def test_clip_fraction_hand_value():
    logp, old = _logps(RATIOS)
    # clipped branch active: row 0 token 0 (A>0, r=1.5>1.2), row 1 token 1 (A<0, r=0.5<0.8): 2 of 5 tokens
    assert clip_fraction(logp, old, ADV, MASK, 0.2, 0.2, "token") == pytest.approx(0.4, abs=1e-12)
    assert clip_fraction(logp, old, ADV, torch.zeros(2, 3), 0.2, 0.2, "token") == 0.0


def test_sequence_ratio_hand_values():
    # row 0: log ratios [log 2, 0], third token masked: s = exp(log(2) / 2) = sqrt 2 = 1.4142; A=+1 -> clipped 1.2
    # row 1: log ratios [log 1.1, log 0.9, 0]: s = (0.99)^(1/3) = 0.9966555; A=-1 -> loss s on every token
    ratios = torch.tensor([[2.0, 1.0, 7.0], [1.1, 0.9, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logp, old = _logps(ratios)
    adv = torch.tensor([1.0, -1.0])
    loss = clipped_surrogate(logp, old, adv, mask, 0.2, 0.2, "sequence")
    s1 = 0.99 ** (1 / 3)
    close(loss, [[-1.2, -1.2, 0.0], [s1, s1, s1]])
    # GSPO-token: d/dlogp_t' (-A sg[s] exp(logp_t - sg[logp_t])) = -A s on t' = t only (plain GSPO: -A s / 3 on all t')
    (grad_one,) = torch.autograd.grad(loss[1, 0], logp, retain_graph=True)
    close(grad_one, [[0.0, 0.0, 0.0], [s1, 0.0, 0.0]])
    # summed over the sequence both forms give s per token; row 0 is clipped -> 0
    loss.sum().backward()
    close(logp.grad, [[0.0, 0.0, 0.0], [s1, s1, s1]])
    # row 0 is clipped on both its tokens: 2 of 5 masked tokens
    assert clip_fraction(logp, old, adv, mask, 0.2, 0.2, "sequence") == pytest.approx(0.4, abs=1e-12)


def ragged_batch(seed: int, spread: float):
    """4 sequences of lengths 6, 3, 1, 4 in 6 columns, float64: (logp [4, 6] with grad, old, mask, adv [4],
    lengths), the new log-probs `spread` away from the old at random."""
    torch.manual_seed(seed)
    n, t = 4, 6
    old = -torch.rand(n, t, dtype=torch.float64) * 3
    logp = (old + spread * torch.randn(n, t, dtype=torch.float64)).requires_grad_()
    lengths = [6, 3, 1, 4]
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).double()
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)
    return logp, old, mask, adv, lengths


def test_gspo_token_with_seq_mean_matches_sequence_level_gspo():
    # Loop over sequences with the plain GSPO objective of the paper (1/G sum_i min(s_i A_i, clip(s_i) A_i),
    # gradient through s_i itself) against the vectorised GSPO-token form aggregated by
    # seq_mean_token_mean: same value, same gradient.
    logp, old, mask, adv, lengths = ragged_batch(seed=3, spread=0.3)

    loss = aggregate(clipped_surrogate(logp, old, adv, mask, 0.1, 0.1, "sequence"), mask, "seq_mean_token_mean")
    (grad,) = torch.autograd.grad(loss, logp)

    reference = 0.0
    for i, length in enumerate(lengths):
        s = (logp[i, :length] - old[i, :length]).mean().exp()
        reference = reference - torch.minimum(s * adv[i], s.clamp(0.9, 1.1) * adv[i]) / len(lengths)
    (ref_grad,) = torch.autograd.grad(reference, logp)
    close(loss, reference.detach(), atol=1e-12)
    close(grad, ref_grad, atol=1e-12)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_masked_positions_are_zero_and_never_nan(ratio_level):
    logp = torch.tensor([[-1.0, float("-inf")], [-0.5, float("nan")]], requires_grad=True)
    old = torch.tensor([[-1.1, float("-inf")], [-0.4, -3.0]])
    mask = torch.tensor([[True, False], [True, False]])
    loss = clipped_surrogate(logp, old, torch.tensor([1.0, -1.0]), mask, 0.2, 0.2, ratio_level)
    assert loss[:, 1].eq(0).all() and loss.isfinite().all()
    loss.sum().backward()
    assert logp.grad.isfinite().all() and logp.grad[:, 1].eq(0).all()


def test_surrogate_validation():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="ratio_level"):
        clipped_surrogate(logp, logp, torch.zeros(2), logp, 0.2, 0.2, "tokens")
    with pytest.raises(ValueError, match="advantages must have shape"):
        clipped_surrogate(logp, logp, torch.zeros(2, 1), logp, 0.2, 0.2, "token")
    with pytest.raises(ValueError, match="mask"):
        clipped_surrogate(logp, logp, torch.zeros(2), torch.ones(2, 4), 0.2, 0.2, "token")


def test_on_policy_token_loss_is_minus_advantage():
    # ratio 1 everywhere: loss = -A on every masked token
    logp = torch.randn(3, 4)
    loss = clipped_surrogate(logp, logp.clone(), torch.tensor([1.0, -2.0, 0.5]), torch.ones(3, 4), 0.2, 0.2, "token")
    close(loss, torch.tensor([-1.0, 2.0, -0.5])[:, None].expand(3, 4))


# ---------------------------------------------------------------- aggregation

# the 100 and -7 sit on masked positions and must not count
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -7.0]])
LOSS_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_aggregate_hand_values():
    # token_mean: (1 + 2 + 3 + 4) / 4 = 2.5
    close(aggregate(LOSS, LOSS_MASK, "token_mean"), 2.5)
    # seq_mean_token_mean: (6/3 + 4/1) / 2 = 3
    close(aggregate(LOSS, LOSS_MASK, "seq_mean_token_mean"), 3.0)
    # seq_mean_token_sum_norm, max_len = T = 3: (6/3 + 4/3) / 2 = 1.6666667; max_len 5: (6/5 + 4/5) / 2 = 1
    close(aggregate(LOSS, LOSS_MASK, "seq_mean_token_sum_norm"), 10 / 6)
    close(aggregate(LOSS, LOSS_MASK, "seq_mean_token_sum_norm", max_len=5), 1.0)
    # bool mask behaves like the float one
    close(aggregate(LOSS, LOSS_MASK.bool(), "token_mean"), 2.5)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_empty_mask_is_zero(mode):
    assert aggregate(LOSS, torch.zeros(2, 3), mode).item() == 0.0


def test_aggregate_unknown_mode():
    assert AGGREGATION_MODES == ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="token_mean, seq_mean_token_mean, seq_mean_token_sum_norm"):
        aggregate(LOSS, LOSS_MASK, "sum")


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_gradient_accumulation_is_exact(mode, ratio_level):
    # 8 sequences of varying lengths as 1 batch, and as 4 micro-batches of 2 each trimmed to its own
    # longest sequence, with the whole batch's counts: the micro-batch losses and gradients sum to the full ones.
    torch.manual_seed(4)
    n, t = 8, 7
    lengths = torch.tensor([7, 2, 5, 1, 3, 6, 4, 2])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()  # [8, 7]
    old = -torch.rand(n, t) * 3
    logp = (old + 0.3 * torch.randn(n, t)).requires_grad_()
    adv = torch.randn(n)

    def loss_of(sl, **counts):
        m = mask[sl]
        width = int(m.sum(1).max())
        per_token = clipped_surrogate(logp[sl, :width], old[sl, :width], adv[sl], m[:, :width], 0.2, 0.28, ratio_level)
        return aggregate(per_token, m[:, :width], mode, **counts)

    full = loss_of(slice(0, n))
    (full_grad,) = torch.autograd.grad(full, logp)

    counts = {"num_tokens": mask.sum(), "num_seqs": n, "max_len": t}
    micro = [loss_of(slice(i, i + 2), **counts) for i in range(0, n, 2)]
    total = torch.stack(micro).sum()
    (micro_grad,) = torch.autograd.grad(total, logp)

    close(total, full.detach())
    close(micro_grad, full_grad)
    assert full_grad.abs().sum() > 0


def test_an_exploded_ratio_on_a_negative_advantage_token_gives_a_finite_loss():
    from grpo.core.losses import LOG_RATIO_BOUND, SEQ_LOG_RATIO_MAX

    logp = torch.tensor([[0.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-200.0, -1.0]])  # log-ratio 200 on the first token: exp(200) overflows float32
    mask = torch.ones(1, 2)
    adv = torch.tensor([-1.0])
    loss = clipped_surrogate(logp, old, adv, mask, 0.2, 0.2, "token")
    # -min(r A, clip(r) A) with A = -1 is max(r, clip(r)) = r, bounded at exp(20)
    torch.testing.assert_close(loss[0, 0], torch.tensor(math.exp(LOG_RATIO_BOUND)), rtol=1e-6, atol=0)
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all()
    seq = clipped_surrogate(logp, old, adv, mask, 0.2, 0.2, "sequence")  # log s = (200 + 0) / 2 = 100 -> 10
    torch.testing.assert_close(seq[0], torch.full((2,), math.exp(SEQ_LOG_RATIO_MAX)), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- sampler corrections (TIS, MIS)

# trainer - sampler log-ratios: row 0 ratios 2, 2 and a masked position (ratio 3, ignored); row 1 ratios 0.5, 1.5, 1
IS_TRAINER = torch.tensor([[LOG(2.0), LOG(2.0), LOG(3.0)], [LOG(0.5), LOG(1.5), 0.0]])
IS_SAMPLER = torch.zeros(2, 3)
IS_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


def test_tis_weights_per_token_and_per_sequence_by_hand():
    # token, cap 3: min(ratio, 3) per token, 1 on the masked position
    close(truncated_importance_weights(IS_TRAINER, IS_SAMPLER, IS_MASK, 3.0, "token"),
          [[2.0, 2.0, 1.0], [0.5, 1.5, 1.0]])
    # sequence, cap 3: row 0: 2 * 2 = 4 (the masked 3 left out) -> 3; row 1: 0.5 * 1.5 * 1 = 0.75, on every position
    close(truncated_importance_weights(IS_TRAINER, IS_SAMPLER, IS_MASK, 3.0, "sequence"),
          [[3.0, 3.0, 3.0], [0.75, 0.75, 0.75]])
    # a 200-token sequence of ratio e per token: e^200 overflows float32 unless bounded first; capped at 2
    long = torch.ones(1, 200)
    close(truncated_importance_weights(long, torch.zeros(1, 200), long, 2.0, "sequence"), torch.full((1, 200), 2.0))
    with pytest.raises(ValueError, match="level"):
        truncated_importance_weights(IS_TRAINER, IS_SAMPLER, IS_MASK, 3.0, "group")


def test_mis_keeps_ratios_inside_the_range_by_hand():
    # token, [0.6, 1.8]: row 0's 2, 2 dropped (the masked position stays 1); row 1: 0.5 dropped, 1.5 and 1 kept
    close(masked_importance_keep(IS_TRAINER, IS_SAMPLER, IS_MASK, 0.6, 1.8, "token"),
          [[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    # sequence, [0.6, 1.8]: row 0's 4 out (its tokens dropped), row 1's 0.75 in (all kept)
    close(masked_importance_keep(IS_TRAINER, IS_SAMPLER, IS_MASK, 0.6, 1.8, "sequence"),
          [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    # the bounds are inclusive: [0.5, 2] keeps every token; low = 0 has no lower bound
    close(masked_importance_keep(IS_TRAINER, IS_SAMPLER, IS_MASK, 0.5, 2.0, "token"), torch.ones(2, 3))
    close(masked_importance_keep(IS_TRAINER, IS_SAMPLER, IS_MASK, 0.0, 1.8, "token"),
          [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="low"):
        masked_importance_keep(IS_TRAINER, IS_SAMPLER, IS_MASK, 1.2, 1.8)


# ---------------------------------------------------------------- policy losses by name
# The hand-built batch of the clipped surrogate tests above: row 0 (A = +1) ratios [1.5, 0.5, 1.0];
# row 1 (A = -2) ratios [1.5, 0.5, 1.1], its last token masked. logp = old + log r:
# row 0 [-1 + ln 1.5, -2 + ln 0.5, -0.5] = [-0.594535, -2.693147, -0.5]; row 1 [0.105465, -1.893147, .]
# Each expected value below is its paper's formula written out again here, checked against hand values.


def test_the_registry_holds_every_policy_loss_and_ppo_clip_is_the_clipped_surrogate():
    # Mutation caught: a loss left unregistered, or ppo_clip no longer today's clipped surrogate / clip count.
    assert set(POLICY_LOSSES) == {"ppo_clip", "cispo", "gmpo", "sapo", "clip_cov", "kl_cov"}
    logp, old = _logps(RATIOS)
    out = POLICY_LOSSES["ppo_clip"](logp, old, ADV, MASK, clip_low=0.2, clip_high=0.2, ratio_level="token")
    close(out.loss, clipped_surrogate(logp, old, ADV, MASK, 0.2, 0.2, "token"))
    # clipped branch active on row 0 token 0 (A > 0, r = 1.5 > 1.2) and row 1 token 1 (A < 0, r = 0.5 < 0.8)
    assert out.clipped.tolist() == [[True, False, False], [False, True, False]]
    with pytest.raises(ValueError, match="policy loss 'ppo'.*cispo, clip_cov, gmpo, kl_cov, ppo_clip, sapo"):
        POLICY_LOSSES.resolve("ppo")


def test_cispo_keeps_the_gradient_that_ppo_clip_drops():
    # Mutation caught: the weight not detached (gradient -w A (1 + log pi) where r is inside the range), the clip
    # applied to the loss as PPO does (gradient 0 on row 0 token 0), or the bounds swapped.
    logp, old = _logps(RATIOS)
    out = cispo(logp, old, ADV, MASK, eps_low=1.0, eps_high=0.2)
    # w = clip(r, 0, 1.2): row 0 [1.2, 0.5, 1.0]; row 1 [1.2, 0.5, .]
    # loss = -w A logp: row 0 [1.2 * 0.594535, 0.5 * 2.693147, 0.5] = [0.713442, 1.346574, 0.5]
    #                   row 1 (A = -2): [2.4 * 0.105465, -1.0 * 1.893147, 0] = [0.253116, -1.893147, 0]
    close(out.loss, [[0.713442, 1.346574, 0.5], [0.253116, -1.893147, 0.0]], atol=1e-5)
    w = torch.exp(logp - old).detach().clamp(0.0, 1.2)
    close(out.loss, torch.where(MASK.bool(), -w * ADV[:, None] * logp, 0.0).detach())
    out.loss.sum().backward()
    # gradient -w A: row 0 [-1.2, -0.5, -1.0]; row 1 [2.4, 1.0, 0 (masked)]. ppo_clip gives 0 on row 0 token 0
    # (A > 0, r above the range) and on row 1 token 1 (A < 0, r below it): CISPO keeps both.
    close(logp.grad, [[-1.2, -0.5, -1.0], [2.4, 1.0, 0.0]])
    assert out.clipped.tolist() == [[True, False, False], [True, False, False]]  # r = 1.5 > 1.2 on both rows
    logp2, old2 = _logps(RATIOS)
    ppo = clipped_surrogate(logp2, old2, ADV, MASK, 0.2, 0.2, "token")
    ppo.sum().backward()
    assert logp2.grad[0, 0] == 0 and logp2.grad[1, 1] == 0


def test_gmpo_hand_values_and_gradient():
    # Mutation caught: clipping both sides of the log-ratio (row 0 token 1 would be clipped to -0.4 and lose its
    # gradient), the arithmetic mean of the ratios, or S_i not detached in the per-token form (the gradient would
    # count each token |y_i| times).
    logp, old = _logps(RATIOS)
    out = gmpo(logp, old, ADV, MASK, eps_low=0.4, eps_high=0.4)
    # row 0, A > 0: log r = [0.405465, -0.693147, 0], clipped above at 0.4 -> [0.4, -0.693147, 0]
    #   S_0 = exp((0.4 - 0.693147) / 3) = 0.906907; loss -S_0 on each token
    # row 1, A < 0: log r = [0.405465, -0.693147], clipped below at -0.4 -> [0.405465, -0.4]
    #   S_1 = exp((0.405465 - 0.4) / 2) = 1.002736; loss -A S_1 = 2.005473 on each token
    close(out.loss, [[-0.906907] * 3, [2.005473, 2.005473, 0.0]], atol=1e-5)
    assert out.clipped.tolist() == [[True, False, False], [False, True, False]]
    out.loss.sum().backward()
    # each token's gradient is -A_i S_i where its log-ratio is not clipped, 0 where it is
    close(logp.grad, [[0.0, -0.906907, -0.906907], [2.005473, 0.0, 0.0]], atol=1e-5)


def test_gmpo_with_seq_mean_is_the_papers_sequence_objective():
    # Loop over sequences with the paper's objective, 1/G sum_i sgn(A_i) prod_t |min(r_t A_i, clip(r_t) A_i)|^(1/|y_i|)
    # (gradient through the product itself), against the per-token form aggregated by seq_mean_token_mean.
    # Mutation caught: any change of the per-token form's value or gradient (e.g. the mean over T, not |y_i|).
    logp, old, mask, adv, lengths = ragged_batch(seed=5, spread=0.5)
    loss = aggregate(gmpo(logp, old, adv, mask, eps_low=0.4, eps_high=0.4).loss, mask, "seq_mean_token_mean")
    (grad,) = torch.autograd.grad(loss, logp)
    reference = 0.0
    lo, hi = math.exp(-0.4), math.exp(0.4)
    for i, length in enumerate(lengths):
        r = (logp[i, :length] - old[i, :length]).exp()
        terms = torch.minimum(r * adv[i], r.clamp(lo, hi) * adv[i]).abs()
        reference = reference - adv[i].sign() * terms.prod() ** (1 / length) / len(lengths)
    (ref_grad,) = torch.autograd.grad(reference, logp)
    close(loss, reference.detach(), atol=1e-12)
    close(grad, ref_grad, atol=1e-12)


def test_gmpo_and_the_arithmetic_mean_differ_on_unequal_ratios():
    # One sequence, A = +1, ratios [2, 0.5], clip ranges wider than both. Geometric mean sqrt(2 * 0.5) = 1:
    # GMPO's loss -1, gradient -S/|y| = -0.5 per token under seq_mean_token_mean. The arithmetic mean (ppo_clip,
    # seq_mean_token_mean) is (2 + 0.5)/2 = 1.25: loss -1.25, gradient -r_t/|y| = [-1, -0.25].
    # Mutation caught: a GMPO that averages the ratios rather than their logs.
    old = torch.tensor([[-1.0, -1.0]])
    mask, adv = torch.ones(1, 2), torch.tensor([1.0])
    logp = (old + torch.tensor([[2.0, 0.5]]).log()).requires_grad_()
    geo = aggregate(gmpo(logp, old, adv, mask, eps_low=5.0, eps_high=5.0).loss, mask, "seq_mean_token_mean")
    close(geo, -1.0)
    (geo_grad,) = torch.autograd.grad(geo, logp)
    close(geo_grad, [[-0.5, -0.5]])
    arith = aggregate(clipped_surrogate(logp, old, adv, mask, 0.99, 5.0, "token"), mask, "seq_mean_token_mean")
    close(arith, -1.25)
    (arith_grad,) = torch.autograd.grad(arith, logp)
    close(arith_grad, [[-1.0, -0.25]])


def test_gmpo_refuses_per_token_advantages():
    logp, old = _logps(RATIOS)
    with pytest.raises(ValueError, match=r"gmpo needs one advantage per sequence"):
        gmpo(logp, old, torch.ones(2, 3), MASK, eps_low=0.4, eps_high=0.4)


def test_sapo_hand_values_and_gradient():
    # Mutation caught: one temperature for both signs (row 1 would use 1.0), or the gate's gradient taken without
    # r (w r grad log pi is the gradient of f(r)).
    logp, old = _logps(RATIOS)
    out = sapo(logp, old, ADV, MASK, tau_pos=1.0, tau_neg=1.05)
    # row 0, A = +1, tau 1: s = sigmoid(r - 1) = [0.622459, 0.377541, 0.5]; loss -4 s = [-2.489837, -1.510163, -2]
    # row 1, A = -2, tau 1.05: s = sigmoid(1.05 (r - 1)) = [0.628316, 0.371684]; loss 8/1.05 s = [4.787171, 2.831877]
    close(out.loss, [[-2.489837, -1.510163, -2.0], [4.787171, 2.831877, 0.0]], atol=1e-5)
    r, a = torch.exp(logp - old).detach(), ADV[:, None]
    tau = torch.where(a > 0, 1.0, 1.05)
    close(out.loss, torch.where(MASK.bool(), -a * 4 / tau * torch.sigmoid(tau * (r - 1)), 0.0))
    out.loss.sum().backward()
    # gradient -A w r, w = 4 s (1 - s): row 0 w = [0.940030, 0.940030, 1] -> [-1.410045, -0.470015, -1]
    # row 1 w = [0.934140, 0.934140] -> 2 w r = [2.802419, 0.934140]
    close(logp.grad, [[-1.410022, -0.470007, -1.0], [2.802419, 0.934140, 0.0]], atol=1e-5)
    s = torch.sigmoid(tau * (r - 1))
    close(logp.grad, torch.where(MASK.bool(), -a * 4 * s * (1 - s) * r, 0.0))
    assert not out.clipped.any()  # |tau (r - 1)| <= 0.525 < 1.763: every gate weight above 1/2


def test_sapo_limits_in_the_temperature():
    # tau -> 0: the gate weight -> 1 for every ratio, so the gradient is the unclipped surrogate's, -A r (ppo_clip with
    # a range wider than every ratio). tau -> inf: the weight -> 0 off r = 1, only the on-policy token (row 0
    # token 2, r = 1) keeps its gradient, -A. Neither limit is PPO's one-sided clip.
    # Mutation caught: a gate whose weight is not 1 at r = 1 (e.g. sigmoid without the 4/tau factor: weight 1/4).
    logp, old = _logps(RATIOS)
    sapo(logp, old, ADV, MASK, tau_pos=1e-4, tau_neg=1e-4).loss.sum().backward()
    small = logp.grad.clone()
    logp.grad = None
    clipped_surrogate(logp, old, ADV, MASK, 0.999, 1e6, "token").sum().backward()
    close(small, logp.grad)  # [[-1.5, -0.5, -1], [3, 1, 0]]
    logp.grad = None
    out = sapo(logp, old, ADV, MASK, tau_pos=1e3, tau_neg=1e3)
    out.loss.sum().backward()
    close(logp.grad, [[0.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    assert out.clipped.tolist() == [[True, True, False], [True, True, False]]


# Covariance losses: two sequences, 7 masked tokens. A = [+1, -1] per sequence, on 4 and 3 tokens: mean A = 1/7,
# A - mean = +6/7 (row 0), -8/7 (row 1). logp chosen so its masked mean is -3: row 0 [-1, -2, -3, -6],
# row 1 [-1, -5, -3, masked]; logp - mean = [2, 1, 0, -3] and [2, -2, 0].
# cov = row 0: 6/7 [2, 1, 0, -3] = [1.714, 0.857, 0, -2.571]; row 1: -8/7 [2, -2, 0] = [-2.286, 2.286, 0].
# Within Clip-Cov's (1, 5): row 0 token 0 and row 1 token 1. Largest two: the same two.
COV_LOGP = torch.tensor([[-1.0, -2.0, -3.0, -6.0], [-1.0, -5.0, -3.0, -100.0]])
COV_RATIOS = torch.tensor([[1.5, 0.5, 1.0, 1.2], [0.8, 1.1, 2.0, 1.0]])
COV_ADV = torch.tensor([1.0, -1.0])
COV_MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
SURROGATE = [[-1.5, -0.5, -1.0, -1.2], [0.8, 1.1, 2.0, 0.0]]  # -A r, the loss and gradient of an untouched token


def _cov_batch():
    logp = COV_LOGP.clone().requires_grad_()
    return logp, (COV_LOGP - COV_RATIOS.log()).detach()


def test_clip_cov_detaches_exactly_the_candidates_it_draws():
    # Mutation caught: the selection ignoring the bounds, the wrong sign of the covariance (row 1 token 0 would
    # qualify), the gradient not removed, the value zeroed as well, the masked log-prob (-100) counted in the mean,
    # or mean A taken over sequences (0) not tokens (1/7): then both covariances are 2, neither inside (2, 5).
    logp, old = _cov_batch()
    # fraction 0.3: max(1, floor(2.1)) = 2 tokens, both candidates
    out = clip_cov(logp, old, COV_ADV, COV_MASK, fraction=0.3, cov_low=1.0, cov_high=5.0)
    assert out.clipped.tolist() == [[True, False, False, False], [False, True, False, False]]
    close(out.loss, SURROGATE)  # the value is kept on the detached tokens
    out.loss.sum().backward()
    close(logp.grad, [[0.0, -0.5, -1.0, -1.2], [0.8, 0.0, 2.0, 0.0]])
    # bounds (2, 5): row 1 token 1 (2.286) alone
    logp, old = _cov_batch()
    out = clip_cov(logp, old, COV_ADV, COV_MASK, fraction=0.3, cov_low=2.0, cov_high=5.0)
    assert out.clipped.tolist() == [[False] * 4, [False, True, False, False]]


def test_clip_cov_draws_its_tokens_at_random_from_a_seeded_generator():
    # fraction 0.2: max(1, floor(1.4)) = 1 token of the 2 candidates. Mutation caught: always the first candidate
    # (both seeds below would pick the same token), or the generator ignored (same seed, different picks).
    picks = set()
    for seed in range(8):
        logp, old = _cov_batch()
        runs = [clip_cov(logp, old, COV_ADV, COV_MASK, fraction=0.2, cov_low=1.0, cov_high=5.0,
                         generator=torch.Generator().manual_seed(seed)) for _ in range(2)]
        assert torch.equal(runs[0].clipped, runs[1].clipped)
        chosen = runs[0].clipped.nonzero().tolist()
        assert len(chosen) == 1 and chosen[0] in ([0, 0], [1, 1])
        runs[0].loss.sum().backward()
        expected = torch.tensor(SURROGATE)
        expected[tuple(chosen[0])] = 0.0
        close(logp.grad, expected)
        picks.add(tuple(chosen[0]))
    assert picks == {(0, 0), (1, 1)}


def test_kl_cov_penalises_only_the_top_k_tokens():
    # Mutation caught: the penalty on every token, on the smallest covariances, or without its coefficient.
    logp, old = _cov_batch()
    out = kl_cov(logp, old, COV_ADV, COV_MASK, fraction=0.3, coef=1.0)  # k = 2: row 0 token 0, row 1 token 1
    assert out.clipped.tolist() == [[True, False, False, False], [False, True, False, False]]
    # penalised: -A r + |log r|: row 0 token 0 -1.5 + ln 1.5 = -1.094535; row 1 token 1 1.1 + ln 1.1 = 1.195310
    expected = torch.tensor(SURROGATE)
    expected[0, 0], expected[1, 1] = -1.5 + math.log(1.5), 1.1 + math.log(1.1)
    close(out.loss, expected)
    out.loss.sum().backward()
    # gradient -A r + coef sign(log r): row 0 token 0 -1.5 + 1 = -0.5; row 1 token 1 1.1 + 1 = 2.1
    close(logp.grad, [[-0.5, -0.5, -1.0, -1.2], [0.8, 2.1, 2.0, 0.0]])
    logp, old = _cov_batch()
    half = kl_cov(logp, old, COV_ADV, COV_MASK, fraction=0.3, coef=0.5).loss
    close(half[0, 0], -1.5 + 0.5 * math.log(1.5))
    logp, old = _cov_batch()
    only_one = kl_cov(logp, old, COV_ADV, COV_MASK, fraction=1e-4, coef=1.0)  # max(1, floor(7e-4)) = 1: the largest
    assert only_one.clipped.nonzero().tolist() == [[1, 1]]


POLICY_LOSS_OPTIONS = {
    "ppo_clip": {"clip_low": 0.2, "clip_high": 0.28, "ratio_level": "token"},
    "cispo": {"eps_low": 1.0, "eps_high": 4.0},
    "gmpo": {"eps_low": 0.4, "eps_high": 0.4},
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "clip_cov": {"fraction": 0.5, "cov_low": -10.0, "cov_high": 10.0},
    "kl_cov": {"fraction": 0.5, "coef": 1.0},
}


@pytest.mark.parametrize("name", sorted(POLICY_LOSS_OPTIONS))
def test_every_policy_loss_is_zero_and_finite_on_masked_positions(name):
    # -inf and NaN log-probs on masked positions (padding): loss 0 and gradient 0 there, never NaN.
    # Mutation caught: a loss whose masked positions are not set to 0 (sapo's -2A/tau, gmpo's -A S there).
    logp = torch.tensor([[-1.0, float("-inf")], [-0.5, float("nan")]], requires_grad=True)
    old = torch.tensor([[-1.1, float("-inf")], [-0.4, -3.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = POLICY_LOSSES[name](logp, old, torch.tensor([1.0, -1.0]), mask, **POLICY_LOSS_OPTIONS[name])
    assert out.loss[:, 1].eq(0).all() and out.loss.isfinite().all() and not out.clipped[:, 1].any()
    out.loss.sum().backward()
    assert logp.grad.isfinite().all() and logp.grad[:, 1].eq(0).all() and logp.grad[:, 0].ne(0).any()
