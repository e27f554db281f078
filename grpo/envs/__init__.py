"""Environments: multi-turn episodes, where the model's turns alternate with the environment's.

An episode starts from one dataset row and runs in turns:

    messages = env.reset(row)            # the opening chat messages (system, user, ...)
    loop:
        the model writes its turn        # sampled token ids, kept exactly as sampled
        result = env.step(text)          # the turn's text -> Observation or Done
        Observation: its messages (tool responses, a user reply) are rendered with the chat
                     template and appended; they are in the context but get no gradient
        Done:        the episode ends with its reward (a float, or None: "the task's reward
                     functions score it")

Any class with `reset` and `step` is an environment (a `typing.Protocol`: nothing to inherit). One instance
runs one episode, so episodes never share state; if it has a `close()`, that is called once, when its episode
is over, to stop what it started (a process, a sandbox). An environment that offers tools lists them in
`tools`: plain Python functions, whose JSON schema (shown to the model through the chat template) is taken
from their signature and docstring. `ToolEnvironment` (grpo.envs.tools) does the tool plumbing: parse the
turn's tool calls, run them, and turn every failure into a message the model sees. Environments are chosen by
`env.name`: a dotted path `package.module:Class` or a name registered in the `grpo.environments` entry-point
group; `env.kwargs` are passed to the class. What an environment starts for the whole run rather than one episode (a
server its episodes connect to) is registered with `on_run_end` and stopped by `end_run` when the run ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from rewards.registry import Registry

logger = logging.getLogger(__name__)


@dataclass
class Observation:
    """The environment's reply: messages appended to the conversation, after which the model speaks again."""

    messages: list[dict]  # e.g. [{"role": "tool", "name": "multiply", "content": "42"}]


@dataclass
class Done:
    """The episode is over. `reward` None leaves the scoring to the task's reward functions. `scores`: the named
    parts the environment's reward was made of (logged as `reward/<name>`; `reward` alone enters the total)."""

    reward: float | None = None
    scores: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    tools: list[Callable]  # functions the model may call ([] for none)

    def reset(self, row: dict) -> list[dict]:
        """Start an episode on a dataset row; returns its opening chat messages."""
        ...

    def step(self, text: str) -> Observation | Done:
        """The model's turn (its text, special tokens dropped) -> the next observation, or the end."""
        ...


ENTRY_POINT_GROUP = "grpo.environments"
# Environment classes (or functions that build one) by name: the built-ins, imported when chosen; any other
# `package.module:Class` path; a name an installed package declares in the `grpo.environments` entry points.
ENVIRONMENTS: Registry[Callable[..., Environment]] = Registry(
    "environment", lazy={"calculator": "grpo.envs.calculator:calculator_environment",
                         "python": "grpo.envs.python:python_environment",
                         "routed": "grpo.envs.routing:RoutedEnvironment"},
    entry_points=ENTRY_POINT_GROUP, paths=True)


def environment_factory(name: str, kwargs: dict | None = None) -> Callable[[], Environment]:
    """A function that makes a fresh environment per call (one per episode), for a built-in name, a
    `package.module:Class` path or a `grpo.environments` entry point; ValueError lists the known names."""
    cls = ENVIRONMENTS.resolve(name)
    options = dict(kwargs or {})
    return lambda: cls(**options)


def environment_rows(name: str, kwargs: dict | None = None) -> dict[str, list[dict]]:
    """The dataset an environment brings (`task.builtin=env`): its class's `rows(**kwargs)`, {"train": [...],
    "test": [...]}; ValueError where it has none."""
    cls = ENVIRONMENTS.resolve(name)
    if not callable(getattr(cls, "rows", None)):
        raise ValueError(f"task.builtin=env: the environment {name!r} brings no rows (a `rows` classmethod); "
                         "use a task of its own (task.builtin, task.train_file, task.hf_dataset)")
    return cls.rows(**dict(kwargs or {}))


RUN_RESOURCES: list[Callable[[], None]] = []  # what stops the run's shared resources, in the order they started


def on_run_end(stop: Callable[[], None]) -> None:
    """Have `stop` called when the run ends (`end_run`), e.g. to stop a server the run's episodes share."""
    RUN_RESOURCES.append(stop)


def end_run() -> None:
    """Stop what environments started for the run, the latest first; an error is logged and the rest still stop."""
    while RUN_RESOURCES:
        stop = RUN_RESOURCES.pop()
        try:
            stop()
        except Exception:
            logger.exception("environment: stopping %r at the end of the run raised", stop)
