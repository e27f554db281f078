"""Where reward functions come from: the registry, dotted paths and entry points.

A reward function has one signature::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

``columns`` are the dataset's extra columns (``answer=[...]``, ``tests=[...]``), each a list aligned with
``completions``. ``None`` means "not applicable to this sample": it is masked, never read as 0.

``get_reward(name)`` resolves, in order:

1. a name registered with ``@register_reward(name)`` (the built-ins are registered as module paths and
   imported on first use, so ``import rewards`` stays cheap);
2. a dotted path ``package.module:function``;
3. an entry point in the group ``grpo.rewards`` declared by an installed package.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from typing import Any

RewardFn = Callable[..., Any]

ENTRY_POINT_GROUP = "grpo.rewards"

# Built-in rewards, named as "module:attribute" so that their modules (and what those import) load only
# when the reward is chosen.
_BUILTINS: dict[str, str] = {
    "math_accuracy": "rewards.math_accuracy:math_accuracy",
    "code_tests": "rewards.code_tests:code_tests",
    "format": "rewards.shaping:format_reward",
    "length": "rewards.shaping:length_reward",
    "reward_model": "reward_models.scorer:reward_model",
    "reasoning_gym": "rewards.reasoning_tasks:reasoning_gym_reward",
}

_REGISTRY: dict[str, RewardFn] = {}


class RewardConfigError(ValueError):
    """A reward cannot run as configured (a bad option, no sandbox). Raised to the caller, never masked as None."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` available to configs as ``name``.

    Registering a name twice with different functions is an error (a silent override would make a config
    mean different things depending on import order).
    """

    def decorator(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise TypeError(f"register_reward({name!r}) needs a callable, got {type(fn).__name__}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"reward {name!r} is already registered to {_describe(existing)}")
        _REGISTRY[name] = fn
        return fn

    return decorator


def known_rewards() -> list[str]:
    """Every name ``get_reward`` accepts besides dotted paths: registered, built-in and entry-point names."""
    names = set(_REGISTRY) | set(_BUILTINS) | {ep.name for ep in _entry_points()}
    return sorted(names)


def get_reward(name: str) -> RewardFn:
    """The reward callable for a registered name, a ``module:function`` path or a ``grpo.rewards`` entry point.

    Raises ``ValueError`` naming the known rewards when ``name`` is none of these.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a reward name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTINS:
        fn = _load_path(_BUILTINS[name], what=f"built-in reward {name!r}")
        # Importing the module ran its @register_reward; fall back to the attribute if it did not.
        return _REGISTRY.setdefault(name, fn)
    if ":" in name:
        return _load_path(name, what=f"reward {name!r}")
    for ep in _entry_points():
        if ep.name == name:
            fn = ep.load()
            if not callable(fn):
                raise ValueError(f"entry point {name!r} ({ep.value}) is not callable")
            return fn
    raise ValueError(
        f"unknown reward {name!r}. Known rewards: {', '.join(known_rewards())}. "
        "A reward of your own can also be given as 'package.module:function'."
    )


def _load_path(path: str, what: str) -> RewardFn:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what}: a dotted path must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what}: cannot import module {module_name!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{what}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"{what}: {path!r} is not callable")
    return obj


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    try:
        return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # a broken installed distribution must not break every lookup
        return []


def _describe(fn: RewardFn) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def per_sample(fn: Callable[..., float | None]) -> RewardFn:
    """Turn ``fn(prompt, completion, **row) -> float | None`` into a batch reward.

    Keyword-only parameters of ``fn`` (after ``*``) are options from ``RewardSpec.kwargs``, passed unchanged;
    every other keyword argument is a column, and ``fn`` gets this sample's value of it::

        @register_reward("close_to_target")
        @per_sample
        def close_to_target(prompt, completion, target, *, scale=1.0):
            return -scale * abs(len(completion) - target)
    """
    sig = inspect.signature(fn)
    options = {name for name, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}

    def batch(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float | None]:
        columns = {k: v for k, v in kwargs.items() if k not in options}
        fixed = {k: v for k, v in kwargs.items() if k in options}
        return [
            fn(prompt, completion, **{k: v[i] for k, v in columns.items()}, **fixed)
            for i, (prompt, completion) in enumerate(zip(prompts, completions))
        ]

    # Show the scorer fn's columns and options, so it can check them and pass only those.
    rest = list(sig.parameters.values())[2:]
    params = [
        inspect.Parameter("prompts", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("completions", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ] + [p.replace(kind=p.KEYWORD_ONLY) if p.kind is p.POSITIONAL_OR_KEYWORD else p for p in rest]
    batch.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    batch.__name__ = getattr(fn, "__name__", "per_sample_reward")
    batch.__qualname__ = getattr(fn, "__qualname__", batch.__name__)
    batch.__doc__ = fn.__doc__
    batch.__module__ = getattr(fn, "__module__", __name__)
    return batch
