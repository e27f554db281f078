"""The one name -> entry registry type of the project, and what a reward registers.

``Registry`` holds one kind of named thing: reward functions (``rewards.catalog.REWARDS``), advantage
estimators and policy losses (``grpo.core``), environments (``grpo.envs``). Every entry of a registry has the
same signature, so a caller looks a name up instead of branching on it. It lives here, in the package that
imports nothing of the others, so that each of them can use it.

A reward function has one signature::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

``columns`` are the dataset's extra columns (``answer=[...]``, ``tests=[...]``), each a list aligned with
``completions``. ``None`` means "not applicable to this sample": it is masked, never read as 0. A reward is
registered as a ``Reward``: the function, and optionally how it refuses a configuration and what it counts.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

RewardFn = Callable[..., Any]
T = TypeVar("T")


class RewardConfigError(ValueError):
    """A reward cannot run as configured (a bad option, no sandbox). Raised to the caller, never masked as None."""


class UnknownEntry(ValueError):
    """A name that no registered entry, built-in, dotted path or entry point answers to; the message lists the known
    names or says why the path did not load."""


class Registry(Mapping[str, T], Generic[T]):
    """Names -> entries of one kind.

    An entry is registered (``@registry.register(name)``), or named by a path imported on first use
    (``lazy={"name": "package.module:attr"}``, so that built-ins load only when chosen). ``resolve`` also takes,
    where the registry allows them, a dotted path ``package.module:attr`` (``paths=True``) and the name of an
    entry point that an installed package declares in the group ``entry_points``. ``convert`` turns what a
    path or entry point loads into an entry (and refuses what cannot be one).
    """

    def __init__(self, kind: str, *, lazy: dict[str, str] | None = None, entry_points: str | None = None,
                 paths: bool = False, convert: Callable[[Any], T] | None = None):
        self.kind = kind  # what an entry is, in messages: "reward", "advantage estimator"
        self.entry_point_group = entry_points
        self._entries: dict[str, T] = {}
        self._lazy = dict(lazy or {})
        self._paths = paths
        self._convert = convert or (lambda obj: obj)

    def register(self, name: str, entry: T | None = None) -> Any:
        """Add ``entry`` as ``name``; without ``entry``, a decorator that adds what it decorates.

        The same name twice is an error unless the entry is equal (a silent override would make a config
        mean different things depending on import order).
        """
        def add(obj: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and existing != obj:
                raise ValueError(f"{self.kind} {name!r} is already registered to {_describe(existing)}")
            self._entries[name] = obj
            return obj

        return add if entry is None else add(entry)

    def __getitem__(self, name: str) -> T:
        """A registered or lazily named entry (importing its module on first use); KeyError otherwise."""
        if name not in self._entries and name in self._lazy:
            entry = self._convert(load_path(self._lazy[name], what=f"built-in {self.kind} {name!r}"))
            self._entries.setdefault(name, entry)  # its module may have registered it while importing
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self._entries) | set(self._lazy)))

    def __len__(self) -> int:
        return len(set(self._entries) | set(self._lazy))

    def known(self) -> list[str]:
        """Every name ``resolve`` takes besides dotted paths: registered, built-in and entry-point names."""
        return sorted(set(self) | {ep.name for ep in self._entry_points()})

    def resolve(self, name: str) -> T:
        """The entry for a registered or built-in name, a dotted path or an entry point's name; an UnknownEntry
        that lists the known names otherwise."""
        if not isinstance(name, str) or not name:
            raise UnknownEntry(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self:
            return self[name]
        if self._paths and ":" in name:
            return self._convert(load_path(name, what=f"{self.kind} {name!r}"))
        for ep in self._entry_points():
            if ep.name == name:
                return self._convert(ep.load())
        hint = f" Your own {self.kind} can also be given as 'package.module:attr'." if self._paths else ""
        raise UnknownEntry(f"unknown {self.kind} {name!r}. Known: {', '.join(self.known())}.{hint}")

    def _entry_points(self) -> list[importlib.metadata.EntryPoint]:
        if self.entry_point_group is None:
            return []
        try:
            return list(importlib.metadata.entry_points(group=self.entry_point_group))
        except Exception:  # a broken installed distribution must not break every lookup
            return []


@dataclass(frozen=True)
class Reward:
    """A reward function as registered: the function, and two optional parts of its contract.

    ``check_options(**kwargs)`` is called with the config's options before training (raise
    ``RewardConfigError`` to refuse them); ``metrics()`` returns what the reward counted since the last call
    (e.g. timeouts), logged as ``reward/<name>_<key>``.
    """

    fn: RewardFn
    check_options: Callable[..., None] | None = None
    metrics: Callable[[], dict[str, float]] | None = None

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"a reward needs a callable, got {type(self.fn).__name__}")


class RewardCounts:
    """What a reward counts between two reads of its metrics: its ``Reward.metrics`` is ``counts.pop``.

    Locked, since rewards score in worker threads. The keys in ``always`` read 0 when nothing was counted, so a
    logged series has no gaps (an ``infra_errors`` of 0 says the reward ran and nothing failed).
    """

    def __init__(self, *always: str):
        self._always = always
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def update(self, counts: Mapping[str, int]) -> None:
        with self._lock:
            self._counts.update(counts)

    def pop(self) -> dict[str, float]:
        """Every count since the last ``pop``, as floats, and zero from here on."""
        with self._lock:
            out = {key: float(n) for key, n in self._counts.items()}
            self._counts.clear()
        return {key: 0.0 for key in self._always} | out


def as_reward(obj: Any) -> Reward:
    """``obj`` as a registry entry: a ``Reward`` as it is, a bare function with no options check or counters."""
    if isinstance(obj, Reward):
        return obj
    if not callable(obj):
        raise RewardConfigError(f"{_describe(obj)} is not callable, so it cannot be a reward")
    return Reward(obj)


def load_path(path: str, what: str) -> Any:
    """The object at ``package.module:attr`` (``attr`` may be dotted); an UnknownEntry naming ``what`` otherwise."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UnknownEntry(f"{what}: a dotted path must look like 'package.module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnknownEntry(f"{what}: cannot import module {module_name!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UnknownEntry(f"{what}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def _describe(obj: Any) -> str:
    if isinstance(obj, Reward):
        obj = obj.fn
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"


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
