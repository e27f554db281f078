"""The built-in arithmetic task: `a+b=` -> the sum, generated in code.

Problems are split into train and held-out sets by a fixed hash of the operands, so the
held-out problems are never seen in warm start or GRPO, whatever the seed.

The warm start imitates an imperfect teacher (`carry_error`): on problems whose units digits
carry, the teacher forgets the carry that often. A model trained on it puts the wrong answer
at the top of its distribution on carry problems while still sampling the right one now and
then, which is the situation RL with a verifiable reward exists for: the reward can take the
policy past its demonstrator, and the held-out accuracy shows whether it did.
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


def has_carry(a: int, b: int) -> bool:
    return (a % 10) + (b % 10) >= 10


def teacher_answer(a: int, b: int, carry_error: float, rng: random.Random) -> int:
    """The sum, except that on carry problems the carry is forgotten with probability `carry_error`."""
    if has_carry(a, b) and rng.random() < carry_error:
        return a + b - 10
    return a + b


def write(n: int, reverse: bool) -> str:
    """A number in decimal, least significant digit first when `reverse`."""
    return str(n)[::-1] if reverse else str(n)


@dataclass
class Arithmetic:
    """Addition of two numbers of up to `digits` digits.

    With `reverse` every number is written least significant digit first ("37" is 73): the
    order in which a person adds, so each answer digit depends only on the digits already
    read and the carry. A small model learns that order many times faster than the usual one.
    """

    digits: int = 2
    num_eval: int = 500
    reverse: bool = True
    seed: int = 0

    def _problems(self, held_out: bool) -> list[tuple[int, int]]:
        n = 10**self.digits
        return [(a, b) for a in range(n) for b in range(n) if is_held_out(a, b) == held_out]

    def prompt(self, a: int, b: int) -> str:
        return f"{write(a, self.reverse)}+{write(b, self.reverse)}="

    def row(self, a: int, b: int) -> dict:
        return {"prompt": self.prompt(a, b), "answer": write(a + b, self.reverse), "carry": has_carry(a, b)}

    def train_rows(self) -> list[dict]:
        return [self.row(a, b) for a, b in self._problems(held_out=False)]

    def eval_rows(self) -> list[dict]:
        problems = self._problems(held_out=True)
        random.Random(self.seed).shuffle(problems)
        return [self.row(a, b) for a, b in problems[: self.num_eval]]

    def teacher_texts(self, num: int, carry_error: float, seed: int) -> list[tuple[str, str]]:
        """`num` (prompt, completion) pairs from the imperfect teacher, train problems only."""
        rng = random.Random(seed)
        problems = self._problems(held_out=False)
        pairs = []
        for _ in range(num):
            a, b = rng.choice(problems)
            pairs.append((self.prompt(a, b), write(teacher_answer(a, b, carry_error, rng), self.reverse)))
        return pairs
