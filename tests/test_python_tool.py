"""The `python` tool (grpo/envs/python.py): programs run in the sandbox and the model reads what they printed,
their errors are results, every call is a fresh sandbox, and `env=python` runs through the real loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpo.config import ConfigError
from grpo.envs import Done, Observation
from grpo.envs.python import python_environment, python_tool
from grpo.envs.tools import ToolEnvironment, tool_schema
from grpo.run import build_environment
from rewards.sandbox import Limits, run_code
from tests.conftest import compose
from tests.test_episodes import train
from tests.test_rewards_code import SANDBOXES, needs_sandbox

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
    lines = train(tmp_path, tiny_random_dir, "py", "env.name=tests.test_python_tool:PythonCallsOnce",
                  "train.max_steps=2", "rollout.max_turns=2", "rollout.max_episode_tokens=60")
    steps = [m for m in lines if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["env/turns_mean"] == 2 and m["env/tool_calls_mean"] == 1 and m["env/tool_error_frac"] == 0
        assert 0 < m["rollout/logprob_abs_diff"] < 2e-5  # the model's tokens, as sampled, around the tool's reply
    assert train(tmp_path, tiny_random_dir, "py2", "env=python", "train.max_steps=1")[-1]["step"] == 1
