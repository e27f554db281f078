"""The environment API by hand: the tool-call parser, tool schemas, `ToolEnvironment`'s handling of every
kind of failed call, the calculator, the environment factory and the chat rendering of a turn's new text."""

from __future__ import annotations

import importlib.metadata as md
import json
import re
from pathlib import Path

import pytest

from grpo.builtin.tiny import build_char_tokenizer
from grpo.envs import ENTRY_POINT_GROUP, Done, Environment, Observation, environment_factory
from grpo.envs.calculator import calculate
from grpo.envs.chat import MINIMAL_TEMPLATE, check_chat_template, environment_text, render
from grpo.envs.tools import (
    MAX_CALL_CHARS,
    MAX_CALL_DEPTH,
    ToolCall,
    ToolEnvironment,
    limit_tool_calls,
    parse_tool_calls,
    tool_schema,
)
from grpo.errors import ConfigError


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


def divide(a: int, b: int) -> float:
    """Divide a by b.

    Args:
        a: the dividend
        b: the divisor
    """
    return a / b


# --- the parser ---------------------------------------------------------------------------------------

def test_parse_one_call_in_qwens_layout():
    text = 'Let me compute.\n<tool_call>\n{"name": "multiply", "arguments": {"a": 6, "b": 7}}\n</tool_call>'
    assert parse_tool_calls(text) == [ToolCall("multiply", {"a": 6, "b": 7})]


def test_parse_several_calls_in_order_and_none():
    text = ('<tool_call>{"name": "multiply", "arguments": {"a": 1, "b": 2}}</tool_call> and '
            '<tool_call>{"name": "divide", "arguments": {"a": 3, "b": 4}}</tool_call>')
    assert parse_tool_calls(text) == [ToolCall("multiply", {"a": 1, "b": 2}), ToolCall("divide", {"a": 3, "b": 4})]
    assert parse_tool_calls("the answer is 42") == []


def test_parse_arguments_as_a_json_string_or_missing():
    text = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call><tool_call>{"name": "g"}</tool_call>'
    assert parse_tool_calls(text) == [ToolCall("f", {"x": 1}), ToolCall("g", {})]


@pytest.mark.parametrize("body, error", [
    ('{"name": "f", "arguments": {"x": 1}', "not valid JSON"),  # unbalanced brace
    ("multiply(6, 7)", "not valid JSON"),
    ('{"arguments": {"x": 1}}', "needs"),  # no name
    ('["f", {}]', "needs"),  # not an object
    ('{"name": 3}', "needs"),  # name not a string
    ('{"name": "f", "arguments": [1, 2]}', "arguments must be a JSON object"),
])
def test_parse_malformed_calls_are_returned_with_their_error(body, error):
    (call,) = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert call.error is not None and error in call.error


def nested(depth: int) -> str:
    """A call whose argument `x` is `depth - 1` lists deep: the JSON nests `depth` levels in all."""
    return '{"name": "f", "arguments": {"x": ' + "[" * (depth - 2) + "]" * (depth - 2) + "}}"


@pytest.mark.parametrize("body, error", [
    (nested(1000), "nested too deeply"),  # json.loads raises RecursionError here: the parser's own limit
    (nested(MAX_CALL_DEPTH + 1), "nested too deeply"),  # parsed, but past our limit
    ('{"name": "f", "arguments": "' + "[" * 2000 + '"}', "arguments must be a JSON object"),  # deep in a string
    ('{"name": "f", "arguments": {"x": ' + "9" * 5000 + "}}", "cannot be read"),  # int() refuses 5000 digits
    ('{"name": "f", "arguments": {"x": "' + "a" * MAX_CALL_CHARS + '"}}', "characters long"),
])
def test_parse_hostile_calls_are_malformed_not_an_exception(body, error):
    (call,) = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert call.name is None or error.startswith("arguments")
    assert error in call.error
    assert parse_tool_calls(f"<tool_call>{nested(MAX_CALL_DEPTH)}</tool_call>")[0].error is None  # at the limit


def test_parse_a_partial_call_without_its_closing_tag():
    # the turn ran out (or the model stopped) inside the call: malformed, after the complete call before it
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "argu'
    good, partial = parse_tool_calls(text)
    assert good == ToolCall("f", {}) and partial.name is None and "no </tool_call>" in partial.error


# --- schema -------------------------------------------------------------------------------------------

def test_schema_from_signature_and_docstring():
    assert tool_schema(multiply) == {"type": "function", "function": {
        "name": "multiply", "description": "Multiply two integers.",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "description": "the first factor"},
            "b": {"type": "integer", "description": "the second factor"}}, "required": ["a", "b"]},
        "return": {"type": "integer"}}}
    assert tool_schema(calculate)["function"]["parameters"]["properties"]["expression"]["type"] == "string"


# --- ToolEnvironment ----------------------------------------------------------------------------------

def call(name, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_tool_environment_runs_calls_and_ends_on_a_turn_without_one():
    env = ToolEnvironment([multiply], system="be brief", score=lambda text, row: float(text == row["answer"]))
    assert isinstance(env, Environment)
    assert env.reset({"prompt": "6*7?", "answer": "42"}) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "6*7?"}]
    obs = env.step(call("multiply", a=6, b=7) + call("multiply", a=2, b=3))
    assert obs == Observation([{"role": "tool", "name": "multiply", "content": "42"},
                               {"role": "tool", "name": "multiply", "content": "6"}])
    assert env.step("42") == Done(1.0) and env.step("41") == Done(0.0)
    assert dict(env.counts) == {"calls": 2}
    assert ToolEnvironment([multiply]).step("42") == Done(None)  # no score: the task's rewards decide


def test_every_kind_of_failed_call_becomes_an_observation_and_is_counted():
    env = ToolEnvironment([multiply, divide])
    env.reset({"prompt": "?"})
    obs = env.step("<tool_call>{oops</tool_call>" + call("power", a=2, b=3) + call("multiply", a=2)
                   + call("multiply", x=1, y=2) + call("divide", a=1, b=0) + call("divide", a=1, b=4))
    contents = [m["content"] for m in obs.messages]
    assert contents[0].startswith("error: malformed tool call: the call is not valid JSON")
    assert contents[1] == "error: unknown tool 'power'; tools: multiply, divide"
    assert contents[2].startswith("error: multiply: missing a required argument: 'b'")
    assert contents[3].startswith("error: multiply: ")
    assert contents[4] == "error: divide raised ZeroDivisionError: division by zero"
    assert contents[5] == "0.25"
    assert dict(env.counts) == {"calls": 6, "malformed": 1, "unknown_tool": 1, "bad_arguments": 2, "raised": 1}


def test_calls_past_the_turns_limit_are_refused_and_counted():
    env = ToolEnvironment([multiply], max_calls_per_turn=2)
    env.reset({"prompt": "?"})
    obs = env.step("".join(call("multiply", a=k, b=10) for k in range(1, 5)))
    # the first two run (10, 20); the other two are answered with an error, not run
    assert [m["content"] for m in obs.messages] == ["10", "20"] + ["error: not run: at most 2 tool calls per turn"] * 2
    assert dict(env.counts) == {"calls": 4, "refused": 2}
    assert len(env.step(call("multiply", a=1, b=1) * 2).messages) == 2  # the limit is per turn


def test_limit_tool_calls_reaches_a_tool_environment_and_one_held_inside_another():
    class Holder:
        def __init__(self):
            self.toolbox = ToolEnvironment([multiply])

    direct, holder = ToolEnvironment([multiply]), Holder()
    for env in (direct, holder, object()):  # an environment with no tools is left as it is
        limit_tool_calls(env, 3)
    assert direct.max_calls_per_turn == 3 and holder.toolbox.max_calls_per_turn == 3


# --- the calculator and the factory -------------------------------------------------------------------

def test_calculator_evaluates_integer_arithmetic_only():
    assert calculate("(12+30)*2") == "84" and calculate("-7//2") == "-4" and calculate("17 % 5") == "2"
    for bad in ("__import__('os')", "2**10", "1.5+1", "x+1"):
        with pytest.raises(ValueError, match="unsupported"):
            calculate(bad)
    with pytest.raises(ValueError, match="out of range"):
        calculate("10000000*10000000")


def test_factory_makes_a_fresh_environment_per_call():
    make = environment_factory("calculator")
    a, b = make(), make()
    assert a is not b and [fn.__name__ for fn in a.tools] == ["calculate"]
    a.reset({"prompt": "1+1="})
    a.step(call("calculate", expression="1+1"))
    assert a.counts["calls"] == 1 and b.counts["calls"] == 0  # episodes never share state
    made = environment_factory("grpo.envs.tools:ToolEnvironment", {"tools": [multiply], "system": "s"})()
    assert made.system == "s" and made.tools == [multiply]
    with pytest.raises(ValueError, match="unknown environment 'nope'. Known: calculator, .*python"):
        environment_factory("nope")


def test_factory_finds_an_entry_point(monkeypatch):
    point = md.EntryPoint(name="calc2", value="grpo.envs.calculator:calculator_environment", group=ENTRY_POINT_GROUP)
    monkeypatch.setattr(md, "entry_points", lambda group: [point] if group == ENTRY_POINT_GROUP else [])
    assert [fn.__name__ for fn in environment_factory("calc2", {"system": "s"})().tools] == ["calculate"]
    with pytest.raises(ValueError, match="calc2, calculator"):
        environment_factory("nope")


# --- rendering a turn's new text ----------------------------------------------------------------------

def test_minimal_template_renders_roles_tools_and_the_next_header():
    tok = build_char_tokenizer()
    messages = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "x"},
                {"role": "tool", "name": "calculate", "content": "3"}]
    assert render(tok, messages[:1], [tool_schema(calculate)]) == "<tools>calculate</tools><user>1+2=<eos><assistant>"
    assert render(tok, messages) == "<user>1+2=<eos><assistant>x<eos><tool>3<eos><assistant>"


def test_environment_text_is_what_follows_the_models_own_tokens():
    # minimal template: the model's turn "x" ended with its EOS, which it sampled itself
    context = "<user>1+2=<eos><assistant>"
    rendered = "<user>1+2=<eos><assistant>x<eos><tool>3<eos><assistant>"
    assert environment_text(context, "x", rendered, ended_with="<eos>") == "<tool>3<eos><assistant>"
    assert environment_text(context, "x", rendered) == "<eos><tool>3<eos><assistant>"  # stopped without EOS
    # Qwen2.5's layout: the template's "\n" after <|im_end|> is not the model's, so it is the environment's
    qwen_context = "<|im_start|>user\n6*7?<|im_end|>\n<|im_start|>assistant\n"
    turn = '<tool_call>\n{"name": "multiply", "arguments": {"a": 6, "b": 7}}\n</tool_call>'
    qwen_rendered = (qwen_context + turn + "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response>"
                     "<|im_end|>\n<|im_start|>assistant\n")
    assert environment_text(qwen_context, turn, qwen_rendered, ended_with="<|im_end|>") == (
        "\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_environment_text_refuses_a_template_that_rewrites_the_conversation():
    with pytest.raises(ValueError, match="changed its beginning"):
        environment_text("<user>a<eos><assistant>", "x", "<user>A<eos><assistant>x<eos><assistant>")
    with pytest.raises(ValueError, match="not rendered verbatim"):
        environment_text("<user>a<eos><assistant>", "x y", "<user>a<eos><assistant>x<eos><assistant>")


class TrimmingTokenizer:
    """The char tokenizer under a template that strips each message's content, as some models' templates do."""

    def __init__(self):
        self.tok = build_char_tokenizer()
        self.chat_template = MINIMAL_TEMPLATE.replace("{{ m.content }}", "{{ m.content | replace('.', '') }}")

    def apply_chat_template(self, *args, **kwargs):
        kwargs["chat_template"] = self.chat_template
        return self.tok.apply_chat_template(*args, **kwargs)


def test_check_chat_template_passes_the_minimal_template_and_names_the_model_of_one_that_alters_a_turn():
    check_chat_template(build_char_tokenizer(), "tiny")  # renders every turn verbatim
    with pytest.raises(ConfigError, match=r"model.path: /models/x: its chat template cannot run multi-turn "
                                          r"episodes \(env.name\): ValueError: .*not rendered verbatim"):
        check_chat_template(TrimmingTokenizer(), "/models/x")


# --- the README's example -----------------------------------------------------------------------------

def readme_environment() -> str:
    """The Python block of the README's section "Your own environment in twenty lines"."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Your own environment in twenty lines", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_readmes_environment_runs(tmp_path, monkeypatch):
    code = readme_environment()
    assert len(code.splitlines()) <= 20  # as the heading says
    (tmp_path / "my_env.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    make = environment_factory("my_env:GuessNumber")
    env = make()
    assert isinstance(env, Environment)
    assert tool_schema(env.tools[0])["function"]["parameters"]["properties"] == {
        "guess": {"type": "integer", "description": "the number to compare"}}
    assert env.reset({"prompt": "unused", "answer": "42"}) == [{"role": "user", "content": "Guess my number."}]
    assert env.step(call("compare", guess=40) + call("compare", guess="x")) == Observation([
        {"role": "tool", "name": "compare", "content": "higher"},
        {"role": "tool", "name": "compare", "content": "error: compare raised TypeError: '<' not supported between "
                                                       "instances of 'str' and 'int'"}])
    assert env.step("42") == Done(1.0) and env.step("41") == Done(0.0)
    assert dict(env.counts) == {"calls": 2, "raised": 1}
    other = make()
    other.reset({"prompt": "unused", "answer": "7"})
    assert other.step(call("compare", guess=9)).messages[0]["content"] == "lower" and other.counts["calls"] == 1
