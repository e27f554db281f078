"""Out-of-distribution evaluation: split contents, and the pooled accuracy and gap worked out by hand."""

from __future__ import annotations

from grpo.builtin.arithmetic import Arithmetic
from grpo.rollout import Completions
from grpo.training import evaluate
from grpo.training.evaluate import evaluate_splits
from rewards import RewardScorer, RewardSpec


class AnswerBook:
    """A rollout engine that answers from a dict (prompt -> completion): the harness, not a model, is tested."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def generate(self, prompts, n, *, greedy=False):
        texts = [self.answers.get(p, "x") for p in prompts for _ in range(n)]
        return Completions(prompt_ids=[[0]] * len(prompts), completion_ids=[[0]] * len(texts), texts=texts,
                           truncated=[False] * len(texts))

    def sync_weights(self, model) -> float:
        return 0.0


def test_pooled_ood_accuracy_and_gap_by_hand():
    rows = lambda *pa: [{"prompt": p, "answer": a} for p, a in pa]  # noqa: E731
    eval_rows = rows(("e1", "1"), ("e2", "2"), ("e3", "3"), ("e4", "4"))  # 3 of 4 right: 0.75
    ood = {"a": rows(("a1", "1"), ("a2", "2")),  # 1 of 2 right
           "b": rows(("b1", "1"), ("b2", "2"), ("b3", "3"), ("b4", "4"))}  # 0 of 4 right
    engine = AnswerBook({"e1": "1", "e2": "2", "e3": "3", "a1": "1"})
    scorer = RewardScorer([RewardSpec("math_accuracy", 1.0, {})])
    m = evaluate_splits(engine, scorer, eval_rows, ood, "math_accuracy")
    # pooled over rows, not averaged over splits: (1 + 0) / (2 + 4) = 1/6; gap 0.75 - 1/6
    assert m["eval/accuracy"] == 0.75 and m["eval/ood/a_accuracy"] == 0.5 and m["eval/ood/b_accuracy"] == 0.0
    assert abs(m["eval/ood_accuracy"] - 1 / 6) < 1e-12
    assert abs(m["eval/generalization_gap"] - (0.75 - 1 / 6)) < 1e-12


def test_format_is_reported_beside_accuracy_right_or_wrong():
    rows = [{"prompt": p, "answer": a} for p, a in (("e1", "1"), ("e2", "2"), ("e3", "3"), ("e4", "4"))]
    # e1 bare and right, e2 right in a sentence, e3 bare and wrong, e4 neither
    engine = AnswerBook({"e1": "1", "e2": "It is 2", "e3": "5", "e4": "I do not know"})
    scorer = RewardScorer([RewardSpec("math_accuracy", 1.0, {"answer_pattern": "(-?[0-9]+)"}),
                           RewardSpec("format", 1.0, {"pattern": "-?[0-9]+"})])
    m = evaluate_splits(engine, scorer, rows, {}, "math_accuracy", format_reward="format")
    assert (m["eval/accuracy"], m["eval/format"]) == (0.5, 0.5)  # right: e1, e2; bare numbers: e1, e3
    assert "eval/format" not in evaluate_splits(engine, scorer, rows, {}, "math_accuracy")


def test_arithmetic_ood_splits():
    task = Arithmetic(digits=2, reverse=True)
    splits = task.ood_splits(50)
    assert {k: len(v) for k, v in splits.items()} == {"longer": 50, "spaced": 50, "question": 50}
    # 3-digit operands at width 3, reversed: "123+456=" is written "321+654=", answer 579 -> "975"
    row = Arithmetic(digits=3, reverse=True).row(123, 456)
    assert row == {"prompt": "321+654=", "answer": "975", "overflow": False, "problem_key": "123+456"}
    assert all(len(r["prompt"]) == 8 for r in splits["longer"])
    assert all(r["prompt"].startswith("what is ") and r["prompt"].endswith("?") for r in splits["question"])
    trained = {r["prompt"] for r in task.train_rows()}
    spaced = {r["prompt"].replace(" ", "") for r in splits["spaced"]}
    assert spaced and not spaced & trained  # held-out problems: only the phrasing differs from eval/accuracy's


def test_outcomes_of_several_ranks_interleave_back_into_the_splits_row_order(monkeypatch):
    # 5 test rows on 2 ranks: rank 0 evaluated rows 0, 2, 4 (solved 0 and 4), rank 1 rows 1, 3 (solved 3);
    # the val split has one row, on rank 0
    ranks = [{"test": [True, False, True], "val": [True]}, {"test": [False, True]}]
    monkeypatch.setattr(evaluate.dist, "all_gather_objects", lambda mine: ranks)
    assert evaluate.solved_bits(ranks[0]) == {"test": "10011", "val": "1"}
