"""``math_accuracy``: 1.0 when the completion's final answer equals the gold answer, else 0.0.

Two paths:

- in-process (``rewards.answers``): extraction, hedging, and every pair whose gold is a plain number. The
  arithmetic task never leaves this path: ~1 microsecond per completion.
- worker processes (``rewards.math_check``): math-verify + sympy for fractions, LaTeX, sets, intervals and
  expressions, with a hard per-check deadline. A check that runs past it has its worker killed and scores 0.0.

None (skipped, counted) when the gold answer is missing or does not parse: an unparseable gold is never
rewarded. None, counted as ``infra_errors``, where the checker failed for reasons that are not the answer's:
the checker processes cannot start, or the check raised something other than running out of memory, recursion
or digits. A worker that dies mid-check is retried once on a fresh worker; only an answer that kills it twice
scores 0.0 (``crashes``). Counters since the last call are reported through ``MATH_ACCURACY.metrics``
(``reward/math_accuracy_<key>``).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any

from rewards.answers import extract_answer, hedges_inside, normalize, quick_verdict
from rewards.registry import Reward, RewardConfigError, RewardCounts
from rewards.workers import CRASHED, FAILED, OK, TIMEOUT, DeadlinePool, Outcome

_pool: DeadlinePool | None = None
_pool_lock = threading.Lock()
_counts = RewardCounts("infra_errors")
# A check that raised one of these ran out of something because of its answer (a tower of powers): 0.0.
ANSWER_ERRORS = ("MemoryError", "RecursionError", "OverflowError")
logger = logging.getLogger(__name__)


def _first_pass(completion: str, gold_value, answer_pattern: str | None, strict: bool, max_answer_chars: int
                ) -> tuple[float | None, tuple[str, str] | None]:
    """The score without the symbolic checker, or None and the (answer, gold) pair it must decide."""
    gold = normalize(str(gold_value)) if gold_value is not None else ""
    if not gold:
        _counts.add("gold_unparsed")
        return None, None
    found = extract_answer(completion, pattern=answer_pattern, strict=strict)
    if found.answer is None:
        _counts.add("no_answer")
        return 0.0, None
    text = found.answer.strip() if found.source == "whole" else normalize(found.answer)
    if found.hedged or hedges_inside(text, gold):
        _counts.add("hedged")
        return 0.0, None
    if not text or len(text) > max_answer_chars or not _braces_balance(text):
        _counts.add("malformed")
        return 0.0, None
    verdict = quick_verdict(text, gold)
    return (None, (text, gold)) if verdict is None else (verdict, None)


def math_accuracy(
    prompts: list[str],
    completions: list[str],
    *,
    answer: list[Any],
    strict: bool = False,
    answer_pattern: str | None = None,
    timeout_s: float = 5.0,
    max_answer_chars: int = 1000,
    num_workers: int | None = None,
    worker_memory_mb: int = 4096,
) -> list[float | None]:
    """Score each completion against its gold ``answer``.

    Options (``RewardSpec.kwargs``):
        strict: only a ``\\boxed{}`` answer counts.
        answer_pattern: a regex; the answer is its last match (group 1 if it has groups).
        timeout_s: hard deadline per symbolic check; past it the worker is killed and the sample scores 0.0.
        max_answer_chars: longer extracted answers score 0.0 without being parsed (so do unbalanced braces).
        num_workers: checker processes (default: min(4, CPUs)); started on the first symbolic check.
        worker_memory_mb: address-space cap of each checker process.
    """
    check_options(strict=strict, answer_pattern=answer_pattern, timeout_s=timeout_s)
    scores: list[float | None] = [None] * len(completions)
    slow: list[tuple[int, str, str]] = []
    for i, (completion, gold_value) in enumerate(zip(completions, answer)):
        scores[i], pending = _first_pass(completion, gold_value, answer_pattern, strict, max_answer_chars)
        if pending is not None:
            slow.append((i, *pending))
    if slow:
        _counts.add("symbolic_checks", len(slow))
        outcomes = _check_symbolically([{"answer": a, "gold": g} for _, a, g in slow], timeout_s,
                                       num_workers or min(4, os.cpu_count() or 1), worker_memory_mb)
        for (i, _, _), outcome in zip(slow, outcomes):
            scores[i] = _score_of(outcome)
    return scores


def _check_symbolically(requests: list[dict], timeout_s: float, size: int, memory_mb: int) -> list[Outcome | None]:
    """Each request's outcome; a crash retried once on a fresh worker; None for every request when the checker
    processes cannot start."""
    try:
        pool = _checker_pool(size, memory_mb)
        outcomes: list[Outcome | None] = list(pool.map(requests, timeout_s))
        crashed = [k for k, o in enumerate(outcomes) if o.status == CRASHED]
        if crashed:  # once may be the machine (the OOM killer, a signal); twice on the same answer is the answer
            for k, outcome in zip(crashed, pool.map([requests[k] for k in crashed], timeout_s)):
                outcomes[k] = outcome
        return outcomes
    except (RuntimeError, OSError) as e:
        logger.error("math_accuracy: the checker processes cannot run (%s); %d samples are None, counted as "
                     "reward/math_accuracy_infra_errors", e, len(requests))
        return [None] * len(requests)


def _score_of(outcome: Outcome | None) -> float | None:
    """The sample's score for the checker's outcome, counted by what became of it."""
    if outcome is None or (outcome.status == FAILED and str(outcome.value).split(":")[0] not in ANSWER_ERRORS):
        _counts.add("infra_errors")
        return None
    if outcome.status == OK and outcome.value is None:
        _counts.add("gold_unparsed")
        return None
    if outcome.status == OK:
        return 1.0 if outcome.value else 0.0
    _counts.add({TIMEOUT: "timeouts", CRASHED: "crashes"}.get(outcome.status, "check_errors"))
    return 0.0


def check_options(*, strict: bool = False, answer_pattern: str | None = None, timeout_s: float = 5.0, **_: Any) -> None:
    """Refuse contradictory or invalid options before training starts."""
    if strict and answer_pattern is not None:
        raise RewardConfigError("math_accuracy: choose strict (boxed answers) or answer_pattern, not both")
    if answer_pattern is not None:
        try:
            re.compile(answer_pattern)
        except re.error as e:
            raise RewardConfigError(f"math_accuracy: answer_pattern {answer_pattern!r} is not a regex: {e}") from None
    if not timeout_s > 0:
        raise RewardConfigError(f"math_accuracy: timeout_s must be positive, got {timeout_s}")


def _braces_balance(text: str) -> bool:
    depth = 0
    for c in text.replace("\\{", "").replace("\\}", ""):
        depth += (c == "{") - (c == "}")
        if depth < 0:
            return False
    return depth == 0


# What rewards.catalog registers as `math_accuracy`.
MATH_ACCURACY = Reward(math_accuracy, check_options=check_options, metrics=_counts.pop)


def _checker_pool(size: int, memory_mb: int) -> DeadlinePool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool.size != size or _pool.args != [str(memory_mb)]:
            if _pool is not None:
                _pool.close()
            _pool = DeadlinePool("rewards.math_check", size, args=[str(memory_mb)])
        return _pool


def shutdown() -> None:
    """Stop the checker processes (they also stop when the trainer exits)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None
