"""verifiers (0.4.0) tasksets built in code from the library's own classes, for tests/integration/test_verifiers_env.py:
`env.kwargs.load` names the functions at the bottom. Imported only through those names (it needs `verifiers`)."""

from __future__ import annotations

import sys
import types

import verifiers.v1 as vf


class Sum(vf.TaskData):
    answer: str


class SumTask(vf.Task[Sum]):
    """Single turn: `correct` (weight 1) if the reply is the answer, `even` (weight 0.5) for an even-length reply
    (a signal on a random model)."""

    @vf.reward(weight=1.0)
    async def correct(self, task, trace) -> float:
        return float(trace.last_reply == task.answer)

    @vf.reward(weight=0.5)
    async def even(self, trace) -> float:
        return float(len(trace.last_reply) % 2 == 0)

    @vf.metric
    async def reply_chars(self, trace) -> float:
        return float(len(trace.last_reply))


class Sums(vf.Taskset[SumTask]):
    def load(self):
        for a in range(12):
            yield SumTask(Sum(prompt=f"{a}+{a + 1}=", answer=str(2 * a + 1)), self.config.task)


class Calls(vf.State):
    calls: int = 0
    arguments: list[list[int]] = []


class Adder(vf.Toolset[vf.ToolsetConfig, Calls]):
    """One tool, `add`, that counts its calls in the episode's state."""

    @vf.tool
    async def add(self, a: int, b: int) -> str:
        """Add two integers.

        Args:
            a: the first
            b: the second
        """
        self.state.calls += 1
        self.state.arguments.append([a, b])
        return str(a + b)


class AddTask(vf.Task[Sum, Calls]):
    """Tools: `add`; rewards `correct` (weight 1) and `called` (weight 2: one or more calls, from the state the
    tool wrote); stops after two tool calls."""

    @classmethod
    def toolsets(cls, config):
        return [Adder(vf.ToolsetConfig())]

    @vf.reward(weight=1.0)
    async def correct(self, task, trace) -> float:
        return float(trace.last_reply == task.answer)

    @vf.reward(weight=2.0)
    async def called(self, trace) -> float:
        return float(trace.state.calls > 0)

    @vf.stop
    async def two_calls(self, trace: vf.Trace) -> bool:
        return trace.state.calls >= 2


class Adds(vf.Taskset[AddTask]):
    def load(self):
        for a in range(6):
            yield AddTask(Sum(prompt=f"{a}*7=", system_prompt="Use the add tool.", answer=str(7 * a)),
                          self.config.task)


class Fragile(vf.Task[Sum]):
    """`correct`, but scoring raises on every task whose answer is odd."""

    @vf.reward
    async def correct(self, task, trace) -> float:
        if int(task.answer) % 2:
            raise ValueError(f"cannot score {task.answer}")
        return float(trace.last_reply == task.answer)


class Fragiles(vf.Taskset[Fragile]):
    def load(self):
        for a in range(8):
            yield Fragile(Sum(prompt=f"{a}+{a}+{a % 2}=", answer=str(2 * a + a % 2)), self.config.task)


def sums() -> vf.Taskset:
    return Sums(vf.TasksetConfig(id="sums"))


def adds() -> vf.Taskset:
    return Adds(vf.TasksetConfig(id="adds"))


def fragiles() -> vf.Taskset:
    return Fragiles(vf.TasksetConfig(id="fragiles"))


def sums_env() -> vf.Env:
    """`sums` inside a single-agent environment, as verifiers builds one from its config. verifiers' loader imports
    a taskset by a top-level module name exporting one Taskset class in `__all__` (0.4.0 cannot import a dotted
    one), so `Sums` is registered under such a name first."""
    module = types.ModuleType("grpo_test_sums")
    module.Sums, module.__all__ = Sums, ["Sums"]
    sys.modules.setdefault(module.__name__, module)
    return vf.SingleAgentEnv(vf.SingleAgentEnvConfig(taskset={"id": module.__name__}))


NOT_A_TASKSET = 3


def not_a_taskset():
    return [1, 2]
