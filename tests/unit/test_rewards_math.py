"""math_accuracy: extraction, the in-process fast path, symbolic equivalence, and inputs meant to break it."""

from __future__ import annotations

import os
import time

import pytest

from rewards import RewardScorer, RewardSpec
from rewards.answers import boxed_contents, extract_answer, normalize, plain_number, quick_verdict
from rewards.math_accuracy import MATH_ACCURACY, math_accuracy


def score(completions, golds, **options):
    return math_accuracy([""] * len(completions), completions, answer=golds, **options)


# --- extraction -----------------------------------------------------------------------------------------


def test_boxed_nested_and_last():
    text = r"first \boxed{1} then \boxed{\frac{1}{2}} and \fbox{ {a}+\{b\} }"
    assert boxed_contents(text) == ["1", r"\frac{1}{2}", r" {a}+\{b\} "]
    assert boxed_contents(r"\boxed{1") == []
    assert boxed_contents(r"\boxed{}") == [""]
    assert extract_answer(r"so \boxed{12}. Again: \boxed{ 12 }").answer == " 12 "
    assert not extract_answer(r"so \boxed{12}. Again: \boxed{ 12 }").hedged


def test_rule_order():
    assert extract_answer("reasoning\n#### 42\n").answer == "42"
    assert extract_answer("#### 41\n\\boxed{42}").answer == "42"  # a box wins over ####
    assert extract_answer("57\n").answer == "57"
    assert extract_answer("   \n").answer is None
    assert extract_answer("the answer is 57", strict=True).answer is None
    assert extract_answer(r"so \boxed{57}", strict=True).answer == "57"
    assert extract_answer("Answer: 12; Answer: 13", pattern=r"Answer:\s*(\d+)").answer == "13"
    assert extract_answer("nothing", pattern=r"Answer:\s*(\d+)").answer is None


def test_hedging_is_detected():
    assert extract_answer(r"\boxed{3} or \boxed{4}").hedged
    assert extract_answer("#### 3\n#### 4").hedged


def test_normalize_and_numbers():
    assert normalize(r"\$1,000.") == "1000"
    assert normalize(r"50\%") == "50"
    assert normalize(r"10\text{ cm}") == "10"
    assert normalize(r"90^\circ") == "90"
    assert normalize("x = 12") == "12"
    assert plain_number("3.50") == plain_number("3.5")
    assert plain_number("1e3") == 1000
    assert plain_number("1/2") is None and plain_number("") is None and plain_number("nan") is None


@pytest.mark.parametrize(
    "answer, gold, expected",
    [
        ("57", "57", 1.0),
        ("-7", "-7", 1.0),
        ("3.50", "3.5", 1.0),
        ("58", "57", 0.0),
        ("57abc", "57", 0.0),
        ("5 7", "57", 0.0),
        ("the answer is 57", "57", 0.0),
        (r"\frac{114}{2}", "57", None),  # needs sympy
        ("x+1", "x + 1", None),
    ],
)
def test_quick_verdict(answer, gold, expected):
    assert quick_verdict(answer, gold) == expected


# --- the reward on the arithmetic task's format (fast path only) ------------------------------------------


def test_arithmetic_completions():
    completions = ["57", "57 \n", "57abc", "5 7", "", "58", " 57", "-3", "057"]
    golds = ["57", "57", "57", "57", "57", "57", "57", "-3", "57"]
    assert score(completions, golds) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def test_reversed_digit_answers_keep_their_zeros():
    # The arithmetic task writes numbers least significant digit first: 70 is "07", 100 is "001".
    completions = ["07", "7", "001", "1", "01", "0.5"]
    golds = ["07", "07", "001", "001", "1", "0.50"]
    assert score(completions, golds) == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def test_the_arithmetic_task_rows():
    from grpo.builtin.arithmetic import Arithmetic

    rows = Arithmetic(digits=2, reverse=True).train_rows()[:200]
    golds = [r["answer"] for r in rows]
    assert score(golds, golds) == [1.0] * len(rows)
    # every answer one off, written the task's way, is wrong
    wrong = [str(int(g[::-1]) + 1)[::-1] for g in golds]
    assert score(wrong, golds) == [0.0] * len(rows)


def test_fast_path_never_starts_workers(monkeypatch):
    import rewards.math_accuracy as module

    def no_pool(*args, **kwargs):
        raise AssertionError("the fast path must not start checker processes")

    monkeypatch.setattr(module, "_checker_pool", no_pool)
    assert score(["42", "41", "x"], [42, "42", "42"]) == [1.0, 0.0, 0.0]


def test_missing_gold_is_skipped_and_counted():
    MATH_ACCURACY.metrics()
    assert score(["1", "1"], [None, "  "]) == [None, None]
    assert MATH_ACCURACY.metrics()["gold_unparsed"] == 2.0


def test_strict_and_pattern_options():
    assert score(["42", r"\boxed{42}"], ["42", "42"], strict=True) == [0.0, 1.0]
    assert score(["Final: 42", "42"], ["42", "42"], answer_pattern=r"Final:\s*(\S+)") == [1.0, 0.0]
    with pytest.raises(ValueError, match="not both"):
        score(["42"], ["42"], strict=True, answer_pattern="x")


def test_hedged_answers_score_zero():
    completions = [r"\boxed{3} or \boxed{4}", r"\boxed{\pm 2}", r"\boxed{2 \text{ or } -2}", r"\boxed{\pm 2}"]
    golds = ["4", "2", "2", r"\pm 2"]
    assert score(completions, golds)[:3] == [0.0, 0.0, 0.0]


# --- symbolic equivalence (worker processes) ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_symbolic_equivalence():
    cases = [
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac12", 1.0),
        (r"\boxed{\dfrac{3}{4}}", "3/4", 1.0),
        (r"\boxed{50\%}", "50", 1.0),
        (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
        (r"\boxed{[0, 1)}", "[0,1)", 1.0),
        (r"\boxed{(0, 1]}", "[0,1)", 0.0),
        (r"\boxed{\{2, 1\}}", r"\{1,2\}", 1.0),
        (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", 1.0),
        (r"\boxed{10\text{ cm}}", "10", 1.0),
        ("#### 1,234", "1234", 1.0),
        (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
        (r"\boxed{\pi}", "3.14", 0.0),
    ]
    completions, golds, expected = zip(*cases)
    assert score(list(completions), list(golds)) == list(expected)


@pytest.mark.timeout(60)
def test_unparseable_gold_is_never_rewarded():
    MATH_ACCURACY.metrics()
    assert score([r"\boxed{???}", r"\boxed{1}"], ["???", r"\frac{"]) == [None, None]
    assert MATH_ACCURACY.metrics()["gold_unparsed"] == 2.0


def test_through_the_scorer():
    scorer = RewardScorer([RewardSpec("math_accuracy"), RewardSpec("format", weight=0.1)])
    batch = scorer(["p"] * 3, [r"\boxed{7}", "7", r"\boxed{8}"], {"answer": ["7", "7", "7"]})
    assert batch.per_reward["math_accuracy"] == [1.0, 1.0, 0.0]
    assert batch.total == pytest.approx([1.1, 1.0, 0.1], abs=1e-12, rel=0)


# --- adversarial: each bounded in time, nothing left behind --------------------------------------------


ADVERSARIAL = {
    "tower": r"\boxed{9^{9^{9}}}",
    "taller tower": r"\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}",
    "factorial": r"\boxed{(10^{10})!}",
    "garbage": "\\boxed{" + "}{(^_".join(str(i) for i in range(10_000)) + "}",
    "10k tokens of text": "word " * 10_000,
    "unbalanced": r"\boxed{\frac{1}{2}" + "{" * 500,
    "closing braces": "}" * 1000 + r"\boxed{2}}}}",
    "empty box": r"\boxed{}",
    "hedge": r"\boxed{1} or \boxed{2}",
    "injection": r"\boxed{__import__('os').system('touch /tmp/grpo_pwned')}",
    "injection 2": "#### eval(\"__import__('os').system('touch /tmp/grpo_pwned')\")",
    "lambda": r"\boxed{(lambda: __import__('os'))().system('touch /tmp/grpo_pwned')}",
    "deep nesting": r"\boxed{" + r"\frac{1}{" * 300 + "2" + "}" * 301,
}


@pytest.mark.timeout(60)
def test_tiny_exact_numbers_a_factor_of_two_apart_are_not_equal():
    # math-verify's numeric tolerance called these equal; two exact rationals are compared exactly
    cases = [
        (r"\boxed{\frac{1}{10000000}}", "0.0000002", 0.0),
        (r"\boxed{0.0000001}", r"\frac{2}{10000000}", 0.0),
        (r"\boxed{\frac{1}{3000000}}", r"\frac{1}{6000000}", 0.0),
        (r"\boxed{\frac{2}{10000000}}", "0.0000002", 1.0),  # the same number, written two ways
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    ]
    completions, golds, expected = zip(*cases)
    assert score(list(completions), list(golds)) == list(expected)


@pytest.mark.timeout(60)
def test_adversarial_math_inputs_score_zero_in_bounded_time():
    if os.path.exists("/tmp/grpo_pwned"):
        os.remove("/tmp/grpo_pwned")
    completions = list(ADVERSARIAL.values())
    golds = ["1"] * len(completions)
    MATH_ACCURACY.metrics()
    start = time.perf_counter()
    scores = score(completions, golds, timeout_s=2.0)
    elapsed = time.perf_counter() - start
    assert scores == [0.0] * len(completions), dict(zip(ADVERSARIAL, scores))
    # 13 checks on at most 4 workers, 2 s deadline each, plus worker restarts: well under a minute.
    assert elapsed < 30
    assert not os.path.exists("/tmp/grpo_pwned")


@pytest.mark.timeout(60)
def test_timed_out_worker_is_killed_and_replaced():
    import rewards.math_accuracy as module

    score([r"\boxed{x^2}"], ["x^2"])  # make sure the pool exists
    pool = module._pool
    before = set(pool.pids())
    MATH_ACCURACY.metrics()
    # 9^{9^{9}} alone is an exact number, settled at 30 digits in no time; with a variable it goes to sympy's
    # symbolic comparison, which expands the tower and never returns.
    assert score([r"\boxed{9^{9^{9}} + x}", r"\boxed{\frac{2}{4}}"], ["1", "0.5"], timeout_s=1.0) == [0.0, 1.0]
    assert MATH_ACCURACY.metrics()["timeouts"] == 1.0
    after = set(pool.pids())
    gone = before - after
    assert gone, "the worker past its deadline was not replaced"
    for pid in gone:  # the killed worker is reaped, not left as a zombie or orphan
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid) is False
    # the pool still works afterwards
    assert score([r"\boxed{\frac{3}{6}}"], ["0.5"]) == [1.0]


def test_trainer_memory_stays_flat():
    import resource

    completions = [ADVERSARIAL[k] for k in ("tower", "garbage", "10k tokens of text", "injection", "lambda")]
    score(completions, ["1"] * 5, timeout_s=0.5)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        score(completions, ["1"] * 5, timeout_s=0.5)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 50, f"the trainer process grew by {grown_mb:.0f} MB"


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(60)
def test_shutdown_leaves_no_processes():
    import rewards.math_accuracy as module

    score([r"\boxed{x^3}"], ["x^3"])
    pids = module._pool.pids()
    module.shutdown()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"checker {pid} survived shutdown"


# --- claims, sets and tiny exact powers (math_check's own rules over math-verify) ---------------------------


@pytest.mark.timeout(60)
def test_a_false_equation_a_set_for_a_pair_and_powers_a_factor_of_two_apart_are_wrong():
    cases = [
        # "7 = 4" claims 7 equals 4: false, though its right side is the gold (math-verify compared 4 with 4)
        (r"\boxed{7 = 4}", "4", 0.0),
        (r"\boxed{4}", "4", 1.0),
        (r"\boxed{x = 4}", "4", 1.0),  # a variable named on the left: the value is the right side
        (r"\boxed{2 + 2 = 4}", "4", 1.0),  # a true claim about numbers
        # (1,2) is ordered, {1,2} is not (math-verify read "(1,2)" as the interval and called them equal)
        (r"\boxed{(1,2)}", r"\{1,2\}", 0.0),
        (r"\boxed{\{1,2\}}", "(1,2)", 0.0),
        (r"\boxed{(1,2)}", "(1,2)", 1.0),
        # 2^-100 = 7.9e-31 and 2^-99 = 1.6e-30 differ by 7.9e-31, under math-verify's absolute tolerance;
        # relative to their size the difference is 1/2, far above 1e-12
        (r"\boxed{2^{-100}}", "2^{-99}", 0.0),
        (r"\boxed{10^{-20}}", r"2 \cdot 10^{-20}", 0.0),
        (r"\boxed{e^{-50}}", "2e^{-50}", 0.0),
        (r"\boxed{2^{10}}", "1024", 1.0),  # the same number: 2^10 = 1024 exactly
        (r"\boxed{2^{-100}}", r"\frac{1}{2^{100}}", 1.0),
        (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", 1.0),  # exact, unequal only in form: difference 0 at 30 digits
    ]
    completions, golds, expected = zip(*cases)
    assert score(list(completions), list(golds)) == list(expected)


@pytest.mark.timeout(120)
def test_a_reward_with_timeout_s_keeps_its_workers_across_calls():
    import rewards.math_accuracy as module

    module.shutdown()
    scorer = RewardScorer([RewardSpec("math_accuracy", timeout_s=60, kwargs={"num_workers": 1})])
    pids = []
    for _ in range(3):  # each call runs on a fresh thread of the scorer's, which then exits
        batch = scorer(["", ""], [r"\boxed{\frac{1}{2}}", r"\boxed{x}"], {"answer": ["0.5", "1/2"]})
        assert batch.total == [1.0, 0.0]
        pids.append(module._pool.pids())
    # One worker started, on the first call, and the same one answered all three: the workers died with the
    # thread that started them before, and every call started (and warmed) a new one.
    assert pids[0] == pids[1] == pids[2] and module._pool.starts == 1


@pytest.mark.timeout(60)
def test_a_checker_that_cannot_start_is_an_infrastructure_failure(monkeypatch):
    import sys

    import rewards.math_accuracy as module

    module.shutdown()
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")  # the workers' interpreter is gone
    MATH_ACCURACY.metrics()
    # "7" against "7" is settled in-process (1.0); the two symbolic checks cannot run: None, not 0.0
    assert score([r"\boxed{7}", r"\boxed{\frac{1}{2}}", r"\boxed{x}"], ["7", "0.5", "x"]) == [1.0, None, None]
    assert MATH_ACCURACY.metrics()["infra_errors"] == 2.0
    monkeypatch.undo()
    module.shutdown()
    assert score([r"\boxed{\frac{1}{2}}"], ["0.5"]) == [1.0]


@pytest.mark.timeout(120)
def test_a_worker_killed_from_outside_mid_check_is_retried_not_scored_zero():
    import signal
    import threading

    import rewards.math_accuracy as module

    module.shutdown()
    assert score([r"\boxed{\frac{1}{2}}"], ["0.5"], num_workers=1) == [1.0]  # a warm worker
    pool = module._pool
    MATH_ACCURACY.metrics()
    out = []
    # A check that never returns (sympy expands the tower), so the worker is surely busy when it is killed.
    job = threading.Thread(target=lambda: out.append(
        score([r"\boxed{9^{9^{9}} + x}"], ["1"], num_workers=1, timeout_s=3.0)))
    job.start()
    while not any(w.job is not None for w in pool._workers):
        time.sleep(0.01)
    os.kill(pool.pids()[0], signal.SIGKILL)  # the machine's doing (an OOM killer), not the answer's
    job.join()
    # The death is retried on a fresh worker, where the check runs to its deadline: a timeout, not a crash.
    assert out == [[0.0]]
    metrics = MATH_ACCURACY.metrics()
    assert metrics.get("timeouts") == 1.0 and "crashes" not in metrics
