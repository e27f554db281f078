"""Reward functions for the GRPO trainer.

A reward is ``fn(prompts, completions, **columns) -> list[float | None]`` (``None``: not applicable, masked).
Built-in rewards: ``math_accuracy`` (column ``answer``), ``code_tests`` (column ``tests``, optional
``entry_point``), ``format`` and ``length``. Importing this package is cheap: the math checker and the code
sandbox load when those rewards are first used.
"""

from rewards.registry import RewardConfigError, get_reward, known_rewards, per_sample, register_reward
from rewards.scorer import RewardScorer, RewardSpec, ScoredBatch

__all__ = [
    "RewardConfigError",
    "RewardScorer",
    "RewardSpec",
    "ScoredBatch",
    "get_reward",
    "known_rewards",
    "per_sample",
    "register_reward",
]
