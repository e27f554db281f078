"""``code_tests``: 1.0 when the completion's program passes all its unit tests in a sandbox, else 0.0.

Column ``tests`` holds, per sample, either plain ``assert`` lines (a string, or a list of strings as in MBPP)
or a HumanEval-style ``def check(candidate): ...`` with the column ``entry_point`` naming the function to pass
to it. None or empty tests: None (not applicable).

The program is the last fenced code block of the completion (```` ```python ... ``` ````), or the whole
completion when it has none. With an ``entry_point`` that the program does not define, the prompt is put in
front of it (HumanEval completions continue the prompt's function signature).

Completions run in parallel, each in its own sandbox (``rewards.sandbox``), ``num_workers`` at a time. In the
sandbox, the program runs in one process and the tests in another that calls the program's functions with plain
data and compares what comes back; the verdict is that process's (``rewards/code_runner.py`` says what this
costs). With an ``entry_point``, the helpers the prompt defines (HumanEval's ``poly``) are the prompt's own.

A sample the harness could not judge is None, counted in ``reward/code_tests_infra_errors``, never 0.0: a sandbox
that does not start (its launcher missing or failing, or not up by the deadline), a judge that dies or reports
out of protocol, tests that do not compile. A program that runs past its deadline, crashes or exits is a wrong
answer (0.0; timeouts counted in ``reward/code_tests_timeouts``); it cannot signal the judge to pass its own
failure off as the harness's (``rewards/code_runner.py``).
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rewards.registry import Reward, RewardConfigError, RewardCounts
from rewards.sandbox import Limits, RunResult, resolve_sandbox, run_tests

logger = logging.getLogger(__name__)
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_counts = RewardCounts("infra_errors")


def code_tests(
    prompts: list[str],
    completions: list[str],
    *,
    tests: list[Any],
    entry_point: list[str | None] | None = None,
    sandbox: str = "auto",
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    num_workers: int | None = None,
    site_packages: bool = False,
) -> list[float | None]:
    """Run each completion against its tests.

    Options:
        sandbox: ``auto`` (bubblewrap, else unshare), ``bwrap``, ``unshare``, or ``none`` (no isolation; warns).
        timeout_s: wall-clock limit per completion (the CPU-time limit is one second more).
        memory_mb: address-space limit per completion.
        num_workers: completions run at once (default: twice the number of CPUs; much of a run is waiting on
            process and namespace setup).
        site_packages: let programs import installed packages; by default they get the standard library only.
    """
    kind = resolve_sandbox(sandbox)
    limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb)
    entry_points = entry_point if entry_point is not None else [None] * len(completions)
    jobs: list[tuple[int, str, str, str | None, str]] = []
    scores: list[float | None] = [None] * len(completions)
    for i, (prompt, completion, test, entry) in enumerate(zip(prompts, completions, tests, entry_points)):
        test_code = "\n".join(test) if isinstance(test, (list, tuple)) else (test or "")
        if not test_code.strip():
            continue
        jobs.append((i, program_from(completion, prompt, entry), test_code, entry or None, prompt))
    if not jobs:
        return scores

    def run(job: tuple[int, str, str, str | None, str]) -> tuple[int, RunResult]:
        i, program, test_code, entry, prompt = job
        return i, run_tests(program, test_code, entry, kind=kind, limits=limits, site_packages=site_packages,
                            prompt=prompt if entry else None)

    workers = max(1, min(num_workers or 2 * (os.cpu_count() or 1), len(jobs)))
    unjudged: list[str] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="code_tests") as pool:
        for i, result in pool.map(run, jobs):
            scores[i] = None if result.infra else 1.0 if result.passed else 0.0
            key = "infra_errors" if result.infra else "timeouts" if result.detail == "timeout" else None
            if key is not None:
                _counts.add(key)
            if result.infra:
                unjudged.append(result.detail)
    if unjudged:
        logger.warning("code_tests: %d of %d samples not judged (first: %s); they are None, counted as "
                       "reward/code_tests_infra_errors", len(unjudged), len(jobs), unjudged[0])
    return scores


def check_options(*, sandbox: str = "auto", **_: Any) -> None:
    """Fail before training when the chosen sandbox cannot run here."""
    if sandbox not in ("auto", "bwrap", "unshare", "none"):
        raise RewardConfigError(f"code_tests: sandbox must be auto, bwrap, unshare or none, got {sandbox!r}")
    resolve_sandbox(sandbox)


def program_from(completion: str, prompt: str = "", entry_point: str | None = None) -> str:
    """The code to run: the last fenced block (preferring python ones), else the completion itself."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(completion)]
    python_blocks = [body for lang, body in blocks if lang in ("python", "py", "python3", "")]
    code = python_blocks[-1] if python_blocks else completion
    if entry_point and not re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        code = prompt + code
    return code


CODE_TESTS = Reward(code_tests, check_options=check_options, metrics=_counts.pop)  # rewards.catalog: code_tests
