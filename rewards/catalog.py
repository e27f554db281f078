"""Where reward functions come from: ``REWARDS``, the reward registry, and ``get_reward(name)``.

A name resolves, in order, to
1. a reward registered with ``@register_reward(name)``;
2. a built-in: its module is imported on first use (so ``import rewards`` stays cheap: the math checker and
   the code sandbox load when chosen);
3. a dotted path ``package.module:function``;
4. an entry point in the group ``grpo.rewards`` that an installed package declares (the learned reward model,
   ``reward_model``, comes this way, as a user's package would).
"""

from __future__ import annotations

from collections.abc import Callable

from rewards.registry import Registry, Reward, RewardFn, as_reward

BUILTIN_REWARDS = {
    "math_accuracy": "rewards.math_accuracy:MATH_ACCURACY",
    "code_tests": "rewards.code_tests:CODE_TESTS",
    "format": "rewards.shaping:FORMAT",
    "length": "rewards.shaping:LENGTH",
    "reasoning_gym": "rewards.reasoning_tasks:REASONING_GYM",
    "judge": "rewards.judge:JUDGE",
}
REWARDS: Registry[Reward] = Registry("reward", lazy=BUILTIN_REWARDS, entry_points="grpo.rewards", paths=True,
                                     convert=as_reward)


def register_reward(name: str, *, check_options: Callable[..., None] | None = None,
                    metrics: Callable[[], dict[str, float]] | None = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` available to configs as ``name``, with its optional options check and counters
    (``rewards.registry.Reward``). The same name for another function is an error."""

    def decorator(fn: RewardFn) -> RewardFn:
        REWARDS.register(name, Reward(fn, check_options, metrics))
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    """The reward function for a registered or built-in name, a ``module:function`` path or a ``grpo.rewards``
    entry point; ``ValueError`` naming the known rewards otherwise."""
    return REWARDS.resolve(name).fn


def known_rewards() -> list[str]:
    """Every name ``get_reward`` accepts besides dotted paths."""
    return REWARDS.known()
