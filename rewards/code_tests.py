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
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rewards.registry import Reward, RewardConfigError
from rewards.sandbox import Limits, resolve_sandbox, run_tests

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_counts: Counter[str] = Counter()
_counts_lock = threading.Lock()


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

    def run(job: tuple[int, str, str, str | None, str]) -> tuple[int, bool, str]:
        i, program, test_code, entry, prompt = job
        result = run_tests(program, test_code, entry, kind=kind, limits=limits, site_packages=site_packages,
                           prompt=prompt if entry else None)
        return i, result.passed, result.detail

    workers = max(1, min(num_workers or 2 * (os.cpu_count() or 1), len(jobs)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="code_tests") as pool:
        for i, passed, detail in pool.map(run, jobs):
            scores[i] = 1.0 if passed else 0.0
            if detail == "timeout":
                with _counts_lock:
                    _counts["timeouts"] += 1
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


def _pop_metrics() -> dict[str, float]:
    with _counts_lock:
        out = {key: float(n) for key, n in _counts.items()}
        _counts.clear()
    return out


CODE_TESTS = Reward(code_tests, check_options=check_options, metrics=_pop_metrics)  # rewards.catalog: code_tests
