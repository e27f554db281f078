"""Reward functions for the GRPO trainer.

A reward is ``fn(prompts, completions, **columns) -> list[float | None]`` (``None``: not applicable, masked).
Built-in rewards: ``math_accuracy`` (column ``answer``), ``code_tests`` (column ``tests``, optional
``entry_point``), ``format`` and ``length``. Importing this package is cheap: the math checker and the code
sandbox load when those rewards are first used.
"""

from rewards.catalog import REWARDS, get_reward, known_rewards, register_reward
from rewards.registry import Registry, Reward, RewardConfigError, per_sample
from rewards.scorer import RewardScorer, RewardSpec, ScoredBatch

__all__ = [
    "REWARDS",
    "Registry",
    "Reward",
    "RewardConfigError",
    "RewardScorer",
    "RewardSpec",
    "ScoredBatch",
    "get_reward",
    "known_rewards",
    "per_sample",
    "register_reward",
]
