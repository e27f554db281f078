"""The slow path of ``math_accuracy``: symbolic equivalence with math-verify and sympy, in a worker process.

Run as ``python -m rewards.math_check`` by ``rewards.workers.DeadlinePool``; each request is
``{"answer": str, "gold": str}`` and the reply is ``true``/``false``, or ``null`` when the gold answer does not
parse to an expression (the sample is then skipped, never rewarded).

Three places where this is stricter than math-verify's ``verify``:

- an equation whose left side has no variable is a claim, and a false one is wrong: ``7 = 4`` is not 4
  (``x = 4`` and ``2 + 2 = 4`` still are), where math-verify compares its right side alone;
- a set is not an ordered pair or an interval: ``\\{1,2\\}`` is not ``(1,2)``, which math-verify accepts;
- two exact quantities (no variables, no decimals) are equal only when their difference is below ``1e-12`` of
  their size at 30 significant digits: math-verify's absolute tolerance calls ``2^{-100}`` and ``2^{-99}``
  (a factor of two) equal.

Both strings are parsed as LaTeX (the answer wrapped in ``\\boxed{}``), never evaluated as Python, so an
answer like ``__import__('os').system(...)`` is only ever a product of symbols. math-verify's own timeouts
(``signal.alarm``) are off: the pool kills a worker whose check runs past the deadline.
"""

from __future__ import annotations

import logging
from typing import Any

import sympy
from math_verify import LatexExtractionConfig, parse, verify

_LATEX_ONLY: Any = None


def check(request: dict[str, str]) -> bool | None:
    """True when ``answer`` equals ``gold`` (numbers, fractions, LaTeX, sets, intervals); None if gold won't parse."""
    gold = parse(_boxed(request["gold"]), _LATEX_ONLY, parsing_timeout=None)
    if all(isinstance(g, str) for g in gold):  # nothing or only the raw text came back: no expression
        return None
    answer = parse(_boxed(request["answer"]), _LATEX_ONLY, parsing_timeout=None)
    if not answer:
        return False
    exact_gold, exact_answer = _exact(gold), _exact(answer)
    if exact_gold is not None and exact_answer is not None:
        # Two exact numbers are equal or not; math-verify's numeric tolerance would call 1e-7 and 2e-7 equal.
        return exact_gold == exact_answer
    g, a = _first_expr(gold), _first_expr(answer)
    if isinstance(a, sympy.Equality) and not a.lhs.free_symbols and _same_number(a.lhs, a.rhs) is not True:
        return False  # "7 = 4": a false (or undecidable) claim about numbers, whatever its right side
    if _kind(g) != _kind(a) and "set" in (_kind(g), _kind(a)):
        return False
    same = _same_number(g, a)
    if same is not None:
        return same
    return bool(verify(gold, answer, timeout_seconds=None))


def _first_expr(parsed: list):
    return next((x for x in parsed if not isinstance(x, str)), None)


def _kind(expr) -> str:
    """"set" for a finite set, "ordered" for a tuple or an interval (math-verify reads "(1,2)" as one)."""
    if isinstance(expr, sympy.FiniteSet):
        return "set"
    if isinstance(expr, (sympy.Tuple, sympy.Interval, tuple)):
        return "ordered"
    return "other"


def _same_number(a, b) -> bool | None:
    """Whether two exact numbers (sympy expressions with no free symbol and no decimal) are equal; None when
    either is not one (a variable, a decimal, a set), so that math-verify decides."""
    exprs = (a, b)
    if not all(isinstance(e, sympy.Expr) and e.is_number and not e.atoms(sympy.Float) for e in exprs):
        return None
    x, y = (sympy.N(e, 30) for e in exprs)
    if not all(v.is_finite for v in (x, y)):
        return None
    return bool(abs(x - y) <= sympy.Float("1e-12", 30) * max(abs(x), abs(y)))


def _exact(parsed: list):
    """The parsed expression as an exact sympy Rational when it is a plain number (an integer, a fraction,
    a decimal as written), else None."""
    expr = next((x for x in parsed if not isinstance(x, str)), None)
    if isinstance(expr, sympy.Rational):  # Integer included
        return expr
    if isinstance(expr, sympy.Float):  # a decimal as written: 15 significant digits, exactly
        return sympy.Rational(str(expr))
    return None


def _boxed(text: str) -> str:
    return "\\boxed{" + text.replace("$", "") + "}"


def _prepare() -> None:
    global _LATEX_ONLY

    _LATEX_ONLY = [LatexExtractionConfig(boxed_match_priority=0)]
    # math-verify warns on every call that its own timeout is off; the pool's deadline replaces it.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    check({"answer": "\\frac{1}{2}", "gold": "0.5"})  # warm the parsers before reporting ready


if __name__ == "__main__":
    import sys

    from rewards.workers import report_startup_error, serve

    try:
        _prepare()
    except Exception as e:  # noqa: BLE001
        report_startup_error(e)
        sys.exit(1)
    memory_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    serve(check, memory_limit_mb=memory_mb)
