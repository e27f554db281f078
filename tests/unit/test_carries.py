"""The carries habit of the built-in task (the comparison task): carries counted, forgotten and split, by hand."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from grpo.builtin.arithmetic import Arithmetic, carries, sum_dropping_carries, teacher_answer, teacher_mode
from grpo.config import TaskConfig, WarmStartConfig
from grpo.errors import ConfigError


@pytest.mark.parametrize(("a", "b", "count"), [
    (12, 34, 0),    # 2 + 4, 1 + 3: no column reaches 10
    (5, 5, 1),      # 5 + 5 = 10: one carry, into a new leading digit
    (57, 68, 2),    # 7 + 8 = 15, 5 + 6 + 1 = 12
    (99, 1, 2),     # 9 + 1 = 10, 9 + 0 + 1 = 10: the second carry comes from the first alone
    (45, 55, 2),    # 5 + 5 = 10, 4 + 5 + 1 = 10
    (50, 50, 1),    # 0 + 0, 5 + 5 = 10
    (999, 1, 3),
    (0, 0, 0),
])
def test_carries_are_counted_column_by_column(a, b, count):
    assert carries(a, b) == count


def test_a_sum_forgets_only_the_carries_it_is_told_to():
    assert sum_dropping_carries(57, 68, lambda: True) == 125
    assert sum_dropping_carries(57, 68, lambda: False) == 15     # 7+8 -> 5, 5+6 -> 1, no leading 1
    first_only = iter([True, False])                           # keeps the units' carry, forgets the tens'
    assert sum_dropping_carries(57, 68, lambda: next(first_only)) == 25  # 5, 5+6+1 = 12 -> 2, nothing more
    first_lost = iter([False, True])                           # 99+1: the units' carry forgotten: no second one
    assert sum_dropping_carries(99, 1, lambda: next(first_lost)) == 90


def test_the_carries_teacher_forgets_each_carry_on_its_own_draw():
    rng = random.Random(0)
    answers = Counter(teacher_answer(57, 68, 2, 0.7, rng, drops="carries") for _ in range(20000))
    # keep = 0.3: 125 both kept (0.09), 25 units kept, tens forgotten (0.21), 115 the other way (0.21), 15 (0.49)
    share = {k: v / 20000 for k, v in answers.items()}
    assert set(share) == {125, 25, 115, 15}
    for value, p in ((125, 0.09), (25, 0.21), (115, 0.21), (15, 0.49)):
        assert abs(share[value] - p) < 0.015, (value, share[value])
    # the overflow teacher forgets only the leading digit
    assert Counter(teacher_answer(57, 68, 2, 0.7, rng) for _ in range(1000)).keys() == {125, 25}
    assert teacher_answer(12, 34, 2, 1.0, rng, drops="carries") == 46  # nothing to forget


def test_the_teachers_mode_forgets_every_carry_only_when_it_mostly_does():
    assert teacher_mode(57, 68, 2, 0.7, "carries") == 15
    assert teacher_mode(57, 68, 2, 0.7, "overflow") == 25
    assert teacher_mode(57, 68, 2, 0.3, "carries") == 125
    assert teacher_mode(99, 1, 2, 0.7, "carries") == 90


def test_max_carries_keeps_harder_sums_out_of_every_split_and_in_the_carries_split():
    task = Arithmetic(digits=2, max_carries=1, num_eval=300)
    train, held = task.train_problems(), task.held_out_problems()
    assert all(carries(a, b) <= 1 for a, b in train + held)
    # 2-digit sums: 3,025 make no carry, 4,500 one, 2,475 two; held out by the operands' hash, one in five
    assert len(train) + len(held) == 3025 + 4500
    every = Arithmetic(digits=2)
    assert set(train) == {p for p in every.train_problems() if carries(*p) <= 1}
    rows = task.eval_rows() + task.val_rows(100)
    assert all(carries(*map(int, r["problem_key"].split("+"))) <= 1 for r in rows)
    splits = task.ood_splits(200)
    assert list(splits) == ["longer", "carries", "spaced", "question"]
    harder = [tuple(map(int, r["problem_key"].split("+"))) for r in splits["carries"]]
    assert len(set(harder)) == 200 and all(carries(a, b) == 2 for a, b in harder)
    assert splits["carries"][0] == task.row(*harder[0])  # written as the trained problems are: only the sum is new
    assert list(task.ood_splits(10, ("carries",))) == ["carries"]


def test_the_carries_split_exists_only_with_max_carries():
    assert "carries" not in Arithmetic().ood_splits(5)
    with pytest.raises(ValueError, match="carries"):
        Arithmetic().ood_splits(5, ("carries",))
    with pytest.raises(ValueError, match="op"):
        Arithmetic(op="*", max_carries=1)


@pytest.mark.parametrize(("settings", "message"), [
    ({"max_carries": -1}, "task.arithmetic.max_carries"),
    ({"op": "*", "max_carries": 1}, "task.arithmetic.max_carries"),
    ({"ood_splits": ["longest"]}, "task.arithmetic.ood_splits"),
    ({"ood_splits": ["carries"]}, "task.arithmetic.ood_splits"),  # no max_carries: nothing to hold out
])
def test_a_bad_carries_setting_is_refused_with_its_name(settings, message):
    task = TaskConfig()
    for key, value in settings.items():
        setattr(task.arithmetic, key, value)
    with pytest.raises(ConfigError, match=message):
        task.validate()


def test_an_unknown_teacher_habit_is_refused_with_its_name():
    with pytest.raises(ConfigError, match="model.warm_start.drops"):
        WarmStartConfig(drops="borrows").validate()
