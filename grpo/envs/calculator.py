"""The built-in environment: a calculator tool over the arithmetic task.

The model may call `calculate` any number of times before it answers; the episode ends at the first
turn without a tool call, and the task's reward functions (`math_accuracy`) score that turn.
"""

from __future__ import annotations

import ast
import operator

from grpo.envs.tools import ToolEnvironment

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
             ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_ABS = 10**12  # results beyond this are refused, so a call cannot build a huge number


def calculate(expression: str) -> str:
    """Evaluate an integer arithmetic expression.

    Args:
        expression: integers with + - * // % and parentheses, e.g. "(12+30)*2"
    """
    return str(evaluate(ast.parse(expression, mode="eval").body))


def evaluate(node: ast.AST) -> int:
    """The value of an expression tree of integer literals and `OPERATORS`; ValueError for anything else."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
        value = OPERATORS[type(node.op)](evaluate(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        value = OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
    else:
        raise ValueError(f"unsupported expression: {ast.unparse(node)}")
    if abs(value) > MAX_ABS:
        raise ValueError(f"result out of range (|x| > {MAX_ABS})")
    return value


def calculator_environment(system: str | None = None) -> ToolEnvironment:
    """One episode's environment: the `calculate` tool, the row's prompt as the user's message."""
    return ToolEnvironment([calculate], system=system)
