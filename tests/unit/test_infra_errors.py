"""The training side of infrastructure failures: `ScoringTally` keeps `reward/<name>_infra_errors` as counts and
reports the worst reward's share, and `check_infra_errors` stops past `reward.max_infra_error_frac`."""

from __future__ import annotations

import pytest

from grpo.errors import ConfigError, RewardInfraError
from grpo.training.sampling import ScoringTally, check_infra_errors
from rewards.scorer import ScoredBatch
from tests.conftest import compose


def batch(n: int, infra: dict[str, float]) -> ScoredBatch:
    return ScoredBatch(total=[1.0] * n, per_reward={}, errors={},
                       reward_metrics={f"reward/{k}_infra_errors": v for k, v in infra.items()})


def test_the_tally_keeps_counts_and_reports_the_worst_rewards_share():
    tally = ScoringTally()
    tally.add(batch(4, {"a": 1.0, "b": 0.0}))
    tally.add(batch(4, {"a": 2.0, "b": 1.0}))
    m = tally.metrics()
    # 8 samples; a: 1 + 2 = 3 unscored (3/8), b: 1 (1/8); the worst is a's 3/8 = 0.375
    assert m["reward/a_infra_errors"] == 3.0 and m["reward/b_infra_errors"] == 1.0
    assert m["train/reward_infra_error_frac"] == 0.375
    check_infra_errors(m, 0.375)  # at the threshold: goes on
    with pytest.raises(RewardInfraError, match=r"38% of the samples .*reward/a_infra_errors.*max_infra_error_frac=0.3"):
        check_infra_errors(m, 0.3)


def test_the_threshold_is_a_fraction_named_in_its_error():
    assert compose([]).reward.max_infra_error_frac == 0.5
    for bad in ("-0.1", "1.5"):
        with pytest.raises(ConfigError, match="reward.max_infra_error_frac"):
            compose([f"reward.max_infra_error_frac={bad}"])
