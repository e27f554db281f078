"""Tools as plain Python functions, the tool-call syntax of Qwen2.5, and `ToolEnvironment`.

A tool is a function with type hints and a Google-style docstring; its JSON schema comes from
transformers' `get_json_schema` (the format chat templates render). The model calls tools in its own
syntax, Qwen2.5's (and Hermes'):

    <tool_call>
    {"name": "multiply", "arguments": {"a": 6, "b": 7}}
    </tool_call>

several per turn allowed. `parse_tool_calls` reads them; a call that cannot be read is returned with
its `error` set rather than dropped, so that the model is told. That includes a call longer than
`MAX_CALL_CHARS`, nested deeper than `MAX_CALL_DEPTH` (JSON 1,000 levels deep would otherwise raise
RecursionError in the parser) or holding an integer too long to convert. `ToolEnvironment` runs the calls
and turns each failure (malformed call, unknown tool, wrong arguments, a tool that raises, a call past
`max_calls_per_turn`) into a tool message the model sees, counting each kind in `counts`.
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
FAILURES = ("malformed", "unknown_tool", "bad_arguments", "raised", "refused")  # the kinds of failed call counted
MAX_CALL_CHARS = 65536  # a call's JSON at most; a longer one is malformed, unread
MAX_CALL_DEPTH = 32  # nesting of a call's JSON (objects and arrays) at most
DEFAULT_MAX_CALLS_PER_TURN = 8  # env.max_tool_calls_per_turn's default


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
    obj, error = load_json(body)
    if error is not None:
        return ToolCall(None, error=error)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall(None, error='the call needs {"name": <string>, "arguments": {...}}')
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):
        parsed, error = load_json(arguments)
        arguments = arguments if error is not None else parsed
    if not isinstance(arguments, dict):
        return ToolCall(obj["name"], error="arguments must be a JSON object")
    return ToolCall(obj["name"], arguments)


def load_json(text: str) -> tuple[object, str | None]:
    """(the JSON value, None), or (None, why it cannot be read): invalid, too long, too deeply nested, or an
    integer past Python's digit limit. Never raises."""
    if len(text) > MAX_CALL_CHARS:
        return None, f"the call is {len(text)} characters long; at most {MAX_CALL_CHARS}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"the call is not valid JSON ({e.msg})"
    except RecursionError:
        return None, f"the call is nested too deeply (at most {MAX_CALL_DEPTH} levels)"
    except ValueError as e:  # e.g. an integer of more digits than int() converts
        return None, f"the call cannot be read ({str(e)[:100]})"
    if nesting(value) > MAX_CALL_DEPTH:
        return None, f"the call is nested too deeply (at most {MAX_CALL_DEPTH} levels)"
    return value, None


def nesting(value) -> int:
    """How deeply JSON arrays and objects nest in `value` (a scalar: 0), without recursion."""
    deepest, level = 0, [(value, 0)]
    while level:
        item, depth = level.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth + 1)
            level += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return deepest


class ToolEnvironment:
    """An episode in which the model may call `tools` until it writes a turn without a tool call.

    Each call's result (or the failure's message) is one `{"role": "tool"}` message. The episode ends
    at the first turn with no `<tool_call>`, with `score(text, row)` as its reward, or None when no
    `score` is given (the task's reward functions then score the final turn). The opening messages are
    `system` (if given) and the row's prompt as the user's message. Use it as it is, or hold one in your
    own environment and call its `reset`/`step` (and `close`, which closes the tools that have one).
    Calls past the first `max_calls_per_turn` of a turn are not run: each gets an error message, so one turn
    cannot hold the episode for a tool's timeout many times over (`env.max_tool_calls_per_turn` sets it,
    through `limit_tool_calls`, on the environments a run builds).
    """

    def __init__(self, tools: list[Callable], *, system: str | None = None,
                 score: Callable[[str, dict], float | None] | None = None,
                 max_calls_per_turn: int = DEFAULT_MAX_CALLS_PER_TURN):
        self.tools, self.system, self.score = list(tools), system, score
        self.max_calls_per_turn = max_calls_per_turn
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
        kept, refused = calls[: self.max_calls_per_turn], calls[self.max_calls_per_turn :]
        return Observation([self.run(call) for call in kept] + [self.refuse(call) for call in refused])

    def refuse(self, call: ToolCall) -> dict:
        """The tool message answering a call past the turn's limit (counted, not run)."""
        self.counts["calls"] += 1
        self.counts["refused"] += 1
        return {"role": "tool", "name": call.name or "",
                "content": f"error: not run: at most {self.max_calls_per_turn} tool calls per turn"}

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


def limit_tool_calls(env, max_calls_per_turn: int) -> None:
    """Set the per-turn call limit of `env` if it is a ToolEnvironment, and of each ToolEnvironment it holds
    as an attribute (an environment built around one, as in the module docstring's pattern); an environment that
    builds its own later (grpo.envs.routing) takes it in its `tool_call_limit`."""
    for part in (env, *vars(env).values()) if hasattr(env, "__dict__") else (env,):
        if isinstance(part, ToolEnvironment):
            part.max_calls_per_turn = max_calls_per_turn
    if hasattr(env, "tool_call_limit"):
        env.tool_call_limit = max_calls_per_turn


def to_text(result) -> str:
    """A tool's result as the text the model reads: strings as they are, anything else as JSON."""
    return result if isinstance(result, str) else json.dumps(result)
