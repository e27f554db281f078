"""Advantage estimators: turn one scalar reward per completion into one advantage per completion.

Every estimator is registered by name in ``ADVANTAGE_ESTIMATORS`` and has the same signature::

    fn(rewards: Tensor [B*G], group_size: int) -> advantages: Tensor [B*G]

where the G completions of one prompt are contiguous and NaN marks a reward that does not apply. The advantage is
broadcast to every token of its completion by the loss (outcome supervision).

Where we differ from the papers:

1. ``grpo`` uses the unbiased group standard deviation (``torch.std``'s default, as TRL and verl do);
   DeepSeekMath does not say which. eps = 1e-6 is added to the std, not to the variance.
2. A group whose rewards are all equal gets advantage exactly 0 in every estimator, even when the
   floating-point group mean is off by an ulp (0.1 + 0.1 + 0.1 != 0.3): such a group carries no signal.
3. ``reinforce_pp`` whitens once per completion over the batch; OpenRLHF whitens over tokens, which
   weights long completions more.
4. A reward may be NaN: "not applicable" (a reward function's None). It is left out of every statistic,
   so a group with k valid rewards of G is treated as a group of k (mean, std and the leave-one-out
   factor k/(k-1) over those k), and its own advantage is 0.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from rewards.registry import Registry

AdvantageEstimator = Callable[[Tensor, int], Tensor]

ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")

EPS = 1e-6


def register_advantage(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Register ``fn(rewards [B*G], group_size) -> advantages [B*G]`` under ``name``."""
    return ADVANTAGE_ESTIMATORS.register(name)


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered as ``name``; ValueError listing the known names otherwise."""
    return ADVANTAGE_ESTIMATORS.resolve(name)


def _grouped(rewards: Tensor, group_size: int, min_group_size: int = 1) -> Tensor:
    """Check the contract and reshape rewards [B*G] to [B, G]."""
    if group_size < min_group_size:
        raise ValueError(f"group_size must be >= {min_group_size}, got {group_size}")
    if rewards.ndim != 1:
        raise ValueError(f"rewards must have shape [B*G], got {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor, got {rewards.dtype}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards.numel()={rewards.numel()} is not divisible by group_size={group_size}: "
            "expected the G completions of each prompt to be contiguous"
        )
    return rewards.view(-1, group_size)  # [B, G]


def _valid(grouped: Tensor) -> Tensor:
    """Mask [B, G] of the rewards that apply (not NaN)."""
    return ~grouped.isnan()  # [B, G]


def _count(grouped: Tensor) -> Tensor:
    """Number k [B, 1] of rewards that apply in each group."""
    return _valid(grouped).sum(dim=1, keepdim=True)  # [B, 1]


def _all_equal(grouped: Tensor) -> Tensor:
    """Mask [B, 1] of groups whose applicable rewards are all equal (a group of 0 or 1 included)."""
    valid = _valid(grouped)  # [B, G]
    high = grouped.masked_fill(~valid, -torch.inf).amax(dim=1, keepdim=True)  # [B, 1]
    low = grouped.masked_fill(~valid, torch.inf).amin(dim=1, keepdim=True)  # [B, 1]
    return (high <= low) | (_count(grouped) < 2)  # [B, 1]


def _centered(grouped: Tensor) -> Tensor:
    """r - mean of the group's applicable rewards; exactly 0 in groups whose applicable rewards are all
    equal, and for rewards that do not apply."""
    valid = _valid(grouped)  # [B, G]
    values = grouped.nan_to_num(0.0)  # [B, G]
    mean = values.sum(dim=1, keepdim=True) / _count(grouped).clamp(min=1)  # [B, 1]
    centered = (values - mean).masked_fill(~valid, 0.0)  # [B, G]
    return centered.masked_fill(_all_equal(grouped), 0.0)  # [B, G]


@register_advantage("grpo")
def grpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Group-normalised advantage of GRPO (DeepSeekMath, Shao et al. 2024, section 4.1.2).

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps),   eps = 1e-6

    std is the unbiased (Bessel-corrected) group std, as in TRL and verl; the paper does not say.
    Groups with all-equal rewards (including any group of size 1) get exactly 0. With k of G rewards
    applicable, mean and std are over those k.
    """
    grouped = _grouped(rewards, group_size)  # [B, G]
    centered = _centered(grouped)  # [B, G]
    dof = (_count(grouped) - 1).clamp(min=1)  # [B, 1]; groups with k < 2 are all zeros already
    std = (centered.square().sum(dim=1, keepdim=True) / dof).sqrt()  # [B, 1]
    return (centered / (std + EPS)).reshape(-1)  # [B*G]


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO advantage (Liu et al. 2025, "Understanding R1-Zero-like Training"): no std division.

        A_i = r_i - mean(r_group)

    Dividing by the group std up-weights prompts that are nearly always or nearly never solved;
    Dr. GRPO drops it.
    """
    grouped = _grouped(rewards, group_size)  # [B, G]
    return _centered(grouped).reshape(-1)  # [B*G]


@register_advantage("rloo")
def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics").

        A_i = r_i - 1/(G-1) * sum_{j != i} r_j  =  G/(G-1) * (r_i - mean(r_group))

    The baseline of each sample does not depend on the sample itself, so the gradient is unbiased.
    Needs group_size >= 2. With k of G rewards applicable the factor is k/(k-1).
    """
    grouped = _grouped(rewards, group_size, min_group_size=2)  # [B, G]
    k = _count(grouped).to(grouped.dtype)  # [B, 1]
    return (_centered(grouped) * (k / (k - 1).clamp(min=1))).reshape(-1)  # [B*G]


@register_advantage("reinforce_pp")
def reinforce_pp_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE++ with a group baseline (Hu 2025, "REINFORCE++", the "-baseline" variant).

        a_i = r_i - mean(r_group)
        A_i = (a_i - mean(a_batch)) / (std(a_batch) + eps),   eps = 1e-6, unbiased std

    mean(a_batch) is 0 up to rounding; it is subtracted as in the paper. Whitened per completion
    (OpenRLHF whitens per token). All zeros when the batch std is 0 or the batch has one completion.
    """
    grouped = _grouped(rewards, group_size)  # [B, G]
    centered = _centered(grouped).reshape(-1)  # [B*G]
    valid = _valid(grouped).reshape(-1)  # [B*G]
    applicable = centered[valid]  # [K]
    if applicable.numel() < 2 or applicable.std() == 0:
        return torch.zeros_like(centered)  # [B*G]
    whitened = (centered - applicable.mean()) / (applicable.std() + EPS)  # [B*G]
    return whitened.masked_fill(~valid, 0.0)  # [B*G]


def group_stats(rewards: Tensor, group_size: int) -> dict[str, float | Tensor]:
    """Which groups carry signal.

    Returns a dict with
      - ``zero_std_frac``: float, fraction of groups whose applicable rewards are all equal (NaN = None
        does not count; a group with fewer than 2 applicable rewards has no spread)
        (logged as ``train/zero_std_frac``; 0.0 for an empty batch);
      - ``nonzero_std_mask``: bool Tensor [B], True for groups whose rewards differ
        (DAPO dynamic sampling keeps only these, Yu et al. 2025).
    """
    grouped = _grouped(rewards, group_size)  # [B, G]
    all_equal = _all_equal(grouped).squeeze(1)  # [B]
    num_groups = all_equal.numel()
    zero_std_frac = all_equal.sum().item() / num_groups if num_groups else 0.0
    return {"zero_std_frac": float(zero_std_frac), "nonzero_std_mask": ~all_equal}


def compute_advantages(rewards: list[float | None], group_size: int, estimator: str) -> tuple[Tensor, Tensor, Tensor]:
    """Advantages [N], a validity mask [N] and the rewards as a tensor [N] (NaN for None).

    A None reward does not apply: it is left out of its group's statistics (the estimators treat
    a group with k valid rewards as a group of k), and its sample gets advantage 0 and no gradient.
    """
    values = torch.tensor([r if r is not None else float("nan") for r in rewards], dtype=torch.float32)  # [N]
    valid = ~values.isnan()  # [N]
    advantages = get_advantage_estimator(estimator)(values, group_size)  # [N], 0 where not valid
    return advantages, valid, values
