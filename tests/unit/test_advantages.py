import math

import pytest
import torch

from grpo.core.advantages import (
    ADVANTAGE_ESTIMATORS,
    EPS,
    get_advantage_estimator,
    group_stats,
)

ATOL = 1e-6


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_registry_names():
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce_pp"}
    assert get_advantage_estimator("rloo") is ADVANTAGE_ESTIMATORS["rloo"]


def test_unknown_estimator_lists_names():
    with pytest.raises(ValueError, match="dr_grpo.*grpo.*reinforce_pp.*rloo"):
        get_advantage_estimator("ppo")


def test_grpo_group_size_2():
    # groups [1, 0] and [0, 1]: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = sqrt(0.5)
    # A = +-0.5 / (0.7071068 + 1e-6) = +-0.7071058
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    adv = ADVANTAGE_ESTIMATORS["grpo"](torch.tensor([1.0, 0.0, 0.0, 1.0]), 2)
    close(adv, [a, -a, -a, a])


def test_grpo_group_size_3():
    # [1, 0, 0]: mean 1/3, deviations [2/3, -1/3, -1/3], unbiased var (4/9 + 1/9 + 1/9) / 2 = 1/3
    # std 0.5773503, A = [2/3, -1/3, -1/3] / (0.5773503 + 1e-6) = [1.1547, -0.57735, -0.57735]
    std = math.sqrt(1 / 3) + 1e-6
    adv = ADVANTAGE_ESTIMATORS["grpo"](torch.tensor([1.0, 0.0, 0.0]), 3)
    close(adv, [2 / 3 / std, -1 / 3 / std, -1 / 3 / std])


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_all_equal_groups_get_exactly_zero(name):
    # In float32 the mean of seven 0.7s is 0.7 + 6e-8, the std 6e-8: a naive grpo gives 6e-8 / (6e-8 + 1e-6) = 0.056.
    rewards = torch.tensor([0.7] * 7 + [0.9] * 7 + [1.0] * 7)
    adv = ADVANTAGE_ESTIMATORS[name](rewards, 7)
    assert torch.equal(adv, torch.zeros(21))


def test_grpo_zero_variance_group_next_to_a_live_one():
    # group [2, 2] -> 0, 0; group [3, 1]: mean 2, std sqrt(2), A = +-1 / (sqrt(2) + 1e-6)
    a = 1 / (math.sqrt(2) + 1e-6)
    adv = ADVANTAGE_ESTIMATORS["grpo"](torch.tensor([2.0, 2.0, 3.0, 1.0]), 2)
    close(adv, [0.0, 0.0, a, -a])


def test_grpo_group_size_1_is_zero():
    adv = ADVANTAGE_ESTIMATORS["grpo"](torch.tensor([1.0, 0.0, 3.0]), 1)
    assert torch.equal(adv, torch.zeros(3))


def test_grpo_loop_vs_vectorised():
    torch.manual_seed(0)
    rewards = torch.randn(6 * 5, dtype=torch.float64)
    adv = ADVANTAGE_ESTIMATORS["grpo"](rewards, 5)
    expected = []
    for b in range(6):
        group = rewards[5 * b : 5 * b + 5].tolist()
        mean = sum(group) / 5
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 4)
        expected += [(r - mean) / (std + EPS) for r in group]
    close(adv, expected, atol=1e-12)


def test_dr_grpo():
    # [1, 0] and [0, 1]: mean 0.5 -> [0.5, -0.5, -0.5, 0.5]; [3, 0, 0]: mean 1 -> [2, -1, -1]
    close(ADVANTAGE_ESTIMATORS["dr_grpo"](torch.tensor([1.0, 0.0, 0.0, 1.0]), 2), [0.5, -0.5, -0.5, 0.5])
    close(ADVANTAGE_ESTIMATORS["dr_grpo"](torch.tensor([3.0, 0.0, 0.0]), 3), [2.0, -1.0, -1.0])


def test_rloo():
    # G=2: baseline is the other sample: [1-0, 0-1, 0-1, 1-0] = [1, -1, -1, 1]
    close(ADVANTAGE_ESTIMATORS["rloo"](torch.tensor([1.0, 0.0, 0.0, 1.0]), 2), [1.0, -1.0, -1.0, 1.0])
    # G=3, [3, 0, 0]: [3 - (0+0)/2, 0 - (3+0)/2, 0 - (3+0)/2] = [3, -1.5, -1.5] = 3/2 * [2, -1, -1]
    close(ADVANTAGE_ESTIMATORS["rloo"](torch.tensor([3.0, 0.0, 0.0]), 3), [3.0, -1.5, -1.5])


def test_rloo_loop_vs_vectorised():
    torch.manual_seed(1)
    g = 4
    rewards = torch.rand(5 * g, dtype=torch.float64)
    adv = ADVANTAGE_ESTIMATORS["rloo"](rewards, g)
    expected = []
    for b in range(5):
        group = rewards[g * b : g * b + g].tolist()
        expected += [r - (sum(group) - r) / (g - 1) for r in group]
    close(adv, expected, atol=1e-12)


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        ADVANTAGE_ESTIMATORS["rloo"](torch.tensor([1.0, 0.0]), 1)


def test_reinforce_pp():
    # groups [1,0] [0,1] [1,1] [0,0] -> centred a = [.5, -.5, -.5, .5, 0, 0, 0, 0]
    # batch mean 0, unbiased batch std sqrt(4 * 0.25 / 7) = sqrt(1/7) = 0.3779645
    # A = a / (0.3779645 + 1e-6): +-1.3228722 on the first 4, 0 on the rest
    a = 0.5 / (math.sqrt(1 / 7) + 1e-6)
    adv = ADVANTAGE_ESTIMATORS["reinforce_pp"](torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]), 2)
    close(adv, [a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])


def test_reinforce_pp_whitening_loop():
    torch.manual_seed(2)
    rewards = torch.rand(12, dtype=torch.float64)
    adv = ADVANTAGE_ESTIMATORS["reinforce_pp"](rewards, 3)
    centred = []
    for b in range(4):
        group = rewards[3 * b : 3 * b + 3].tolist()
        centred += [r - sum(group) / 3 for r in group]
    mean = sum(centred) / 12
    std = math.sqrt(sum((c - mean) ** 2 for c in centred) / 11)
    close(adv, [(c - mean) / (std + EPS) for c in centred], atol=1e-12)


def test_reinforce_pp_single_completion_is_zero():
    assert torch.equal(ADVANTAGE_ESTIMATORS["reinforce_pp"](torch.tensor([5.0]), 1), torch.zeros(1))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_shape_and_validation(name):
    fn = ADVANTAGE_ESTIMATORS[name]
    assert fn(torch.rand(8), 4).shape == (8,)
    with pytest.raises(ValueError, match="not divisible by group_size=3"):
        fn(torch.rand(8), 3)
    with pytest.raises(ValueError, match="group_size must be >="):
        fn(torch.rand(8), 0)
    with pytest.raises(ValueError, match=r"shape \[B\*G\]"):
        fn(torch.rand(2, 4), 4)


def test_group_stats():
    # groups [1,0] [1,1] [0,0] [0,1]: two of four are constant
    stats = group_stats(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]), 2)
    assert stats["zero_std_frac"] == 0.5
    assert isinstance(stats["zero_std_frac"], float)
    assert torch.equal(stats["nonzero_std_mask"], torch.tensor([True, False, False, True]))


def test_group_stats_empty_batch():
    stats = group_stats(torch.zeros(0), 4)
    assert stats["zero_std_frac"] == 0.0
    assert stats["nonzero_std_mask"].shape == (0,)


def test_nan_rewards_are_left_out_of_every_estimator():
    # [1, 0, NaN, 1] behaves as the group [1, 0, 1] of k = 3, and the NaN's advantage is 0
    nan = float("nan")
    with_nan = torch.tensor([1.0, 0.0, nan, 1.0, 0.0, 0.0, 1.0, nan])
    for name in ("grpo", "dr_grpo", "rloo"):
        adv = ADVANTAGE_ESTIMATORS[name](with_nan, 4)
        three = ADVANTAGE_ESTIMATORS[name](torch.tensor([1.0, 0.0, 1.0]), 3)
        torch.testing.assert_close(adv[[0, 1, 3]], three, atol=1e-6, rtol=0)
        assert adv[2] == 0 and adv[7] == 0 and not adv.isnan().any(), name
    # reinforce_pp whitens over the 6 applicable completions only
    adv = ADVANTAGE_ESTIMATORS["reinforce_pp"](with_nan, 4)
    dev = torch.tensor([1 / 3, -2 / 3, 1 / 3, -1 / 3, -1 / 3, 2 / 3])  # r - group mean, groups of 3
    torch.testing.assert_close(adv[[0, 1, 3, 4, 5, 6]], (dev - dev.mean()) / (dev.std() + 1e-6), atol=1e-5, rtol=0)
    assert adv[2] == 0 and adv[7] == 0
