"""Policy losses: KL estimators, the clipped surrogate (token or sequence ratio), aggregation, the
preference losses of DPO, and the distillation divergences (per-token reverse KL, generalised JSD).

Shapes: N completions, T token positions (padded); ``mask`` [N, T] is 1 on completion tokens.
``advantages`` [N] hold one value per completion (outcome supervision), broadcast over its tokens.

Where we differ from the papers:

1. The surrogate clips asymmetrically, [1 - clip_low, 1 + clip_high] (DAPO "clip-higher");
   clip_low = clip_high gives PPO/GRPO.
2. ``ratio_level="sequence"`` is GSPO in its GSPO-token form (Zheng et al. 2025): the value is the
   sequence ratio, the gradient flows per token. With one advantage per sequence, summed over a
   sequence's tokens it has GSPO's gradient; GSPO's own objective is ``seq_mean_token_mean`` of it
   (1/G sum_i), while ``token_mean`` weighs long sequences more.
3. Padded positions are masked before the ratio is taken, so -inf or NaN log-probs there give
   loss 0 and gradient 0 instead of NaN.
4. ``aggregate`` takes the whole batch's token and sequence counts, so micro-batch losses sum to the
   full-batch loss (gradient accumulation is exact), as verl and OpenRLHF do.
5. The log-ratio is bounded before it is exponentiated: to [-20, 20] per token, and GSPO's
   sequence log-ratio to at most 10 (as verl does), so one exploded ratio cannot make the loss
   infinite and skip the whole step. Beyond the bound the token's ratio is constant (no gradient).
6. The preference losses (``dpo_loss``) take summed completion log-probs for every loss type, IPO's
   included, as the IPO paper writes it (TRL's ``ipo`` averages them over the completion's tokens).
7. The policy losses (``POLICY_LOSSES``) all return a per-token loss before aggregation, so the
   aggregation, the sampler corrections and the KL term apply to each alike. A sequence-level objective
   (``gmpo``) is written per token the way GSPO-token is: its value on every token of a sequence, its
   gradient per token; with ``seq_mean_token_mean`` it is the paper's objective exactly.
8. ``cispo``: MiniMax-M1 publishes no value of its upper clip; the default cap 1 + 4 = 5 is ScaleRL's
   (Khatri et al. 2025) as TRL records it. ``gmpo``: the geometric mean's log is bounded at 10, as GSPO's.
9. ``clip_cov`` and ``kl_cov`` centre the covariance and pick their tokens within one call, that is one
   micro-batch, as verl does: with several micro-batches per optimiser step the chosen tokens differ from
   a choice over the whole mini-batch, and gradient accumulation is not exact for these two losses.
   ``clip_cov`` keeps a detached token's loss value (verl zeroes it; the gradient is the same). Both use the
   paper's unclipped surrogate -r A: the authors' code and verl's also apply PPO's clip in ``clip_cov`` (their
   scripts: range [0, 2], dual clip 10) and leave the clipped tokens out of the draw.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from rewards.registry import Registry

KLEstimator = Callable[[Tensor, Tensor], Tensor]

KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")

RATIO_LEVELS = ("token", "sequence")
LOG_RATIO_BOUND = 20.0  # |log r_t| is clamped to this
SEQ_LOG_RATIO_MAX = 10.0  # GSPO's log s_i is clamped to at most this

Count = int | float | Tensor  # a token or sequence count, as a number or a 0-d tensor


def register_kl(name: str) -> Callable[[KLEstimator], KLEstimator]:
    """Register ``fn(logp [N, T], ref_logp [N, T]) -> per-token KL estimate [N, T]`` under ``name``."""

    return KL_ESTIMATORS.register(name)


@register_kl("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log pi(x) - log pi_ref(x): unbiased for KL(pi || pi_ref), high variance, can be negative.

    As a loss its gradient has expectation 0 under pi (score-function identity), so it is a monitor
    more than a penalty.
    """
    return logp - ref_logp  # [N, T]


@register_kl("k2")
def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 0.5 * (log pi(x) - log pi_ref(x))^2: biased, low variance, >= 0.

    Its gradient on samples of pi is the gradient of KL(pi || pi_ref).
    """
    return 0.5 * (logp - ref_logp).square()  # [N, T]


@register_kl("k3")
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1: unbiased, low variance, >= 0.

    The estimator GRPO uses (DeepSeekMath eq. 4). Computed as expm1(d) - d for precision near 0.
    Not clamped (verl clamps to [-10, 10]): clamp in the caller if the reference drifts far.
    """
    log_ratio = ref_logp - logp  # [N, T]
    return torch.expm1(log_ratio) - log_ratio  # [N, T]


def kl_divergence(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate [N, T] of KL(pi || pi_ref) from tokens sampled from pi.

    ``estimator`` is one of ``KL_ESTIMATORS``: k1, k2, k3 (Schulman 2020, "Approximating KL divergence").
    Masking and aggregation are the caller's (see ``aggregate``).
    """
    kl = KL_ESTIMATORS.resolve(estimator)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape")
    return kl(logp, ref_logp)  # [N, T]


def _check_shapes(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> None:
    if logp.ndim != 2:
        raise ValueError(f"logp must have shape [N, T], got {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must have the shape of logp {tuple(logp.shape)}")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(
            f"advantages must have shape [N]={tuple(logp.shape[:1])} or [N, T]={tuple(logp.shape)}, "
            f"got {tuple(advantages.shape)}"
        )


def _per_token(advantages: Tensor) -> Tensor:
    """Advantages broadcastable to [N, T]: one per sequence [N] -> [N, 1]; per token (PPO with GAE) as given."""
    return advantages[:, None] if advantages.ndim == 1 else advantages


def _policy_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, ratio_level: str) -> Tensor:
    """Importance ratio pi / pi_old per token [N, T]; 1 on masked positions."""
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; known: {', '.join(RATIO_LEVELS)}")
    keep = mask.bool()  # [N, T]
    # where(), not multiplication: 0 * -inf is NaN, and so is its gradient.
    logp = torch.where(keep, logp, 0.0)  # [N, T]
    log_ratio = torch.where(keep, logp - old_logp.detach(), 0.0)  # [N, T]
    if ratio_level == "token":
        return log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()  # [N, T]
    # GSPO: s_i = exp(mean_t log_ratio); GSPO-token: s_i,t = sg[s_i] * exp(logp_t - sg[logp_t]).
    lengths = keep.sum(dim=1).clamp(min=1)  # [N]
    seq_ratio = (log_ratio.sum(dim=1) / lengths).clamp(max=SEQ_LOG_RATIO_MAX).exp().detach()  # [N]
    return seq_ratio[:, None] * (logp - logp.detach()).exp()  # [N, T]


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    ratio_level: str,
    dual_clip: float | None = None,
) -> Tensor:
    """Per-token clipped surrogate loss [N, T], to be minimised (minus the PPO objective).

        r_t  = exp(logp_t - old_logp_t)                                   (ratio_level="token")
        s_i  = exp(1/|y_i| * sum_t (logp_t - old_logp_t)),  r_t = sg[s_i] * exp(logp_t - sg[logp_t])
                                                                          (ratio_level="sequence")
        loss_t = -min(r_t * A, clip(r_t, 1 - clip_low, 1 + clip_high) * A)
        dual clip, for A < 0:  loss_t = min(loss_t, -dual_clip * A)

    PPO (Schulman et al. 2017) with DAPO's asymmetric "clip-higher" range (Yu et al. 2025); the
    sequence ratio is GSPO-token (Zheng et al. 2025; the paper uses clip ranges near 3e-4 / 4e-4);
    the dual clip is from Ye et al. 2020 ("Mastering Complex Control in MOBA Games") and bounds the
    loss of a negative-advantage token whose ratio has exploded. ``logp``, ``old_logp``, ``mask``
    are [N, T]; ``advantages`` [N] (one per sequence, GRPO) or [N, T] (one per token, PPO with GAE).
    ``old_logp`` and ``advantages`` are treated as constants.
    Masked positions get loss 0.
    """
    _check_shapes(logp, old_logp, advantages, mask)
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 when given, got {dual_clip}")
    ratio = _policy_ratio(logp, old_logp, mask, ratio_level)  # [N, T]
    adv = _per_token(advantages.detach())  # [N, 1] or [N, T]
    unclipped = ratio * adv  # [N, T]
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv  # [N, T]
    loss = -torch.minimum(unclipped, clipped)  # [N, T]
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)  # [N, T]
    return torch.where(mask.bool(), loss, 0.0)  # [N, T]


IS_LEVELS = ("token", "sequence")


def _sampler_log_ratio(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor, level: str) -> Tensor:
    """log(pi_trainer / pi_sampler) [N, T]: per token, or the sequence's sum over its masked tokens
    broadcast to each of its positions (0 on masked positions at token level)."""
    if level not in IS_LEVELS:
        raise ValueError(f"unknown importance-sampling level {level!r}; known: {', '.join(IS_LEVELS)}")
    log_ratio = torch.where(mask.bool(), trainer_logp - sampler_logp, 0.0)  # [N, T]
    if level == "token":
        return log_ratio
    return log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)  # [N, T]


@torch.no_grad()
def truncated_importance_weights(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float,
                                 level: str = "token") -> Tensor:
    """Weights [N, T] that correct for the sampler not being exactly the trainer's policy.

        token:     w_t = min(exp(trainer_logp_t - sampler_logp_t), cap)           (1 on masked positions)
        sequence:  w_i = min(exp(sum_t m_t (trainer_logp_t - sampler_logp_t)), cap), on each of its tokens

    Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"): the rollout engine (vLLM, other kernels, other precision, or
    an older policy under `rollout.max_staleness`) samples from a different distribution than the
    trainer scores, so the loss is reweighted by their ratio, capped at `cap` to bound the variance.
    The sequence level is the ratio of the whole completion's probabilities (unbiased for a
    sequence-level objective, higher variance). ``trainer_logp`` is the trainer's log-prob under the
    weights before this update (the "old" policy), so the weight is a constant, as in the paper; it
    multiplies the surrogate, not the KL penalty.
    """
    if cap <= 0:
        raise ValueError(f"the TIS cap must be > 0, got {cap}")
    log_ratio = _sampler_log_ratio(trainer_logp, sampler_logp, mask, level)  # [N, T]
    # bounded first so a long sequence's sum cannot overflow; below the bound exactly min(exp(x), cap)
    return log_ratio.clamp(max=math.log(cap) + 1.0).exp().clamp(max=cap)  # [N, T]


@torch.no_grad()
def masked_importance_keep(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor, low: float, high: float,
                           level: str = "token") -> Tensor:
    """1.0 where the trainer/sampler ratio lies in [low, high], else 0.0 [N, T] (masked positions: 1).

        token:     keep_t = [low <= exp(trainer_logp_t - sampler_logp_t) <= high]
        sequence:  keep_i = [low <= exp(sum_t m_t (trainer_logp_t - sampler_logp_t)) <= high], on each token

    Masked importance sampling (MIS): rather than capping a far-off ratio (TIS), the token or sequence is
    dropped from the loss, since its gradient is more likely the mismatch's than the task's (Yao et al.
    2025's follow-up on token- and sequence-level MIS; "IcePop", Ling team 2025, masks tokens outside
    [0.5, 5]). The caller multiplies the per-token loss by it: a dropped token still counts in the loss's
    normaliser, as a weight of 0 would.
    """
    if not 0.0 <= low < 1.0 < high:
        raise ValueError(f"need 0 <= low < 1 < high, got {low}, {high}")
    log_ratio = _sampler_log_ratio(trainer_logp, sampler_logp, mask, level)  # [N, T]
    lo = math.log(low) if low > 0 else -math.inf
    keep = (log_ratio >= lo) & (log_ratio <= math.log(high))  # [N, T]
    return (keep | ~mask.bool()).to(trainer_logp.dtype)  # [N, T]


@torch.no_grad()
def clip_fraction(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    ratio_level: str,
) -> float:
    """Share of masked tokens where the clipped branch is active (metric ``train/clip_frac``).

    Active means the clip removed the gradient: r > 1 + clip_high with A > 0, or r < 1 - clip_low
    with A < 0. The dual clip is not counted. 0.0 when the mask is empty.
    """
    _check_shapes(logp, old_logp, advantages, mask)
    ratio = _policy_ratio(logp, old_logp, mask, ratio_level)  # [N, T]
    keep = mask.bool()  # [N, T]
    num_tokens = int(keep.sum().item())
    if num_tokens == 0:
        return 0.0
    return (_ppo_clipped(ratio, _per_token(advantages), clip_low, clip_high) & keep).sum().item() / num_tokens


def _ppo_clipped(ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float) -> Tensor:
    """Where PPO's clipped branch removes the gradient [N, T] (bool): r > 1 + clip_high with A > 0, or
    r < 1 - clip_low with A < 0."""
    return ((ratio > 1.0 + clip_high) & (adv > 0)) | ((ratio < 1.0 - clip_low) & (adv < 0))  # [N, T]


# ---------------------------------------------------------------- policy losses, by name


class PolicyLossOutput(NamedTuple):
    """What every policy loss returns, both [N, T]: the per-token loss to be minimised, before aggregation
    (0 on masked positions), and where the loss's own restraint acted (bool; ``train/clip_frac``): each
    loss's docstring says what that is for it."""

    loss: Tensor
    clipped: Tensor


PolicyLoss = Callable[..., PolicyLossOutput]

POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Register ``fn(logp, old_logp, advantages, mask, **options) -> PolicyLossOutput`` under ``name``.

    ``logp`` [N, T] carries the gradient; ``old_logp`` [N, T] and ``advantages`` ([N], one per sequence, or
    [N, T], one per token) are constants; ``mask`` [N, T] is > 0 on the tokens that count. ``options`` are the
    loss's own keyword options (``grpo.config.AlgorithmConfig.policy_loss_options`` gives them from the config).
    """
    return POLICY_LOSSES.register(name)


def _token_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """log(pi / pi_old) per token [N, T], bounded to +-LOG_RATIO_BOUND (no gradient beyond); 0 on masked positions."""
    keep = mask.bool()  # [N, T]
    # where(), not multiplication: 0 * -inf is NaN, and so is its gradient.
    log_ratio = torch.where(keep, torch.where(keep, logp, 0.0) - old_logp.detach(), 0.0)  # [N, T]
    return log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)  # [N, T]


@register_policy_loss("ppo_clip")
def ppo_clip(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float, clip_high: float,
             ratio_level: str, dual_clip: float | None = None) -> PolicyLossOutput:
    """PPO's clipped surrogate with clip-higher, GSPO's sequence ratio and the dual clip: ``clipped_surrogate``,
    whose docstring has the formula. clipped: where the clipped branch removes the gradient (the dual clip not
    counted), as ``clip_fraction`` counts."""
    loss = clipped_surrogate(logp, old_logp, advantages, mask, clip_low, clip_high, ratio_level, dual_clip)  # [N, T]
    with torch.no_grad():
        ratio = _policy_ratio(logp, old_logp, mask, ratio_level)  # [N, T]
    clipped = _ppo_clipped(ratio, _per_token(advantages), clip_low, clip_high) & mask.bool()  # [N, T]
    return PolicyLossOutput(loss, clipped)


@register_policy_loss("cispo")
def cispo(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, eps_low: float,
          eps_high: float) -> PolicyLossOutput:
    """CISPO, from "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention" (MiniMax, 2025).

        w_t    = sg(clip(r_t, 1 - eps_low, 1 + eps_high)),   r_t = pi(y_t) / pi_old(y_t)
        loss_t = -w_t * A * log pi(y_t)            gradient: -w_t * A * grad log pi(y_t)

    REINFORCE with a clipped importance weight held constant. Where PPO's clip drops the gradient of a token
    whose ratio left the range in the direction of the advantage, here every token keeps its gradient and only
    the weight is capped. The paper sets no lower bound (eps_low large): eps_low = 1 is that (w >= 0). It does
    not publish its eps_high; the default 4 caps w at 5, ScaleRL's (Khatri et al. 2025) cap as TRL records it.
    The loss value holds log pi, so ``train/loss`` is not on the scale of the ratio losses.
    clipped: tokens whose weight was clipped (r_t outside [1 - eps_low, 1 + eps_high]), whatever the sign of A.
    """
    _check_shapes(logp, old_logp, advantages, mask)
    if not 0.0 <= eps_low <= 1.0 or eps_high < 0.0:
        raise ValueError(f"cispo needs 0 <= eps_low <= 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    keep = mask.bool()  # [N, T]
    ratio = _token_log_ratio(logp, old_logp, mask).detach().exp()  # [N, T]
    weight = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # [N, T], a constant
    loss = -weight * _per_token(advantages.detach()) * torch.where(keep, logp, 0.0)  # [N, T]
    clipped = (weight != ratio) & keep  # [N, T]
    return PolicyLossOutput(torch.where(keep, loss, 0.0), clipped)


@register_policy_loss("gmpo")
def gmpo(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, eps_low: float,
         eps_high: float) -> PolicyLossOutput:
    """GMPO, from "GMPO: Geometric-Mean Policy Optimization" (Zhao et al., 2025): the sequence's ratio is the
    geometric mean of its token ratios, each clipped in log space on the side the advantage pushes it.

        l_t  = log pi(y_t) - log pi_old(y_t)
        c_t  = min(l_t, eps_high) if A_i > 0;  max(l_t, -eps_low) if A_i < 0;  0 if A_i = 0
        S_i  = exp(1/|y_i| sum_t c_t)           objective: 1/G sum_i A_i S_i

    The paper writes A_i S_i as sgn(A_i) (prod_t |min(r_t A_i, clip(r_t, e^-eps_low, e^eps_high) A_i)|)^(1/|y_i|),
    with eps = 0.4 both sides. Per token, as GSPO-token: loss_t = -A_i sg(S_i) exp(c_t - sg(c_t)), whose value
    is -A_i S_i on every token of sequence i and whose mean over the sequence has the gradient of -A_i S_i; so
    ``seq_mean_token_mean`` is the paper's objective, ``token_mean`` weighs each sequence by its length. log S_i
    is bounded at SEQ_LOG_RATIO_MAX, as GSPO's. Needs one advantage per sequence ([N]).
    clipped: tokens whose log-ratio was clipped (l_t > eps_high with A > 0, l_t < -eps_low with A < 0).
    """
    _check_shapes(logp, old_logp, advantages, mask)
    if advantages.ndim != 1:
        raise ValueError(f"gmpo needs one advantage per sequence, shape [N], got {tuple(advantages.shape)}")
    if eps_low < 0.0 or eps_high < 0.0:
        raise ValueError(f"gmpo needs eps_low >= 0 and eps_high >= 0, got {eps_low}, {eps_high}")
    keep = mask.bool()  # [N, T]
    log_ratio = _token_log_ratio(logp, old_logp, mask)  # [N, T]
    adv = advantages.detach()[:, None]  # [N, 1]
    sign = adv.sign()  # [N, 1]
    clipped_log = sign * torch.minimum(sign * log_ratio, sign * log_ratio.clamp(-eps_low, eps_high))  # [N, T]
    lengths = keep.sum(dim=1).clamp(min=1)  # [N]
    log_s = (torch.where(keep, clipped_log, 0.0).sum(dim=1) / lengths).clamp(max=SEQ_LOG_RATIO_MAX)  # [N]
    loss = -adv * log_s.detach().exp()[:, None] * (clipped_log - clipped_log.detach()).exp()  # [N, T]
    clipped = (((log_ratio > eps_high) & (adv > 0)) | ((log_ratio < -eps_low) & (adv < 0))) & keep  # [N, T]
    return PolicyLossOutput(torch.where(keep, loss, 0.0), clipped)


SAPO_HALF_WEIGHT = 2.0 * math.log(1.0 + math.sqrt(2.0))  # |tau (r - 1)| beyond which SAPO's gate weight is < 1/2


@register_policy_loss("sapo")
def sapo(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, tau_pos: float,
         tau_neg: float) -> PolicyLossOutput:
    """SAPO, from "Soft Adaptive Policy Optimization" (Gao et al., Qwen, 2025): a smooth gate in place of the clip.

        tau    = tau_pos if A > 0 else tau_neg
        loss_t = -A * (4 / tau) * sigmoid(tau (r_t - 1))
        gradient: -A * w_t * r_t * grad log pi(y_t),   w_t = 4 s (1 - s),  s = sigmoid(tau (r_t - 1))

    w = 1 at r = 1, so on-policy the gradient is the policy gradient, and w decays smoothly on both sides of 1,
    the faster the larger tau; the paper's tau_neg = 1.05 > tau_pos = 1.0 damps negative-advantage tokens
    sooner. Limits: as tau -> 0, w -> 1 for every r, the gradient of the unclipped -A r (``ppo_clip`` with a range
    wider than every ratio); as tau -> inf, w -> 0 for every r != 1. PPO's hard clip is neither limit: it zeroes
    the gradient on one side of the range only. The value is the paper's, offset by a constant (-2A/tau at r = 1)
    from the ratio losses', as TRL's and verl's are.
    clipped: tokens whose gate weight w_t < 1/2 (|tau (r_t - 1)| > 2 ln(1 + sqrt 2) = 1.763).
    """
    _check_shapes(logp, old_logp, advantages, mask)
    if tau_pos <= 0.0 or tau_neg <= 0.0:
        raise ValueError(f"sapo needs temperatures > 0, got tau_pos={tau_pos}, tau_neg={tau_neg}")
    keep = mask.bool()  # [N, T]
    ratio = _token_log_ratio(logp, old_logp, mask).exp()  # [N, T]
    adv = _per_token(advantages.detach())  # [N, 1] or [N, T]
    tau = torch.where(adv > 0, tau_pos, tau_neg)  # [N, 1] or [N, T]
    loss = -adv * (4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0))  # [N, T]
    clipped = ((tau * (ratio.detach() - 1.0)).abs() > SAPO_HALF_WEIGHT) & keep  # [N, T]
    return PolicyLossOutput(torch.where(keep, loss, 0.0), clipped)


def _token_covariance(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """(A_t - mean A)(log pi(y_t) - mean log pi) per token [N, T], both means over the masked tokens (A_t is
    the sequence's advantage on each of its tokens); a constant; -inf on masked positions."""
    keep = mask.bool()  # [N, T]
    count = keep.sum().clamp(min=1)  # []
    adv = torch.where(keep, _per_token(advantages.detach()), 0.0)  # [N, T]
    lp = torch.where(keep, logp.detach(), 0.0)  # [N, T]
    cov = (adv - adv.sum() / count) * (lp - lp.sum() / count)  # [N, T]
    return torch.where(keep, cov, -math.inf)  # [N, T]


def _cov_count(fraction: float, mask: Tensor) -> int:
    """How many tokens the covariance losses pick: floor(fraction * n), at least 1, for n masked tokens (0 if none)."""
    n = int(mask.bool().sum().item())
    return max(1, int(fraction * n)) if n else 0


@register_policy_loss("clip_cov")
def clip_cov(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, fraction: float, cov_low: float,
             cov_high: float, generator: torch.Generator | None = None) -> PolicyLossOutput:
    """Clip-Cov, from "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models" (Cui et al.,
    2025): entropy falls where a token's log-prob and its advantage covary, so a few such tokens lose their gradient.

        cov_t  = (A_t - mean A)(log pi(y_t) - mean log pi)      (means over the call's n masked tokens)
        I      = k tokens drawn uniformly, without replacement, from those with cov_low < cov_t < cov_high,
                 k = min(their count, max(1, floor(fraction * n)))
        loss_t = -r_t A  for t not in I;   sg(-r_t A)  for t in I (the value kept, no gradient)

    Paper defaults: fraction 2e-4, bounds (1, 5). ``generator`` draws I (None: torch's global generator, which the
    trainer seeds from the run's seed and saves in checkpoints). clipped: the tokens of I.
    """
    _check_shapes(logp, old_logp, advantages, mask)
    if not 0.0 < fraction <= 1.0 or not cov_low < cov_high:
        raise ValueError(f"clip_cov needs 0 < fraction <= 1 and cov_low < cov_high, got {fraction}, "
                         f"{cov_low}, {cov_high}")
    keep = mask.bool()  # [N, T]
    loss = -_per_token(advantages.detach()) * _token_log_ratio(logp, old_logp, mask).exp()  # [N, T]
    cov = _token_covariance(logp, advantages, mask)  # [N, T]
    candidates = ((cov > cov_low) & (cov < cov_high) & keep).flatten().nonzero().squeeze(1)  # [C]
    k = min(len(candidates), _cov_count(fraction, mask))
    drawn = torch.randperm(len(candidates), generator=generator)[:k].to(candidates.device)  # [k]
    chosen = torch.zeros(keep.numel(), dtype=torch.bool, device=keep.device)  # [N*T]
    chosen[candidates[drawn]] = True
    chosen = chosen.view_as(keep)  # [N, T]
    loss = torch.where(chosen, loss.detach(), loss)  # [N, T]
    return PolicyLossOutput(torch.where(keep, loss, 0.0), chosen)


@register_policy_loss("kl_cov")
def kl_cov(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, fraction: float,
           coef: float) -> PolicyLossOutput:
    """KL-Cov, from "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models" (Cui et al.,
    2025): the tokens whose log-prob and advantage covary most are held near the old policy by a KL penalty.

        cov_t  = (A_t - mean A)(log pi(y_t) - mean log pi)      (means over the call's n masked tokens)
        I      = the k = max(1, floor(fraction * n)) tokens of largest cov_t
        loss_t = -r_t A + [t in I] * coef * |log r_t|

    |log r_t| is the per-token estimate of KL(pi_old || pi) that the authors' code (and verl) penalise: its
    gradient is coef * sign(log r_t) * grad log pi, full size however small the gap, and 0 at r = 1 exactly.
    With one optimiser step per batch (the authors' 7B script) old and new log-probs are equal here and the
    penalty never acts; there it acts through the rounding gap between their two forward passes. Paper
    defaults: coef 1, fraction 2e-3 (its Qwen2.5-7B runs; 2e-4 for 32B, verl's default). clipped: the tokens of I.
    """
    _check_shapes(logp, old_logp, advantages, mask)
    if not 0.0 < fraction <= 1.0 or coef < 0.0:
        raise ValueError(f"kl_cov needs 0 < fraction <= 1 and coef >= 0, got {fraction}, {coef}")
    keep = mask.bool()  # [N, T]
    log_ratio = _token_log_ratio(logp, old_logp, mask)  # [N, T]
    loss = -_per_token(advantages.detach()) * log_ratio.exp()  # [N, T]
    top = _token_covariance(logp, advantages, mask).flatten().topk(_cov_count(fraction, mask)).indices  # [k]
    chosen = torch.zeros(keep.numel(), dtype=torch.bool, device=keep.device)  # [N*T]
    chosen[top] = True
    chosen = chosen.view_as(keep)  # [N, T]
    loss = loss + torch.where(chosen, coef * log_ratio.abs(), 0.0)  # [N, T]
    return PolicyLossOutput(torch.where(keep, loss, 0.0), chosen)


def _token_mean(masked_loss: Tensor, mask: Tensor, num_tokens: Count, num_seqs: Count, max_len: Count) -> Tensor:
    return masked_loss.sum() / num_tokens  # []


def _seq_mean_token_mean(masked_loss: Tensor, mask: Tensor, num_tokens: Count, num_seqs: Count,
                         max_len: Count) -> Tensor:
    per_seq = masked_loss.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [N]
    return per_seq.sum() / num_seqs  # []


def _seq_mean_token_sum_norm(masked_loss: Tensor, mask: Tensor, num_tokens: Count, num_seqs: Count,
                             max_len: Count) -> Tensor:
    per_seq = masked_loss.sum(dim=1) / max_len  # [N]
    return per_seq.sum() / num_seqs  # []


_AGGREGATORS = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
}

AGGREGATION_MODES = tuple(_AGGREGATORS)


def aggregate(
    per_token_loss: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: Count | None = None,
    num_seqs: Count | None = None,
    max_len: Count | None = None,
) -> Tensor:
    """Reduce a per-token loss [N, T] over the masked tokens to a scalar.

        token_mean               sum_{i,t} m_it l_it / num_tokens                     (DAPO, Yu et al. 2025)
        seq_mean_token_mean      1/num_seqs sum_i (sum_t m_it l_it / sum_t m_it)     (GRPO, Shao et al. 2024)
        seq_mean_token_sum_norm  1/num_seqs sum_i (sum_t m_it l_it / max_len)        (Dr. GRPO, Liu et al. 2025)

    Defaults: num_tokens = mask.sum() (at least 1), num_seqs = N (sequences with no tokens count),
    max_len = T. For gradient accumulation pass the WHOLE batch's num_tokens and num_seqs to every
    micro-batch: the micro-batch losses then sum to the full-batch loss. Pass a fixed max_len (the
    generation budget, as Dr. GRPO does) so the loss does not depend on how far a batch is padded.
    """
    if mode not in _AGGREGATORS:
        raise ValueError(f"unknown aggregation mode {mode!r}; known: {', '.join(AGGREGATION_MODES)}")
    if per_token_loss.ndim != 2 or mask.shape != per_token_loss.shape:
        raise ValueError(
            f"per_token_loss and mask must both be [N, T], got {tuple(per_token_loss.shape)} and {tuple(mask.shape)}"
        )
    mask = mask.to(per_token_loss.dtype)  # [N, T]
    masked_loss = torch.where(mask.bool(), per_token_loss, 0.0)  # [N, T]
    if num_tokens is None:
        num_tokens = mask.sum().clamp(min=1)  # []
    if num_seqs is None:
        num_seqs = max(per_token_loss.shape[0], 1)
    if max_len is None:
        max_len = max(per_token_loss.shape[1], 1)
    for name, value in (("num_tokens", num_tokens), ("num_seqs", num_seqs), ("max_len", max_len)):
        if not isinstance(value, Tensor) and value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    return _AGGREGATORS[mode](masked_loss, mask, num_tokens, num_seqs, max_len)  # []


PreferenceLoss = Callable[[Tensor, float], Tensor]

DPO_LOSSES: Registry[PreferenceLoss] = Registry("DPO loss")


def register_dpo_loss(name: str) -> Callable[[PreferenceLoss], PreferenceLoss]:
    """Register ``fn(h [P], beta) -> per-pair loss [P]`` under ``name``, where h is the pair's log-ratio
    difference (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))."""

    return DPO_LOSSES.register(name)


@register_dpo_loss("sigmoid")
def dpo_sigmoid(h: Tensor, beta: float) -> Tensor:
    """-log sigmoid(beta h): DPO as published (Rafailov et al. 2023, eq. 7)."""
    return -torch.nn.functional.logsigmoid(beta * h)  # [P]


@register_dpo_loss("ipo")
def dpo_ipo(h: Tensor, beta: float) -> Tensor:
    """(h - 1 / (2 beta))^2: IPO (Azar et al. 2023, eq. 17), a squared loss whose target margin keeps the
    policy near the reference even on pairs it already ranks right (beta is IPO's tau)."""
    return (h - 1.0 / (2.0 * beta)).square()  # [P]


@register_dpo_loss("hinge")
def dpo_hinge(h: Tensor, beta: float) -> Tensor:
    """max(0, 1 - beta h): the hinge loss of SLiC (Zhao et al. 2023), on the reference-normalised log-ratio."""
    return torch.relu(1.0 - beta * h)  # [P]


def dpo_loss(policy_seq: Tensor, ref_seq: Tensor, beta: float, loss_type: str = "sigmoid") -> tuple[Tensor, Tensor]:
    """Per pair: the preference loss ``DPO_LOSSES[loss_type]`` and the implicit reward margin beta h, from
    summed completion log-probs [2P] laid out chosen, rejected, chosen, rejected, ..."""
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; known: {', '.join(sorted(DPO_LOSSES))}")
    logratio = policy_seq - ref_seq  # [2P]
    h = logratio[0::2] - logratio[1::2]  # [P]
    return DPO_LOSSES[loss_type](h, beta), (beta * h).detach()  # [P], [P]


def reverse_kl_advantages(student_logp: Tensor, teacher_logp: Tensor, mask: Tensor) -> Tensor:
    """On-policy distillation's per-token advantage [N, T], a constant:

        A_t = -(log pi(y_t) - log q(y_t))     on the masked tokens, 0 elsewhere

    with pi the student that sampled y and q the teacher. sum_t (log pi(y_t) - log q(y_t)) over a sample of pi
    estimates the reverse KL(pi || q) of the sequence, so a policy-gradient loss with this advantage (discount 0:
    each token sees its own term) descends the reverse KL on the student's own samples (Thinking Machines'
    on-policy distillation, 2025)."""
    keep = mask.bool()  # [N, T]
    # where(), not multiplication: a -inf log-prob on padding would give NaN
    return torch.where(keep, torch.where(keep, teacher_logp, 0.0) - torch.where(keep, student_logp, 0.0),
                       0.0).detach()  # [N, T]


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, beta: float) -> Tensor:
    """The generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1) over the last (vocabulary)
    dimension of two log-distributions [..., V]; returns [...]. TRL's GKDTrainer convention:

        M = beta q + (1 - beta) pi
        JSD_beta = beta KL(q || M) + (1 - beta) KL(pi || M)
        beta = 0: KL(q || pi), the forward KL;  beta = 1: KL(pi || q), the reverse KL

    (at the two ends the mixture formula degenerates to 0, so they are the KLs themselves, as TRL writes them).
    The gradient flows through `student_logp`; pass the teacher's detached."""
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0:
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # [...]
    if beta == 1:
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)  # [...]
    mixture = torch.logsumexp(torch.stack([student_logp + math.log1p(-beta), teacher_logp + math.log(beta)]),
                              dim=0)  # [..., V]
    kl_teacher = (teacher_logp.exp() * (teacher_logp - mixture)).sum(-1)  # [...]
    kl_student = (student_logp.exp() * (student_logp - mixture)).sum(-1)  # [...]
    return beta * kl_teacher + (1 - beta) * kl_student  # [...]
