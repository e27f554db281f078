"""verifiers' environments (prime-rl's library, the `verifiers` package, 0.4.0: `verifiers.v1`) as ours.

    env=verifiers env.kwargs.load=my_package.envs:load_taskset

`env.kwargs.load` names a function (`module:function`, or the dotted path `module.function`) that returns a
verifiers taskset built in code (`vf.Taskset`), or an environment (`vf.Env`, e.g. `vf.SingleAgentEnv`) whose
taskset is taken. verifiers 0.4.0 has no SingleTurnEnv, MultiTurnEnv, ToolEnv, Parser or Rubric classes (those
were 0.1's): an environment is a taskset of typed tasks, each with its scoring (`@vf.reward`, `@vf.metric`),
its stop conditions (`@vf.stop`) and its tool servers (`vf.Toolset` with `@vf.tool` methods), played by an
agent harness. The translation:

- Dataset: the taskset's tasks, in `load()` order, are the rows (`rows`: `prompt` its prompt text, `answer` its
  data's `answer` field or "", `vf_index` its position); the last `num_eval` are the held-out split
  (`task.builtin=env` takes them as the task). `reset(row)` finds the row's task by `vf_index`, else by prompt.
- Opening: the task's `system_prompt` (else `env.kwargs.system`, if given), then its prompt (a string as the user's
  message; messages as they are).
- Turns (the harness's part, played by our episode loop): a turn with tool calls (Qwen2.5's `<tool_call>`
  syntax, read by `ToolEnvironment`) gets the tools' results and the model speaks again; a turn without one
  ends the episode, as verifiers' chat harness ends on a reply without tool calls. The task's `@vf.stop`
  predicates over the trace are checked after every turn; one that holds ends the episode there.
- Tools: every `vf.Toolset` of the task and of the taskset, built per episode, its `setup` and `setup_task`
  run; its `@vf.tool` methods run in-process as our function tools (named without the server prefix), and see
  the episode's state (`Toolset.state`) as they would on their MCP server, the state the rewards then read.
- Reward: at the end the episode is a verifiers trace (its messages), scored by the task's own
  `Task.score(trace)`: each `@vf.reward` function's score is recorded with its weight; `Done.reward` is the
  weighted sum (`trace.reward`), `Done.scores` each function's score (logged as `reward/<name>`). A task with no
  reward function leaves the reward to the run's reward functions (None).
- An error in the task's scoring, a tool's setup or the row's lookup raises from `reset`/`step`: that episode
  ends with no reward (`env/errors`), the others go on.

Where this differs from verifiers' own rollout: no harness program, interception server or runtime
(sandbox, container) runs; scoring and tools run in the trainer's process. So reward and metric functions
that need a `runtime` are skipped (as verifiers skips them when it scores without one), as are `Task.setup`,
`Task.finalize`, plugged judges' model calls (a judge's reward needs its own model), request/response stop
conditions and interceptors, and multi-agent `Env.run` (e.g. `user-sim`'s modelled user): only the taskset is
played, by one agent, the policy. The turn limit is `rollout.max_turns`, not the agent's `max_turns`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import Callable

import verifiers.v1 as vf
from transformers.utils import get_json_schema
from verifiers.v1.graph import MessageNode
from verifiers.v1.mcp.server import _call_state
from verifiers.v1.session import call_hook, hook_boundary
from verifiers.v1.state import state_cls
from verifiers.v1.trace import AgentInfo, TraceTask
from verifiers.v1.types import content_text
from verifiers.v1.utils.decorators import discover_decorated

from grpo.envs import Done, Observation
from grpo.envs.tools import ToolEnvironment, parse_tool_calls
from rewards.registry import load_path

INDEX = "vf_index"  # the row's column holding its task's position in the taskset
TASKSETS: dict[str, tuple[vf.Taskset, list[vf.Task]]] = {}  # by `load`: built once per process
BUILDING = threading.Lock()


class VerifiersEnvironment:
    """One episode of a task of the verifiers taskset `load` returns (module docstring: what maps to what)."""

    def __init__(self, load: str, num_eval: int = 0, system: str | None = None):
        self.taskset, self.tasks = taskset_tasks(load)
        self.by_prompt = {task.data.prompt_text: task for task in self.tasks}
        self.system = system  # used where the task has no system prompt of its own
        self.task: vf.Task | None = None
        self.trace: vf.Trace | None = None
        self.task_toolsets = type(self.tasks[0]).toolsets(self.tasks[0].config)
        self.toolsets = [*self.task_toolsets, *type(self.taskset).toolsets(self.taskset.config)]
        self.toolbox = ToolEnvironment([as_function(self, fn) for ts in self.toolsets
                                        for fn in discover_decorated(ts, "tool")])
        self.tools, self.counts = self.toolbox.tools, self.toolbox.counts

    @classmethod
    def rows(cls, load: str, num_eval: int = 0, **_) -> dict[str, list[dict]]:
        """The taskset's tasks as rows: `train`, and the last `num_eval` as `test`."""
        _, tasks = taskset_tasks(load)
        if not 0 <= num_eval < len(tasks):
            raise ValueError(f"env.kwargs.num_eval: {num_eval} of {len(tasks)} tasks leaves none to train on")
        rows = [task_row(task) for task in tasks]
        return {"train": rows[: len(rows) - num_eval], "test": rows[len(rows) - num_eval :]}

    def reset(self, row: dict) -> list[dict]:
        self.task = self.task_of(row)
        self.trace = vf.Trace(task=TraceTask(type=type(self.task).__name__, data=self.task.data, key=self.task.key,
                                             hash=self.task.hash),
                              state=state_cls(type(self.task))(), agent=AgentInfo(config=vf.AgentConfig(), name="grpo"))
        self.call(self.set_up_tools())
        data = self.task.data
        system = data.system_prompt or self.system
        if data.prompt is None:
            raise ValueError(f"verifiers task {data.idx} has no prompt (a conversation a modelled user opens "
                             "is not played here)")
        prompt = ([{"role": "user", "content": data.prompt}] if isinstance(data.prompt, str)
                  else [{"role": m.role, "content": content_text(m.content)} for m in data.prompt])
        messages = [*([{"role": "system", "content": system}] if system else []), *prompt]
        self.record(messages)
        return messages

    def step(self, text: str) -> Observation | Done:
        calls = parse_tool_calls(text)
        self.record([{"role": "assistant", "content": text, "calls": calls}])
        if not calls:
            return self.score()
        result = self.toolbox.step(text)
        self.record(result.messages)
        return self.score() if self.call(self.stopped()) else result

    def task_of(self, row: dict) -> vf.Task:
        """The row's task: by its `vf_index`, else by its prompt text; ValueError naming the column otherwise."""
        index = row.get(INDEX)
        if isinstance(index, int) and 0 <= index < len(self.tasks):
            return self.tasks[index]
        if index is None and row.get("prompt") in self.by_prompt:
            return self.by_prompt[row["prompt"]]
        raise ValueError(f"row: {INDEX}={index!r} names no task of the taskset ({len(self.tasks)} tasks), and its "
                         "prompt is none of theirs")

    async def set_up_tools(self) -> None:
        """Each tool server's `setup`, then the task's own servers' `setup_task` (a taskset's servers skip it)."""
        for toolset in self.toolsets:
            await toolset.setup()
        for toolset in self.task_toolsets:
            await toolset.setup_task(self.task)

    def record(self, messages: list[dict]) -> None:
        """Append messages to the verifiers trace, each node's parent the one before."""
        for m in messages:
            parent = len(self.trace.nodes) - 1 if self.trace.nodes else None
            self.trace.nodes.append(MessageNode(parent=parent, message=vf_message(m, len(self.trace.nodes)),
                                                sampled=m["role"] == "assistant"))

    async def stopped(self) -> bool:
        """Does one of the task's `@vf.stop` predicates over the trace hold, as verifiers checks them before each
        model call? (`trace.stop` names it.) Those over a request or a response are not checked."""
        for fn in self.task.hooks("stop"):
            if hook_boundary(fn, allow_trace=True) is not vf.Trace:
                continue
            result = await call_hook(fn, {vf.Trace: self.trace})
            if not isinstance(result, bool):
                raise TypeError(f"@vf.stop {fn.__name__} must return bool, got {type(result).__name__}")
            if result:
                self.trace.stop(fn.__name__)
                return True
        return False

    def score(self) -> Done:
        """The task's own scoring of the trace: the weighted sum of its rewards, and each reward's score."""
        self.call(self.task.score(self.trace))
        scores = {name: r.score for name, r in self.trace.rewards.items() if r is not None}
        return Done(self.trace.reward if scores else None, scores)

    def call(self, coroutine):
        """Run verifiers' coroutine to its end, with the episode's state as the tools' state (`Toolset.state`)."""
        async def with_state():
            token = _call_state.set(self.trace.state)
            try:
                return await coroutine
            finally:
                _call_state.reset(token)
        return asyncio.run(with_state())


def taskset_tasks(load: str) -> tuple[vf.Taskset, list[vf.Task]]:
    """The taskset `load` names and its tasks (built once per process, then shared by every episode)."""
    with BUILDING:
        if load not in TASKSETS:
            taskset = load_taskset(load)
            tasks = list(taskset)
            if not tasks:
                raise ValueError(f"env.kwargs.load: the taskset of {load!r} has no tasks")
            TASKSETS[load] = taskset, tasks
        return TASKSETS[load]


def load_taskset(load: str) -> vf.Taskset:
    """Call the function `load` names; its verifiers Taskset (or an Env's), else ValueError naming the field."""
    if not isinstance(load, str) or not load.strip(". :"):
        raise ValueError(f"env.kwargs.load: expected 'module:function' or 'module.function', got {load!r}")
    path = load if ":" in load else ":".join(load.rsplit(".", 1))
    try:
        made = load_path(path, what="the function")
    except (ValueError, ImportError, AttributeError) as e:
        raise ValueError(f"env.kwargs.load: cannot import {load!r}: {e}") from e
    made = made() if callable(made) and not isinstance(made, (vf.Taskset, vf.Env)) else made
    made = made.taskset if isinstance(made, vf.Env) else made
    if not isinstance(made, vf.Taskset):
        raise ValueError(f"env.kwargs.load: {load!r} gave a {type(made).__name__}, not a verifiers Taskset or Env")
    if not made.bounded:
        raise ValueError(f"env.kwargs.load: the taskset of {load!r} is infinite; bound it (taskset.take(n))")
    return made


def task_row(task: vf.Task) -> dict:
    """A task as a dataset row: its prompt text, its `answer` field (or ""), its position."""
    answer = getattr(task.data, "answer", None)
    return {"prompt": task.data.prompt_text, "answer": "" if answer is None else str(answer), INDEX: task.data.idx}


def vf_message(m: dict, position: int):
    """One of our chat messages as verifiers' message type; an assistant turn carries the tool calls read from it."""
    if m["role"] == "assistant":
        calls = [vf.ToolCall(id=f"call_{position}_{k}", name=c.name or "", arguments=json.dumps(c.arguments))
                 for k, c in enumerate(m.get("calls", []))]
        return vf.AssistantMessage(content=m["content"], tool_calls=calls or None)
    if m["role"] == "tool":
        return vf.ToolMessage(tool_call_id=f"call_{position}", content=m["content"], name=m.get("name"))
    return {"system": vf.SystemMessage, "user": vf.UserMessage}[m["role"]](content=m["content"])


def as_function(env: VerifiersEnvironment, method: Callable) -> Callable:
    """A toolset's `@vf.tool` method as a plain function tool: its name, signature and docstring (an `Args:`
    section written from the parameters' names where the docstring has none, as the JSON schema needs one)."""
    async def run(arguments: dict):
        result = method(**arguments)
        return await result if inspect.isawaitable(result) else result

    def tool(**arguments):
        return env.call(run(arguments))

    tool.__name__ = getattr(method, "tool_name", None) or method.__name__
    tool.__signature__ = inspect.signature(method)
    tool.__annotations__ = {k: v for k, v in getattr(method, "__annotations__", {}).items()}
    tool.__doc__ = method.__doc__ or tool.__name__
    try:
        get_json_schema(tool)
    except Exception:  # no Google-style Args: the parameters' names describe them
        lines = "".join(f"    {p}: {p}\n" for p in tool.__signature__.parameters)
        tool.__doc__ = f"{(method.__doc__ or tool.__name__).strip()}\n\nArgs:\n{lines}"
    return tool
