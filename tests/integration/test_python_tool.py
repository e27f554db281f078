"""The `python` tool (grpo/envs/python.py): programs run in the sandbox and the model reads what they printed,
their errors are results, every call is a fresh sandbox, and `env=python` runs through the real loop."""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

import pytest

from grpo.envs import Done, Observation
from grpo.envs.python import python_environment, python_tool
from grpo.envs.tools import ToolEnvironment, tool_schema
from grpo.errors import ConfigError
from grpo.training.run import build_environment
from rewards.sandbox import CodeRun, Limits, PythonSession, descendants, run_code
from tests.conftest import compose
from tests.integration.test_episodes import train
from tests.unit.test_rewards_code import SANDBOXES, needs_sandbox

pytestmark = needs_sandbox
REPO = str(Path(__file__).resolve().parents[1])


def call(code: str) -> str:
    return f"<tool_call>{json.dumps({'name': 'python', 'arguments': {'code': code}})}</tool_call>"


@pytest.mark.parametrize("kind", SANDBOXES)
def test_a_program_prints_and_raises_in_the_sandbox(kind):
    assert run_code("print(123 * 45)", kind=kind).output == "5535\n"
    run = run_code("print('before')\n1 / 0", kind=kind)
    assert run.output == "before\n"
    assert run.error == 'File "<program>", line 2, in <module>\nZeroDivisionError: division by zero'
    assert run_code("import sys; sys.exit(3)", kind=kind).error == "SystemExit: 3"
    assert run_code("import sys; sys.exit(0)", kind=kind).error is None
    # the host's files (this repository's own) and network are not there; new processes are refused. The
    # repository's folder itself may exist: a virtual environment inside it is bound read-only for the interpreter
    seen = f"import os; print(os.path.exists({REPO + '/pyproject.toml'!r}), os.path.exists({__file__!r}))"
    assert run_code(seen, kind=kind).output == "False False\n"
    assert "OSError" in run_code("import socket; socket.create_connection(('1.1.1.1', 53), 1)", kind=kind).error
    assert "PermissionError" in run_code("import os; os.fork()", kind=kind).error


def test_output_is_capped_and_a_program_past_its_deadline_is_killed():
    run = run_code("print('x' * 100)", kind=SANDBOXES[0], max_output=10)
    assert run.output == "x" * 10 + "\n[... 91 more characters]"  # 100 x's and the newline: 101 written
    run = run_code("while True: pass", kind=SANDBOXES[0], limits=Limits(timeout_s=1))
    assert run.output == "" and run.error == "timeout: the program ran past 1 s" and run.seconds < 5


def test_the_tool_is_a_plain_function_with_its_schema_and_every_call_is_a_fresh_sandbox():
    python = python_tool(sandbox=SANDBOXES[0])
    schema = tool_schema(python)
    assert schema["function"]["name"] == "python"
    assert list(schema["function"]["parameters"]["properties"]) == ["code"]
    assert python("x = 6 * 7\nprint(x)") == "42\n"
    assert python("print(x)").endswith("NameError: name 'x' is not defined")  # nothing carried over
    assert python("x = 1") == "(the program printed nothing)"


def test_an_episode_sees_the_programs_output_and_its_error_and_ends_on_a_turn_without_a_call():
    env = python_environment(sandbox=SANDBOXES[0])
    assert isinstance(env, ToolEnvironment)
    assert env.reset({"prompt": "123*45="}) == [{"role": "user", "content": "123*45="}]
    seen = env.step(call("print(123*45)") + call("print(1/0)"))
    assert isinstance(seen, Observation)
    assert [m["content"] for m in seen.messages][0] == "5535\n"
    assert seen.messages[1]["content"].endswith("ZeroDivisionError: division by zero")
    assert env.counts == {"calls": 2}  # a program's own error is its result, not a failed call
    env.step('<tool_call>{"name": "python", "arguments": {}}</tool_call>')  # no code: a bad call, counted
    assert env.counts["bad_arguments"] == 1
    assert env.step("5535") == Done(None)


def test_a_bad_env_setting_fails_before_training_naming_it():
    cfg = compose(["env=python", "env.kwargs.sandbox=chroot"])
    with pytest.raises(ConfigError, match=r"env.kwargs: 'python' cannot be built with .*sandbox must be one of"):
        build_environment(cfg)
    cfg = compose(["env=python", "+env.kwargs.timeout=5"])
    with pytest.raises(ConfigError, match=r"env.kwargs: .*unexpected keyword argument 'timeout'"):
        build_environment(cfg)


@pytest.mark.parametrize("persistent", [False, True])
def test_site_packages_lets_programs_import_what_is_installed_beside_the_trainer(persistent):
    def tool(site_packages):
        return python_tool(sandbox=SANDBOXES[0], persistent=persistent, site_packages=site_packages, timeout_s=30)

    plain, with_packages = tool(False), tool(True)
    try:
        assert plain("import sympy").endswith("ModuleNotFoundError: No module named 'sympy'")
        assert with_packages("import sympy\nprint(sympy.factorint(5535))") == "{3: 3, 5: 1, 41: 1}\n"
        assert with_packages("import numpy\nprint(numpy.arange(4).sum())") == "6\n"
        # the trainer's own environment (a venv whose python links to a base installation), not the base's: started
        # through the link's target, Python would not find the venv and import the base's packages instead
        assert with_packages("import sys\nprint(sys.prefix)") == sys.prefix + "\n"
        if persistent:  # the imports stay
            assert with_packages("print(numpy.int64(6) * sympy.Integer(7))") == "42\n"
        assert "the installed packages" in tool_schema(with_packages)["function"]["parameters"]["properties"]["code"][
            "description"]
    finally:
        for t in (plain, with_packages):
            getattr(t, "close", lambda: None)()


class Closes:
    """An environment that counts the instances built and closed."""

    built = closed = 0
    tools: list = []

    def __init__(self):
        Closes.built += 1

    def close(self):
        Closes.closed += 1


def test_the_environment_built_to_check_env_kwargs_is_closed():
    Closes.built = Closes.closed = 0
    factory = build_environment(compose(["env.name=tests.integration.test_python_tool:Closes"]))
    assert (Closes.built, Closes.closed) == (1, 1)
    factory()
    assert (Closes.built, Closes.closed) == (2, 1)


class PythonCallsOnce:
    """On the model's first turn, whatever it wrote, one `python` call; its second turn ends the episode, which
    the task's rewards score."""

    def __init__(self):
        self.toolbox = python_environment(sandbox=SANDBOXES[0], timeout_s=5.0)
        self.tools, self.counts, self.turns = self.toolbox.tools, self.toolbox.counts, 0

    def reset(self, row):
        return self.toolbox.reset(row)

    def step(self, text):
        self.turns += 1
        return self.toolbox.step(text.replace("<tool_call>", "") + (call("print(6*7)") if self.turns == 1 else ""))


@pytest.mark.slow
def test_env_python_runs_through_the_real_loop_with_sandboxed_calls(tmp_path, tiny_random_dir):
    lines = train(tmp_path, tiny_random_dir, "py", "env.name=tests.integration.test_python_tool:PythonCallsOnce",
                  "train.max_steps=2", "rollout.max_turns=2", "rollout.max_episode_tokens=60")
    steps = [m for m in lines if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["env/turns_mean"] == 2 and m["env/tool_calls_mean"] == 1 and m["env/tool_error_frac"] == 0
        # the model's tokens, as sampled, around the tool's reply: the gap is the sampler's renormalisation without
        # pad alone (-log(1 - p(pad)), about 0.01 on this random model)
        assert 0 < m["rollout/logprob_abs_diff"] < 0.02
    assert train(tmp_path, tiny_random_dir, "py2", "env=python", "train.max_steps=1")[-1]["step"] == 1


def gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("kind", SANDBOXES)
def test_a_session_keeps_its_namespace_until_a_program_runs_past_its_deadline_or_ends_the_interpreter(kind):
    session = PythonSession(kind=kind, limits=Limits(timeout_s=2))
    try:
        run = session.run("import math\nx = 6 * 7")
        assert isinstance(run, CodeRun) and (run.output, run.error) == ("", None)
        assert session.run("def f(y):\n    return x + y").error is None
        run = session.run("print(f(1), math.factorial(5))\n1 / 0")
        assert run.output == "43 120\n" and run.error.endswith("ZeroDivisionError: division by zero")
        assert session.run("print(x)").output == "42\n"  # a program's error keeps the namespace
        assert session.run("import sys; sys.exit(3)").error == "SystemExit: 3"
        assert session.run("print(x)").output == "42\n" and session.starts == 1
        run = session.run("while True: pass")
        assert run.error == ("timeout: the program ran past 2 s; the interpreter restarts at the next call, without "
                             "the earlier calls' variables") and run.seconds < 5
        assert session.run("print(x)").error.endswith("NameError: name 'x' is not defined") and session.starts == 2
        assert session.run("import os; os._exit(0)").error.startswith("the interpreter stopped")
        assert session.run("print('fresh')").output == "fresh\n" and session.starts == 3
        # as out of reach as in a one-off run: the host's files, the network, new processes
        seen = f"import os; print(os.path.exists({REPO + '/pyproject.toml'!r}), os.path.exists({__file__!r}))"
        assert session.run(seen).output == "False False\n"
        assert "OSError" in session.run("import socket; socket.create_connection(('1.1.1.1', 53), 1)").error
        assert "PermissionError" in session.run("import os; os.fork()").error
    finally:
        session.close()


def states(session: PythonSession) -> set[str]:
    """The scheduler states (R, S, T, ...) of every thread of every process in the session's sandbox."""
    found = set()
    for pid in [session.proc.pid, *descendants(session.proc.pid)]:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                found.add(f.read().rpartition(")")[2].split()[0])
    return found


def test_between_calls_a_session_is_stopped_so_what_a_program_leaves_running_waits_for_the_next_call():
    session = PythonSession(kind=SANDBOXES[0], limits=Limits(timeout_s=3))
    try:
        spin = "import threading\nn = [0]\ndef spin():\n    while True:\n        n[0] += 1\n" \
               "threading.Thread(target=spin, daemon=True).start()"
        assert session.run(spin).error is None
        deadline = time.monotonic() + 5
        while states(session) != {"T"} and time.monotonic() < deadline:  # a signal takes a moment to land
            time.sleep(0.01)
        assert states(session) == {"T"}  # every thread of every process stopped, the spinning one included
        assert int(session.run("print(n[0])").output) > 0 and session.starts == 1  # it ran during that call
        # a timer whose handler never returns blocks the interpreter at its next call: that call's deadline,
        # its request (bigger than a pipe's buffer, so writing it waits on the interpreter) included, still holds
        session.run("import signal, time\nsignal.signal(signal.SIGALRM, lambda *a: time.sleep(1e6))\nsignal.alarm(1)")
        time.sleep(1.5)
        run = session.run("x = 1\n" + "#" * 200_000)
        assert run.error.startswith("timeout: the program ran past 3 s") and run.seconds < 6
        assert session.proc is None
    finally:
        session.close()


def test_a_sessions_answers_are_capped_and_keep_its_state():
    session = PythonSession(kind=SANDBOXES[0], max_output=100)
    try:
        session.run("x = 1")
        assert session.run("raise ValueError('v' * 70_000)").error.endswith("v\n[... 69950 more characters]")
        assert session.run("print('\\U0001F600' * 5000)").output == "\U0001F600" * 100 + "\n[... 4901 more characters]"
        assert session.run("print(x)").output == "1\n" and session.starts == 1
    finally:
        session.close()


def test_a_sessions_cpu_budget_spans_its_programs_and_no_interpreter_outlives_its_session():
    session = PythonSession(kind=SANDBOXES[0], limits=Limits(timeout_s=30), cpu_budget_s=2)
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.8:\n    pass\nprint('ok')"
    assert [session.run(burn).output for _ in range(2)] == ["ok\n", "ok\n"]  # 1.6 s of the 2
    assert session.run(burn).error.startswith("the interpreter stopped")
    assert session.run(burn).output == "ok\n" and session.starts == 2  # a fresh interpreter, a fresh budget
    pid = session.proc.pid
    session.close()
    assert session.proc is None and gone(pid)
    session.close()  # closing twice is harmless
    unclosed = PythonSession(kind=SANDBOXES[0])
    assert unclosed.run("print(1)").output == "1\n"
    pid = unclosed.proc.pid
    del unclosed
    gc.collect()
    assert gone(pid)


def test_the_persistent_tool_keeps_state_within_an_episode_never_across_episodes():
    env = python_environment(sandbox=SANDBOXES[0], persistent=True)
    other = python_environment(sandbox=SANDBOXES[0], persistent=True)
    assert "keeps its variables between calls" in tool_schema(env.tools[0])["function"]["description"]
    assert "keeps" not in tool_schema(python_tool(sandbox=SANDBOXES[0]))["function"]["description"]
    env.reset({"prompt": "123*45="})
    other.reset({"prompt": "123*45="})
    assert env.step(call("x = 123 * 45")).messages[0]["content"] == "(the program printed nothing)"
    assert env.step(call("print(x)") + call("print(x + 1)")).messages[1]["content"] == "5536\n"
    assert other.step(call("print(x)")).messages[0]["content"].endswith("NameError: name 'x' is not defined")
    assert env.tools[0].session.proc is not None
    env.close()
    assert env.tools[0].session.proc is None
    other.close()


class PythonKeepsState:
    """Whatever the model writes: `x = 6 * 7` in its first turn, `print(x)` in its second, and the third ends the
    episode. Every tool reply and every interpreter the episodes started are recorded."""

    replies: list[str] = []
    sessions: list = []
    closes = 0

    def __init__(self):
        self.toolbox = python_environment(sandbox=SANDBOXES[0], persistent=True)
        self.tools, self.counts, self.turns = self.toolbox.tools, self.toolbox.counts, 0
        self.sessions.append(self.tools[0].session)

    def reset(self, row):
        return self.toolbox.reset(row)

    def step(self, text):
        self.turns += 1
        code = {1: "x = 6 * 7", 2: "print(x)"}.get(self.turns)
        result = self.toolbox.step(text.replace("<tool_call>", "") + (call(code) if code else ""))
        self.replies += [m["content"] for m in getattr(result, "messages", [])]
        return result

    def close(self):
        PythonKeepsState.closes += 1
        self.toolbox.close()


@pytest.mark.slow
def test_a_persistent_python_tool_through_the_real_loop_keeps_each_episodes_state_and_stops_its_interpreter(
        tmp_path, tiny_random_dir):
    PythonKeepsState.replies.clear()
    PythonKeepsState.sessions.clear()
    PythonKeepsState.closes = 0
    lines = train(tmp_path, tiny_random_dir, "keeps", "env.name=tests.integration.test_python_tool:PythonKeepsState",
                  "train.max_steps=1", "rollout.max_turns=3", "rollout.max_episode_tokens=200")
    step = next(m for m in lines if "train/loss" in m)
    assert step["env/tool_calls_mean"] == 2 and step["env/tool_error_frac"] == 0
    assert PythonKeepsState.replies.count("42\n") == PythonKeepsState.replies.count("(the program printed nothing)")
    assert "42\n" in PythonKeepsState.replies and not any("Error" in r for r in PythonKeepsState.replies)
    # every environment built was closed once (the one built to check env.kwargs too), and its interpreter is gone
    assert PythonKeepsState.closes == len(PythonKeepsState.sessions) > 1
    assert all(s.proc is None for s in PythonKeepsState.sessions)
    # 8 interpreters of 512 MB: a budget of its own, since the default (half of MemAvailable) depends on what
    # else the machine runs (4,080 MB on a loaded one refused the run)
    lines = train(tmp_path, tiny_random_dir, "py3", "env=python", "env.kwargs.persistent=true", "train.max_steps=1",
                  "env.sessions_memory_mb=4096")
    assert lines[-1]["step"] == 1
