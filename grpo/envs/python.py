"""A `python` tool: the model's code runs in the project's sandbox and the tool returns what it printed.

`env=python` offers it over the task's prompts (any task: arithmetic, GSM8K, ...); the episode ends at the
first turn without a tool call and the task's reward functions score that turn, as with the calculator.
To give your own environment the tool, put `python_tool(...)` in its tools.

By default every call is one fresh sandbox (`rewards.sandbox.run_code`: bubblewrap or unshare namespaces, no
network, read-only system files, rlimits, no new processes, a wall-clock deadline), so calls share no state: a
program that needs a value from an earlier call recomputes it. With `persistent=True` the episode's calls run
one after another in one sandboxed interpreter (`rewards.sandbox.PythonSession`), as in a notebook: variables,
functions and imports stay for the rest of the episode, and calls cost less than fresh sandboxes (`python -m
scripts.bench.python_tool`). Between calls the interpreter is stopped, so nothing a program leaves running (a
thread, a timer) runs outside a call's deadline. A call past its deadline, or one that brings the interpreter
down (a memory limit, `os._exit`), costs the episode that state, and the reply says so. The interpreter starts
at the episode's first call and is stopped when the episode ends (`close`).

Persistent interpreters share one memory budget in the trainer's process (`SESSIONS_MEMORY`): each holds its
`memory_mb` from its start to its episode's end, and one that would take the total past the budget is not
started; its call's reply says so. The trainer sets the budget from `env.sessions_memory_mb` (default: half the
memory available at start, `/proc/meminfo`'s MemAvailable) and refuses before training a run whose step's
episodes could not all hold theirs at once (`grpo.training.run.check_sessions_memory`).

What the model reads back is the program's stdout and stderr (the first `max_output` characters), then its
exception's last frame if it raised, or the deadline it ran past. A program's own error is its result, not a
failed tool call; calls that are not well-formed are counted as `ToolEnvironment` counts them.
"""

from __future__ import annotations

from collections.abc import Callable

from grpo.envs.tools import ToolEnvironment
from rewards.sandbox import CodeRun, Limits, MemoryBudget, PythonSession, resolve_sandbox, run_code

SESSIONS_MEMORY = MemoryBudget()  # what this process's persistent interpreters may hold together; set at start
TOOL_MEMORY_MB = 512  # an interpreter's address space, by default


def python_tool(sandbox: str = "auto", timeout_s: float = 5.0, memory_mb: int = TOOL_MEMORY_MB, max_output: int = 2048,
                persistent: bool = False, cpu_budget_s: float = 60.0,
                site_packages: bool = False) -> Callable[[str], str]:
    """The `python` tool function, running in `sandbox` (auto, bwrap, unshare or none: see rewards.sandbox).

    `persistent`: the calls share one interpreter (build one tool per episode; its `close()` stops the
    interpreter), whose CPU time all together is capped at `cpu_budget_s`; otherwise each call is a fresh one.
    `site_packages`: programs may import the packages installed beside the trainer (numpy, sympy, ...), read-only;
    an interpreter then starts several times slower. The tool's description, which the model reads, says both."""
    kind = resolve_sandbox(sandbox)
    limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb)
    if persistent:
        session = PythonSession(kind=kind, limits=limits, max_output=max_output, site_packages=site_packages,
                                cpu_budget_s=cpu_budget_s, memory_budget=SESSIONS_MEMORY)
        run = session.run
    else:

        def run(code: str) -> CodeRun:
            return run_code(code, kind=kind, limits=limits, max_output=max_output, site_packages=site_packages)

    def python(code: str) -> str:
        return reply(run(code))

    python.__doc__ = description(persistent, site_packages)
    if persistent:
        python.close, python.session = session.close, session
    return python


def description(persistent: bool, site_packages: bool) -> str:
    """The tool's docstring: its JSON schema's description and its argument's, which the model reads."""
    what = ("Run Python code in an interpreter that keeps its variables between calls, and return what it prints."
            if persistent else "Run a Python program and return what it prints.")
    code = "Python code" if persistent else "a complete program"
    library = "the standard library and the installed packages" if site_packages else "the standard library"
    return f"{what}\n\nArgs:\n    code: {code} with {library}; print the values you want to see"


def reply(run: CodeRun) -> str:
    """The text the model reads: the output, then the error on a line of its own."""
    text = run.output + (("\n" if run.output and not run.output.endswith("\n") else "") + run.error
                         if run.error else "")
    return text or "(the program printed nothing)"


def python_environment(system: str | None = None, **tool_options) -> ToolEnvironment:
    """One episode's environment: the `python` tool (options: `python_tool`'s), the row's prompt as the user's
    message."""
    return ToolEnvironment([python_tool(**tool_options)], system=system)


def available_memory_mb(meminfo: str = "/proc/meminfo") -> int:
    """The machine's MemAvailable, in MB: what it can still hand out without swapping."""
    with open(meminfo) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "MemAvailable":
                return int(value.split()[0]) // 1024  # kB
    raise OSError(f"{meminfo} has no MemAvailable line")
