"""The built-in arithmetic task: `a+b=` -> the sum (or `a*b=` -> the product), generated in code.

Problems are split into train and held-out sets by a fixed hash of the operands, so the
held-out problems are never seen in warm start or GRPO, whatever the seed.

The warm start imitates an imperfect teacher (`drop_carry`): when a sum overflows into a new
leading digit (57+68=125), the teacher drops that digit that often (writes 25). A model trained
on it learns the digit-by-digit algorithm from the teacher, and also the teacher's habit: on
overflowing sums its most likely answer is the wrong one, while the right one is still sampled
now and then. That is the situation RL with a verifiable reward exists for: the reward can take
the policy past its demonstrator, and the held-out accuracy shows whether it did.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass


def is_held_out(a: int, b: int) -> bool:
    """One problem in five is held out, chosen by a fixed hash of the operands.

    A cryptographic hash, because any linear rule in a and b would hold out a structured
    slice (e.g. all sums divisible by 5) that the training set never shows.
    """
    return hashlib.blake2b(f"{a}+{b}".encode(), digest_size=4).digest()[0] % 5 == 0


def overflows(a: int, b: int, digits: int) -> bool:
    """The sum has one digit more than the operands may have."""
    return a + b >= 10**digits


def carries(a: int, b: int) -> int:
    """How many carries the column addition of a + b makes, the one into a new leading digit included."""
    count, carry = 0, 0
    while a or b or carry:
        carry = int(a % 10 + b % 10 + carry >= 10)
        count += carry
        a, b = a // 10, b // 10
    return count


def sum_dropping_carries(a: int, b: int, keep) -> int:
    """Column addition of a + b where each carry is passed on only if `keep()` says so (called once per carry)."""
    total, place, carry = 0, 1, 0
    while a or b or carry:
        column = a % 10 + b % 10 + carry
        total += column % 10 * place
        carry = int(column >= 10 and keep())
        a, b, place = a // 10, b // 10, place * 10
    return total


DROPS = ("overflow", "carries")  # which of its carries the answering teacher forgets (`teacher_answer`)


def teacher_answer(a: int, b: int, digits: int, drop_carry: float, rng: random.Random,
                   drops: str = "overflow") -> int:
    """The sum, except that the teacher forgets a carry with probability `drop_carry`: with `drops="overflow"`
    only the one into a new leading digit (it writes 25 for 57+68); with "carries" each carry, on its own draw
    (it writes 15 for 57+68 when it forgets both)."""
    if drops == "carries":
        return sum_dropping_carries(a, b, keep=lambda: rng.random() >= drop_carry)
    if overflows(a, b, digits) and rng.random() < drop_carry:
        return a + b - 10**digits
    return a + b


def teacher_mode(a: int, b: int, digits: int, drop_carry: float, drops: str = "overflow") -> int:
    """The teacher's most likely answer: the sum, or, when it forgets more often than not, the sum without the
    carries it forgets (`teacher_answer`)."""
    if drop_carry <= 0.5:
        return a + b
    if drops == "carries":
        return sum_dropping_carries(a, b, keep=lambda: False)
    return a + b - 10**digits if overflows(a, b, digits) else a + b


def calls_calculator(a: int, b: int, digits_b: int) -> bool:
    """The tool-use teacher's habit (`grpo.builtin.warmstart`, kind "tools"): it reaches for the calculator mostly when
    the second factor is the larger kind (leading digit 5-9), and mostly answers in its head otherwise."""
    return b >= 5 * 10 ** (digits_b - 1)


def write(n: int, reverse: bool, width: int = 0) -> str:
    """A number in decimal, zero-padded to `width`, least significant digit first when `reverse`."""
    text = str(n).zfill(width)
    return text[::-1] if reverse else text


OPERATIONS = {"+": lambda a, b: a + b, "*": lambda a, b: a * b}


OOD_SPLITS = ("longer", "carries", "spaced", "question")  # the names `Arithmetic.ood_splits` can return
STYLES = ("compact", "question")  # how a problem is written in its prompt (`Arithmetic.prompt`)


@dataclass
class Arithmetic:
    """Addition of two numbers of up to `digits` digits, or (`op="*"`) multiplication of a `digits`-digit
    number by a `digits_b`-digit one, both written without leading zeros (so that the product can be
    handed to a calculator as it is written: Python reads no "012").

    With `reverse` every number is written least significant digit first ("37" is 73): the
    order in which a person adds, so each answer digit depends only on the digits already
    read and the carry. A small model learns that order many times faster than the usual one.
    """

    digits: int = 2
    num_eval: int = 500
    reverse: bool = True
    seed: int = 0
    op: str = "+"
    digits_b: int = 0  # the second operand's digits; 0: `digits`
    style: str = "compact"  # "compact": "37+08="; "question": "What is 37 + 8?" (for chat models)
    max_carries: int | None = None  # sums making more carries are never trained or tested on: the `carries` split

    def __post_init__(self):
        if self.op not in OPERATIONS:
            raise ValueError(f"arithmetic: op {self.op!r} is not one of {', '.join(OPERATIONS)}")
        if self.style not in STYLES:
            raise ValueError(f"arithmetic: style {self.style!r} is not one of {', '.join(STYLES)}")
        if self.style == "question" and self.reverse:
            raise ValueError("arithmetic: style 'question' writes numbers as people do; it needs reverse=false")
        if self.max_carries is not None and self.op != "+":
            raise ValueError("arithmetic: max_carries counts the carries of a sum; it needs op '+'")
        self.digits_b = self.digits_b or self.digits

    def operands(self, digits: int) -> range:
        """Addition: 0 to 10**digits - 1 (zero-padded in the prompt); multiplication: exactly `digits` digits."""
        return range(10 ** (digits - 1), 10**digits) if self.op == "*" else range(10**digits)

    def result(self, a: int, b: int) -> int:
        return OPERATIONS[self.op](a, b)

    def in_distribution(self, a: int, b: int) -> bool:
        """The problem is of the trained kind: no more carries than `max_carries` (every problem if None)."""
        return self.max_carries is None or carries(a, b) <= self.max_carries

    def _problems(self, held_out: bool) -> list[tuple[int, int]]:
        return [(a, b) for a in self.operands(self.digits) for b in self.operands(self.digits_b)
                if is_held_out(a, b) == held_out and self.in_distribution(a, b)]

    def train_problems(self) -> list[tuple[int, int]]:
        return self._problems(held_out=False)

    def held_out_problems(self) -> list[tuple[int, int]]:
        return self._problems(held_out=True)

    def prompt(self, a: int, b: int) -> str:
        """Compact: operands zero-padded to `digits`, so digit i of each always stands at the same place.
        Question: the plain question a chat model is asked, no padding."""
        if self.style == "question":
            return f"What is {a} {self.op} {b}?"
        return f"{write(a, self.reverse, self.digits)}{self.op}{write(b, self.reverse, self.digits_b)}="

    def row(self, a: int, b: int) -> dict:
        """The problem's row; `problem_key` names the problem by its operands in plain decimal ("37+50"), the same
        in every phrasing of it (`ood_splits`' `spaced` and `question` rows keep it)."""
        return {"prompt": self.prompt(a, b), "answer": write(self.result(a, b), self.reverse),
                "overflow": self.op == "+" and overflows(a, b, self.digits), "problem_key": f"{a}{self.op}{b}"}

    def train_rows(self) -> list[dict]:
        return [self.row(a, b) for a, b in self._problems(held_out=False)]

    def eval_rows(self) -> list[dict]:
        """The first `num_eval` held-out problems in a fixed shuffled order: the test split."""
        return [self.row(a, b) for a, b in self._shuffled_held_out()[: self.num_eval]]

    def val_rows(self, num: int) -> list[dict]:
        """The `num` held-out problems after the test split's: a validation split that shares none of them."""
        problems = self._shuffled_held_out()[self.num_eval :]
        if num > len(problems):
            raise ValueError(f"{num} validation problems asked for; {len(problems)} held-out problems are left "
                             f"after the {self.num_eval} of the test split")
        return [self.row(a, b) for a, b in problems[:num]]

    def _shuffled_held_out(self) -> list[tuple[int, int]]:
        problems = self._problems(held_out=True)
        random.Random(self.seed).shuffle(problems)
        return problems

    def ood_splits(self, num: int, names: tuple[str, ...] | None = None) -> dict[str, list[dict]]:
        """Out-of-distribution splits, `num` problems each, never trained on (`names`, or every one that applies):

        - `longer`: operands one digit longer than trained on (3-digit for the 2-digit task), written at
          the longer width: the same algorithm over more positions than the model has seen;
        - `carries` (only with `max_carries`): sums of the trained width that make more carries than any
          trained on, e.g. 57+68 (two carries) for a model trained on sums with at most one: the carry it
          learned, now in every column at once;
        - `spaced`: held-out problems phrased "a + b =" (spaces around the signs);
        - `question`: held-out problems phrased "what is a+b?".
        A char-level model trained only on "ab+cd=" meets new characters and new positions in each.
        """
        applies = tuple(n for n in OOD_SPLITS if n != "carries" or self.max_carries is not None)
        names = applies if names is None else tuple(names)
        unknown = [n for n in names if n not in applies]
        if unknown:
            raise ValueError(f"arithmetic: no out-of-distribution split {', '.join(unknown)} here; these apply: "
                             f"{', '.join(applies)}")
        rng = random.Random(self.seed + 1)
        d, db = self.digits, self.digits_b
        longer = Arithmetic(digits=d + 1, reverse=self.reverse, op=self.op, digits_b=db + 1, style=self.style)
        problems = [(rng.randint(10**d, 10 ** (d + 1) - 1), rng.randint(10**db, 10 ** (db + 1) - 1))
                    for _ in range(num)]
        held = self._problems(held_out=True)
        rng.shuffle(held)
        held = held[-num:]  # held-out problems (some also in eval_rows): only the phrasing is new
        w = lambda n, width=d: write(n, self.reverse, width)  # noqa: E731
        op = self.op
        splits = {
            "longer": lambda: [longer.row(a, b) for a, b in problems],
            "carries": lambda: [self.row(a, b) for a, b in self._more_carries(num, rng)],
            "spaced": lambda: [{**self.row(a, b), "prompt": f"{w(a)} {op} {w(b, db)} ="} for a, b in held],
            "question": lambda: [{**self.row(a, b), "prompt": f"what is {w(a)}{op}{w(b, db)}?"} for a, b in held],
        }
        return {name: splits[name]() for name in names}

    def _more_carries(self, num: int, rng: random.Random) -> list[tuple[int, int]]:
        """`num` problems (fewer if there are not so many) with more carries than `max_carries`, in a fixed order."""
        problems = [(a, b) for a in self.operands(self.digits) for b in self.operands(self.digits_b)
                    if not self.in_distribution(a, b)]
        rng.shuffle(problems)
        return problems[:num]
