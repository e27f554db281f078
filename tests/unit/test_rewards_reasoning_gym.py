"""The `reasoning_gym` reward runs reasoning-gym's scorers in a sandbox: hostile answers (shell commands,
huge powers, deep nesting, long strings, exits) score as wrong answers, leave the host untouched and cost at
most their deadline; right answers still score 1.0; an interpreter that cannot start is an infrastructure
failure (None, counted), never a 0.0."""

from __future__ import annotations

import time

import pytest
import reasoning_gym

from rewards import REWARDS, RewardConfigError, RewardScorer, RewardSpec
from rewards.reasoning_tasks import STARTUP_TIMEOUT_S, dump_entry
from rewards.sandbox import SandboxUnavailable, resolve_sandbox
from tests.conftest import requires

try:
    resolve_sandbox("auto")
    HAS_SANDBOX = True
except SandboxUnavailable:
    HAS_SANDBOX = False
needs_sandbox = requires(HAS_SANDBOX, "no sandbox here (bubblewrap, or unprivileged user namespaces)")

REWARD = REWARDS["reasoning_gym"]
TIMEOUT_S = 1.0
# The datasets whose score_answer runs the answer as code: eval() ...
EVAL_FAMILY = ["spiral_matrix", "binary_matrix", "string_insertion", "n_queens"]
# ... and sympy's parse_expr (itself an eval of the transformed text).
PARSE_EXPR_FAMILY = ["countdown", "puzzle24", "polynomial_multiplication", "simple_integration",
                     "intermediate_integration"]


def row(name: str) -> tuple[dict, str]:
    entry = reasoning_gym.create_dataset(name, size=1, seed=0)[0]
    record = {"question": entry["question"], "answer": entry["answer"], "metadata": entry["metadata"]}
    return {"rg_dataset": name, "rg_entry": dump_entry(record), "rg_options": "{}"}, entry["answer"]


def score(name: str, answers: list[str], **options) -> list[float | None]:
    r, _ = row(name)
    n = len(answers)
    completions = [f"<answer>{a}</answer>" for a in answers]
    return REWARD.fn([""] * n, completions, **{k: [v] * n for k, v in r.items()}, **options)


def hostile_answers(marker: str) -> list[str]:
    """Answers a model could write to run code, stall or exhaust the scorer; each would create `marker` (a
    path on the host) if it ran in the trainer's process."""
    touch = f"touch {marker}"
    return [
        f"__import__('os').system('{touch}')",
        f"__import__('subprocess').run(['sh', '-c', '{touch}'])",
        f"open('{marker}', 'w').write('x')",
        f"exec(\"import os; os.system('{touch}')\")",
        "9**9**9",  # stalls for good: exponentiation with a 370-million-digit result
        "10**10**10",
        "(" * 3000 + "1" + ")" * 3000,  # deep nesting: the parser's recursion limit
        "[" * 3000 + "]" * 3000,
        "1+" * 4000 + "1",  # long, under max_answer_chars
        "x" * 20_000,  # past max_answer_chars: 0.0 unread
        "[0 for _ in iter(int, 1)]",  # an endless loop
        "bytearray(10**11)",  # past the memory limit
        "__import__('os')._exit(0)",  # kills the interpreter
        "print('1.0')",  # writes into the reply
    ]


@needs_sandbox
@pytest.mark.slow
@pytest.mark.parametrize("name", EVAL_FAMILY + PARSE_EXPR_FAMILY)
def test_hostile_answers_score_as_wrong_answers_leave_the_host_alone_and_cost_at_most_their_deadline(
        name, tmp_path):
    marker = tmp_path / "pwned"
    hostile = hostile_answers(str(marker))
    start = time.monotonic()
    # The first answer is a plain wrong one: its score (0.0; countdown's partial credit is 0.05 for an
    # expression with the wrong numbers) is the most a hostile answer may get.
    scores = score(name, ["0", *hostile], timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - start
    wrong, rest = scores[0], scores[1:]
    assert wrong is not None and wrong <= 0.05
    assert all(s is not None and s <= wrong for s in rest), list(zip(hostile, rest))
    assert not marker.exists()
    metrics = REWARD.metrics()
    assert metrics["infra_errors"] == 0
    assert metrics.get("timeouts", 0) >= 1 and metrics.get("too_long", 0) == 1
    # Each answer costs at most its deadline, plus a restart of the interpreter where it ended it (a kill is
    # retried once, so twice); 15 answers here.
    assert elapsed < 15 * 2 * (TIMEOUT_S + STARTUP_TIMEOUT_S)


@needs_sandbox
@pytest.mark.slow
@pytest.mark.parametrize("name", EVAL_FAMILY + PARSE_EXPR_FAMILY)
def test_the_right_answer_still_scores_one_in_the_sandbox(name):
    _, gold = row(name)
    assert score(name, [gold]) == [1.0]


@needs_sandbox
@pytest.mark.slow
def test_an_interpreter_that_cannot_start_is_an_infrastructure_failure_not_a_wrong_answer():
    REWARD.metrics()
    _, gold = row("countdown")
    # 16 MiB of address space: the sandboxed interpreter cannot import reasoning-gym, whatever the answers.
    assert score("countdown", [gold, "0"], memory_mb=16) == [None, None]
    metrics = REWARD.metrics()
    assert metrics["infra_errors"] == 2 and metrics["sandbox_start_failures"] == 2  # tried twice


@needs_sandbox
@pytest.mark.slow
def test_the_scorer_reports_infra_errors_per_reward():
    r, gold = row("countdown")
    scorer = RewardScorer([RewardSpec("reasoning_gym", kwargs={"memory_mb": 16})])
    batch = scorer([""], [f"<answer>{gold}</answer>"], {k: [v] for k, v in r.items()})
    assert batch.total == [None]
    assert batch.metrics()["reward/reasoning_gym_infra_errors"] == 1.0


def test_options_are_checked_before_training_with_the_field_named():
    for options, field in (({"timeout_s": 0}, "timeout_s"), ({"memory_mb": -1}, "memory_mb"),
                           ({"sandbox": "docker"}, "sandbox"), ({"answer_tag": "no tag"}, "answer_tag")):
        with pytest.raises(RewardConfigError, match=field):
            REWARD.check_options(**options)


@needs_sandbox
@pytest.mark.slow
def test_a_scorer_that_raises_masks_its_sample_only():
    REWARD.metrics()
    good, gold = row("countdown")
    broken = {**good, "rg_dataset": "no_such_dataset"}  # reasoning_gym.create_dataset raises on it, in the sandbox
    columns = {k: [good[k], broken[k], good[k]] for k in good}
    scores = REWARD.fn([""] * 3, [f"<answer>{gold}</answer>"] * 3, **columns)
    # the raising scorer's sample is None (not 0.0); its neighbours are scored as usual (the gold: 1.0)
    assert scores == [1.0, None, 1.0]
    assert REWARD.metrics()["infra_errors"] == 1


@needs_sandbox
@pytest.mark.slow
def test_an_answer_that_changes_the_scorer_does_not_reach_the_answers_after_it():
    entry = reasoning_gym.create_dataset("countdown", size=1, seed=0)[0]
    wrong_sum = " + ".join(map(str, entry["metadata"]["numbers"]))  # 66 + 34 + 98 + 54 + 6 = 258, target 164
    # every value "close" to the target from now on (the lambda inside eval: parse_expr's rewriting breaks it)
    tamper = "setattr(__import__('numpy'), 'isclose', eval('lambda *a, **k: True'))"
    scores = score("countdown", [wrong_sum, tamper, wrong_sum])
    # The wrong sum scores the dataset's 0.05 (its numbers, a wrong value) before the tampering answer and
    # after it: in an interpreter that kept numpy's isclose patched, it would score 1.0.
    assert scores[0] == scores[2] == 0.05
    assert REWARD.metrics()["restarts_after_code"] == 1
