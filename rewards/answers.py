"""Final-answer extraction and the in-process numeric comparison (no sympy, no subprocess).

Extraction, in order (the first rule that applies decides; a later rule is not tried):

1. ``pattern`` given: the last match of that regex (group 1 if it has groups, else the whole match);
2. ``strict``: the last ``\\boxed{...}`` (or ``\\fbox{...}``); without one there is no answer;
3. otherwise the last ``\\boxed{...}`` if there is one, else the last GSM8K ``#### 42`` line, else the whole
   completion with trailing whitespace removed (the arithmetic task answers with the bare number: "57").
   A whole-completion answer is taken as written: "57 cm" or "x = 57" is not 57 there, while ``\\boxed{57 cm}``
   is (see ``normalize``).

Hedging never earns the reward: several boxes (or ``####`` lines) with different contents, or ``\\pm``, ``\\mp``,
``or`` inside the answer when the gold has none.

``quick_verdict`` settles most pairs without sympy: when the gold is a plain number (after stripping ``$``,
``%``, thousands commas and unit words), the answer is right only if it is the same number ("3.50" is 3.5),
and an answer made only of digits, letters and spaces that is not a number is wrong (letters would be free
symbols). An integer written with a leading zero on either side ("07") is a digit string and must match
exactly: the arithmetic task's reversed-digit answers ("07" is 70) depend on it.
Anything else is left to the math-verify/sympy workers (``rewards.math_check``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_LEADING_ZERO = re.compile(r"[+-]?0\d")
_SYMBOLS_ONLY = re.compile(r"[+-]?[A-Za-z0-9 .]*")
_VARIABLE_PREFIX = re.compile(r"^[A-Za-z]\s*=\s*(?=[^=]+$)")
_DIGIT_SPACE_DIGIT = re.compile(r"\d\s+\.?\d")
_HEDGES = re.compile(r"\\pm|\\mp|±|∓|\\lor\b|\\vee\b|\bor\b")
# Units stripped by rule when they follow a number: "10 cm", "5\text{ dollars}", "90^\circ".
_UNIT_WORDS = (
    "mm|cm|m|km|in|inch|inches|ft|feet|foot|yd|yard|yards|mile|miles|mi|g|kg|mg|lb|lbs|pound|pounds|oz|ounce|ounces|"
    "l|ml|liter|liters|litre|litres|gallon|gallons|s|sec|second|seconds|min|minute|minutes|h|hr|hrs|hour|hours|"
    "day|days|week|weeks|month|months|year|years|dollar|dollars|cent|cents|euro|euros|degree|degrees|percent|"
    "meter|meters|metre|metres|centimeter|centimeters|kilometer|kilometers|gram|grams|kilogram|kilograms|"
    "unit|units|square|sq|cubic|mph|km/h|m/s"
)
_TEXT_UNIT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{\s*(?:" + _UNIT_WORDS + r")(?:\s*\^?\{?\d\}?)?\s*\}")
_TRAILING_UNIT = re.compile(r"(?<=[\d}])\s+(?:" + _UNIT_WORDS + r")(?:\^?\{?[23]\}?)?\s*$")


@dataclass(frozen=True)
class Extraction:
    """The answer found in a completion (None: no answer) and whether the completion hedged."""

    answer: str | None
    source: str  # "pattern", "boxed", "gsm8k", "whole" or "none"
    hedged: bool = False


def boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, in order, with nested braces.

    A box whose braces never close is ignored. Linear in ``len(text)``.
    """
    out: list[str] = []
    i = 0
    while True:
        starts = [(text.find(cmd, i), cmd) for cmd in _BOX_COMMANDS]
        starts = [(pos, cmd) for pos, cmd in starts if pos >= 0]
        if not starts:
            return out
        pos, cmd = min(starts)
        j = pos + len(cmd)
        while j < len(text) and text[j] == " ":
            j += 1
        if j >= len(text) or text[j] != "{":
            i = pos + len(cmd)
            continue
        depth, k = 0, j
        while k < len(text):
            c = text[k]
            if c == "\\" and k + 1 < len(text) and text[k + 1] in "{}":
                k += 2  # an escaped brace \{ or \} (a set) does not open or close the box
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    break
            k += 1
        if depth != 0:
            return out  # unbalanced: nothing after this point can close a box either
        out.append(text[j + 1 : k])
        i = k + 1


def extract_answer(completion: str, *, pattern: str | re.Pattern[str] | None = None,
                   strict: bool = False) -> Extraction:
    """The final answer of ``completion`` under the rules in the module docstring."""
    if pattern is not None:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        matches = list(regex.finditer(completion))
        if not matches:
            return Extraction(None, "none")
        found = [m.group(1) if regex.groups else m.group(0) for m in matches]
        return Extraction(found[-1], "pattern", hedged=_distinct(found))
    boxes = boxed_contents(completion)
    if boxes:
        return Extraction(boxes[-1], "boxed", hedged=_distinct(boxes))
    if strict:
        return Extraction(None, "none")
    if "####" in completion:
        found = [m.group(1) for m in _GSM8K.finditer(completion)]
        return Extraction(found[-1], "gsm8k", hedged=_distinct(found))
    whole = completion.rstrip()
    return Extraction(whole if whole else None, "whole" if whole else "none")


def normalize(answer: str) -> str:
    """Strip what never changes the value: ``$``, ``\\%``, thousands commas, ``\\!``, unit words, a trailing period."""
    s = answer.strip()
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", " ")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = _VARIABLE_PREFIX.sub("", s)
    s = _TEXT_UNIT.sub("", s)
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    s = _TRAILING_UNIT.sub("", s).strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def plain_number(text: str) -> Decimal | None:
    """``text`` as a number when it is written as an integer or decimal ("42", "-7", "3.50", "1e3"), else None."""
    if len(text) > 400 or not _PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def quick_verdict(answer: str, gold: str) -> float | None:
    """1.0 or 0.0 when the pair can be judged without sympy, None when it needs the full checker.

    ``answer`` and ``gold`` are already normalized.
    """
    gold_number = plain_number(gold)
    if gold_number is None:
        return None
    number = plain_number(answer)
    if number is not None:
        if _LEADING_ZERO.match(answer) or _LEADING_ZERO.match(gold):
            # "07" is a digit string (the reversed-digits arithmetic task writes 70 as "07"): "7" is not it.
            return 1.0 if answer.lstrip("+") == gold.lstrip("+") else 0.0
        return 1.0 if number == gold_number else 0.0
    if _DIGIT_SPACE_DIGIT.search(answer):
        return 0.0  # "5 7" is not 57
    if _SYMBOLS_ONLY.fullmatch(answer):
        return 0.0  # "57abc", "the answer is 57": free symbols never equal a number
    return None


def hedges_inside(answer: str, gold: str) -> bool:
    """``\\pm``, ``\\mp`` or "or" in the answer, when the gold itself has none."""
    return bool(_HEDGES.search(answer)) and not _HEDGES.search(gold)


def _distinct(found: list[str]) -> bool:
    return len({" ".join(f.split()) for f in found}) > 1
