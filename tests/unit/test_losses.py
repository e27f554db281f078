import math

import pytest
import torch

from grpo.core.losses import (
    AGGREGATION_MODES,
    KL_ESTIMATORS,
    aggregate,
    clip_fraction,
    clipped_surrogate,
    kl_divergence,
    masked_importance_keep,
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


def test_gspo_token_with_seq_mean_matches_sequence_level_gspo():
    # Loop over sequences with the plain GSPO objective of the paper (1/G sum_i min(s_i A_i, clip(s_i) A_i),
    # gradient through s_i itself) against the vectorised GSPO-token form aggregated by
    # seq_mean_token_mean: same value, same gradient.
    torch.manual_seed(3)
    n, t = 4, 6
    old = -torch.rand(n, t, dtype=torch.float64) * 3
    logp = (old + 0.3 * torch.randn(n, t, dtype=torch.float64)).requires_grad_()
    lengths = [6, 3, 1, 4]
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).double()
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)

    loss = aggregate(clipped_surrogate(logp, old, adv, mask, 0.1, 0.1, "sequence"), mask, "seq_mean_token_mean")
    (grad,) = torch.autograd.grad(loss, logp)

    reference = 0.0
    for i, length in enumerate(lengths):
        s = (logp[i, :length] - old[i, :length]).mean().exp()
        reference = reference - torch.minimum(s * adv[i], s.clamp(0.9, 1.1) * adv[i]) / n
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
