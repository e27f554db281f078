"""Shaping rewards: ``format`` (the answer is laid out as asked) and ``length`` (overlong penalty).

``length`` is DAPO's soft overlong punishment, with ``L = max_length`` and ``C = buffer``::

    r(l) = 0                      if l <= L - C
         = (L - C - l) / C        if L - C < l <= L      (linear from 0 down to -1)
         = -1                     if l > L

It is a penalty only (never positive), so it is meant to be added to a correctness reward with a weight.
"""

from __future__ import annotations

import re
from typing import Any

from rewards.answers import boxed_contents
from rewards.registry import Reward, RewardConfigError


def format_reward(
    prompts: list[str],
    completions: list[str],
    *,
    tags: list[str] | None = None,
    boxed: bool | None = None,
    pattern: str | None = None,
) -> list[float | None]:
    """1.0 when the completion has the required layout, else 0.0.

    Options:
        tags: e.g. ``["think", "answer"]``: the completion is exactly ``<think>...</think><answer>...</answer>``
            in that order, each once and non-empty, with only whitespace around them.
        boxed: exactly one final answer in ``\\boxed{}`` (repeats of the same box allowed). Defaults to True
            when neither tags nor a pattern is given, False otherwise.
        pattern: a regex the whole completion, stripped of surrounding whitespace, must match (e.g.
            ``-?[0-9]+`` for a bare number, when the prompt asks for the answer alone).
    """
    if boxed is None:
        boxed = not tags and pattern is None
    if not tags and not boxed and pattern is None:
        raise RewardConfigError("format reward: give tags, or boxed=True, or a pattern")
    layout = _tag_layout(tags) if tags else None
    whole = _whole_pattern(pattern) if pattern is not None else None
    scores: list[float | None] = []
    for completion in completions:
        ok = whole is None or whole.fullmatch(completion.strip()) is not None
        if ok and layout is not None:
            match = layout.fullmatch(completion)
            ok = match is not None and all(part.strip() for part in match.groups())
        if ok and boxed:
            boxes = {" ".join(b.split()) for b in boxed_contents(completion)}
            ok = len(boxes) == 1 and "" not in boxes
        scores.append(1.0 if ok else 0.0)
    return scores


def _whole_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise RewardConfigError(f"format reward: pattern {pattern!r} is not a regex: {e}") from None


def _tag_layout(tags: list[str]) -> re.Pattern[str]:
    for tag in tags:
        if not re.fullmatch(r"[A-Za-z_][\w.-]*", tag):
            raise RewardConfigError(f"format reward: {tag!r} is not a valid tag name")
    # Each tag once, its content captured (checked non-empty by the caller) and free of that tag.
    body = r"\s*".join(rf"<{re.escape(t)}>((?:(?!</?{re.escape(t)}>).)*)</{re.escape(t)}>" for t in tags)
    return re.compile(rf"\s*{body}\s*", re.DOTALL)


def overlong_penalty(lengths: list[int], max_length: int, buffer: int) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of each length, in [-1, 0]: the formula in
    the module docstring with ``L = max_length``, ``C = buffer``; ``buffer`` 0 makes it a step at ``L``.
    Shared by the ``length`` reward and the trainer's ``algorithm.overlong_buffer``."""
    soft_start = max_length - buffer
    return [0.0 if n <= soft_start else (soft_start - n) / buffer if n <= max_length else -1.0 for n in lengths]


def length_reward(
    prompts: list[str],
    completions: list[str],
    *,
    max_length: int = 1024,
    buffer: int = 256,
    unit: str = "chars",
    completion_length: list[Any] | None = None,
) -> list[float | None]:
    """The overlong penalty in the module docstring, in ``[-1, 0]``.

    Options:
        max_length: ``L``, the length at and past which the penalty is -1 (exceeding it is -1).
        buffer: ``C``, the soft zone before ``L`` where the penalty grows linearly; 0 makes it a step.
        unit: ``chars`` counts characters of the completion; ``tokens`` reads the ``completion_length`` column
            (token counts, which the trainer passes alongside the dataset columns).
    """
    if max_length <= 0 or not 0 <= buffer <= max_length:
        raise RewardConfigError(
            f"length reward: need max_length > 0 and 0 <= buffer <= max_length, got {max_length}, {buffer}"
        )
    if unit == "chars":
        lengths = [len(c) for c in completions]
    elif unit == "tokens":
        if completion_length is None:
            raise RewardConfigError(
                "length reward with unit='tokens' needs the column completion_length (token counts)"
            )
        lengths = [int(n) for n in completion_length]
    else:
        raise RewardConfigError(f"length reward: unit must be 'chars' or 'tokens', got {unit!r}")
    return overlong_penalty(lengths, max_length, buffer)


# What rewards.catalog registers as `format` and `length`. Options are checked when the scorer is built: an
# empty batch runs every validation above.
FORMAT = Reward(format_reward, check_options=lambda **options: format_reward([], [], **options))
LENGTH = Reward(length_reward, check_options=lambda **options: length_reward([], [], completion_length=[], **options))
