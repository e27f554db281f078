"""Problem keys (`problem_key`, carried into eval_outcomes.jsonl): the same problem has the same key in the test
split and in the paraphrase splits (`spaced`, `question`), different problems have different keys, for the
built-in task, reasoning-gym rows and data files alike."""

from __future__ import annotations

import pytest

from grpo.builtin.arithmetic import Arithmetic
from grpo.data.loading import format_row, load_ood_splits, load_task, load_val_split
from grpo.data.reasoning_gym import ReasoningGym
from grpo.errors import ConfigError
from grpo.training.run import resolve_model_path
from tests.conftest import compose


def one_key_per_prompt(rows: list[dict]) -> None:
    """Prompt -> key is one to one over `rows`: equal prompts share a key, different ones never do."""
    pairs = {(r["prompt"], r["problem_key"]) for r in rows}
    assert len(pairs) == len({p for p, _ in pairs}) == len({k for _, k in pairs})


def test_an_arithmetic_problem_is_keyed_by_its_operands_in_plain_decimal():
    # 37 + 50 reversed and zero-padded is written "73+05=", its sum 87 as "78"; the key reads as the problem
    assert Arithmetic(digits=2).row(37, 50) == {"prompt": "73+05=", "answer": "78", "overflow": False,
                                                "problem_key": "37+50"}
    assert Arithmetic(digits=2, op="*", digits_b=1).row(12, 7)["problem_key"] == "12*7"
    assert Arithmetic(digits=2, reverse=False).row(5, 7)["problem_key"] == "5+7"  # written "05+07="


def test_the_paraphrase_splits_share_their_problems_keys_with_the_test_split():
    cfg = compose(["task.arithmetic.num_eval=500", "task.arithmetic.num_ood=200", "task.arithmetic.num_val=200"])
    train, test = load_task(cfg.task, set())  # the rows the evaluator sees, through format_row
    val, ood = load_val_split(cfg.task, set()), load_ood_splits(cfg.task, set())
    spaced, question = ood["spaced"], ood["question"]
    # the two paraphrases phrase the same held-out problems, in the same order
    assert [r["problem_key"] for r in spaced] == [r["problem_key"] for r in question]
    by_key = {r["problem_key"]: r for r in test}
    shared = [(by_key[s["problem_key"]], s, q) for s, q in zip(spaced, question) if s["problem_key"] in by_key]
    assert len(shared) >= 10  # about 200 * 500 / 2000 expected: the held-out pool holds ~2000 problems
    for t, s, q in shared:  # the same problem, whatever its key says: "73 + 05 =" and "what is 73+05?" are "73+05="
        assert s["prompt"].replace(" ", "") == t["prompt"]
        assert q["prompt"].removeprefix("what is ").removesuffix("?") + "=" == t["prompt"]
        assert s["answer"] == q["answer"] == t["answer"]
    # different problems, different keys: over every split of new problems (train, test, val, longer), and within
    # each paraphrase (a paraphrase whose key is a test problem's is that problem: checked above)
    one_key_per_prompt(train + test + val + ood["longer"])
    one_key_per_prompt(spaced)
    one_key_per_prompt(question)


def test_reasoning_gym_rows_are_keyed_by_dataset_and_question():
    splits = ReasoningGym(["chain_sum", "leg_counting"], size=20, num_eval=5, num_val=5).splits()
    rows = splits["train"] + splits["test"] + splits["val"]  # no question stands in two splits
    one_key_per_prompt(rows)
    assert all(r["problem_key"].startswith(f"{r['rg_dataset']}:") for r in rows)
    again = ReasoningGym(["chain_sum", "leg_counting"], size=20, num_eval=5, num_val=5).splits()["test"]
    assert [r["problem_key"] for r in again] == [r["problem_key"] for r in splits["test"]]  # stable


def test_a_data_files_row_keeps_its_own_key_or_is_keyed_by_its_prompt():
    task = compose([]).task
    fmt = lambda row, i=0: format_row(row, task, "data.jsonl", i)  # noqa: E731
    # no key of its own: a digest of the prompt as decontamination compares it (case and spacing aside)
    a, a_spaced, b = fmt({"prompt": "What is 2+3?"}), fmt({"prompt": "what is 2 + 3 ?"}), fmt({"prompt": "2+4"})
    assert a["problem_key"].startswith("prompt:") and a["problem_key"] == a_spaced["problem_key"]
    assert b["problem_key"] != a["problem_key"]
    # a paraphrase file names its problems: the key travels unchanged
    assert fmt({"prompt": "two plus three", "problem_key": "2+3"})["problem_key"] == "2+3"
    with pytest.raises(ConfigError, match=r"data.jsonl: row 4, column 'problem_key': expected non-empty text"):
        fmt({"prompt": "2+3", "problem_key": 7}, 4)


def test_the_question_style_writes_plain_numbers_and_keeps_the_key():
    # "What is 7 + 5?": no zero padding, most significant digit first; the same problem as the compact "07+05="
    q = Arithmetic(digits=2, reverse=False, style="question")
    assert q.row(7, 5) == {"prompt": "What is 7 + 5?", "answer": "12", "overflow": False, "problem_key": "7+5"}
    assert q.row(7, 5)["problem_key"] == Arithmetic(digits=2, reverse=False).row(7, 5)["problem_key"]
    assert q.ood_splits(3)["longer"][0]["prompt"].startswith("What is ")  # the longer split asks the same way
    with pytest.raises(ValueError, match="reverse=false"):
        Arithmetic(style="question")  # reversed digits in a question a person reads: refused
    with pytest.raises(ConfigError, match="task.arithmetic.reverse=false"):
        compose(["task.arithmetic.style=question"]).validate()
    with pytest.raises(ConfigError, match="task.arithmetic.style"):
        compose(["task.arithmetic.style=prose", "task.arithmetic.reverse=false"]).validate()
    with pytest.raises(ConfigError, match="built-in preference pairs are written in the compact style"):
        compose(["algorithm=dpo", "task.arithmetic.style=question", "task.arithmetic.reverse=false"])
    with pytest.raises(ConfigError, match="warm start reads the compact style only"):  # before any training
        resolve_model_path(compose(["task.arithmetic.style=question", "task.arithmetic.reverse=false"]))
