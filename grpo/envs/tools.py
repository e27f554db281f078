"""Tools as plain Python functions, the tool-call syntax of Qwen2.5, and `ToolEnvironment`.

A tool is a function with type hints and a Google-style docstring; its JSON schema comes from
transformers' `get_json_schema` (the format chat templates render). The model calls tools in its own
syntax, Qwen2.5's (and Hermes'):

    <tool_call>
    {"name": "multiply", "arguments": {"a": 6, "b": 7}}
    </tool_call>

several per turn allowed. `parse_tool_calls` reads them; a call that cannot be read is returned with
its `error` set rather than dropped, so that the model is told. `ToolEnvironment` runs the calls and
turns each failure (malformed call, unknown tool, wrong arguments, a tool that raises) into a tool
message the model sees, counting each kind in `counts`.
"""

from __future__ import annotations

import inspect
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers.utils import get_json_schema

from grpo.envs import Done, Observation

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FAILURES = ("malformed", "unknown_tool", "bad_arguments", "raised")  # the kinds of failed call counted


@dataclass
class ToolCall:
    """One call read from the model's turn; `error` says why it could not be read (then name may be None)."""

    name: str | None
    arguments: dict = field(default_factory=dict)
    error: str | None = None


def tool_schema(fn: Callable) -> dict:
    """The function's JSON schema, from its signature and docstring (`transformers.utils.get_json_schema`)."""
    return get_json_schema(fn)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>{json}</tool_call>` in `text`, in order. The JSON must be an object with a string
    `name` and an object `arguments` (a JSON string holding an object is accepted too; missing: {}).
    A call with no closing tag runs to the end of the text and is malformed."""
    calls = []
    for match in re.finditer(re.escape(OPEN) + r"(.*?)(" + re.escape(CLOSE) + r"|$)", text, flags=re.S):
        body, closed = match.group(1).strip(), bool(match.group(2))
        calls.append(read_call(body) if closed else ToolCall(None, error=f"no {CLOSE} after {OPEN}"))
    return calls


def read_call(body: str) -> ToolCall:
    """One call's JSON body -> a ToolCall, or one whose `error` says what is wrong with it."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall(None, error=f"the call is not valid JSON ({e.msg})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall(None, error='the call needs {"name": <string>, "arguments": {...}}')
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(obj["name"], error="arguments must be a JSON object")
    return ToolCall(obj["name"], arguments)


class ToolEnvironment:
    """An episode in which the model may call `tools` until it writes a turn without a tool call.

    Each call's result (or the failure's message) is one `{"role": "tool"}` message. The episode ends
    at the first turn with no `<tool_call>`, with `score(text, row)` as its reward, or None when no
    `score` is given (the task's reward functions then score the final turn). The opening messages are
    `system` (if given) and the row's prompt as the user's message. Use it as it is, or hold one in your
    own environment and call its `reset`/`step` (and `close`, which closes the tools that have one).
    """

    def __init__(self, tools: list[Callable], *, system: str | None = None,
                 score: Callable[[str, dict], float | None] | None = None):
        self.tools, self.system, self.score = list(tools), system, score
        self.by_name = {fn.__name__: fn for fn in self.tools}
        self.counts: Counter = Counter()  # calls, and each kind of failure (FAILURES)
        self.row: dict = {}

    def reset(self, row: dict) -> list[dict]:
        self.row = row
        return [*([{"role": "system", "content": self.system}] if self.system else []),
                {"role": "user", "content": row["prompt"]}]

    def step(self, text: str) -> Observation | Done:
        calls = parse_tool_calls(text)
        if not calls:
            return Done(self.score(text, self.row) if self.score else None)
        return Observation([self.run(call) for call in calls])

    def close(self) -> None:
        """Release what the tools hold (a tool with a `close`, such as a persistent `python` tool's interpreter);
        every tool is closed, then the first error raised is raised again."""
        errors = []
        for fn in self.tools:
            if callable(getattr(fn, "close", None)):
                try:
                    fn.close()
                except Exception as e:
                    errors.append(e)
        if errors:
            raise errors[0]

    def run(self, call: ToolCall) -> dict:
        """The tool message answering one call: the tool's result, or what went wrong (counted)."""
        self.counts["calls"] += 1
        kind, content = None, None
        if call.error is not None:
            kind, content = "malformed", f"error: malformed tool call: {call.error}"
        elif call.name not in self.by_name:
            kind, content = "unknown_tool", f"error: unknown tool {call.name!r}; tools: {', '.join(self.by_name)}"
        else:
            fn = self.by_name[call.name]
            try:
                inspect.signature(fn).bind(**call.arguments)
            except TypeError as e:
                kind, content = "bad_arguments", f"error: {call.name}: {e}"
            else:
                try:
                    content = to_text(fn(**call.arguments))
                except Exception as e:  # the model sees what went wrong; the episode goes on
                    kind, content = "raised", f"error: {call.name} raised {type(e).__name__}: {e}"
        if kind is not None:
            self.counts[kind] += 1
        return {"role": "tool", "name": call.name or "", "content": content}


def to_text(result) -> str:
    """A tool's result as the text the model reads: strings as they are, anything else as JSON."""
    return result if isinstance(result, str) else json.dumps(result)
