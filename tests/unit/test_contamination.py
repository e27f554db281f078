"""Train/eval overlap and deduplication, with counts worked out by hand."""

import json

import pytest

from grpo.data.contamination import decontaminate, deduplicate, ngrams, overlap
from grpo.errors import ConfigError
from grpo.training.run import build_scorers, load_rows
from tests.conftest import compose


def rows(*prompts):
    return [{"prompt": p} for p in prompts]


def test_ngrams_short_prompt_is_one_gram():
    assert ngrams("37 + 52 =", 8) == {("37", "+", "52", "=")}
    assert ngrams("a b c", 2) == {("a", "b"), ("b", "c")}


def test_deduplicate_normalises_spacing_and_case():
    kept, dropped = deduplicate(rows("37+52=", "37 + 52 =", "What is 1+1?", "what is 1 + 1 ?"))
    assert [r["prompt"] for r in kept] == ["37+52=", "What is 1+1?"] and dropped == 2


def test_overlap_by_hand():
    train = rows("the cat sat on the mat today", "12+34=")
    # "12 + 34 =" is train's second prompt spaced: exact. "the cat sat down" shares the 3-gram "the cat sat".
    # "99+1=" shares nothing. Exact 1/3, n-gram (n=3) 2/3.
    evals = rows("12 + 34 =", "the cat sat down", "99+1=")
    assert overlap(train, evals, 3) == {"exact_overlap": 1 / 3, "ngram_overlap": 2 / 3}


def test_decontaminate_drops_exact_overlap_and_reports_it():
    train, splits, report = decontaminate(rows("a+b=", "a+b=", "c+d="), {"eval": rows("a + b =", "e+f=", "e+f=")}, 8)
    assert [r["prompt"] for r in train] == ["a+b=", "c+d="]
    assert [r["prompt"] for r in splits["eval"]] == ["e+f="]
    assert report["train"]["duplicates_dropped"] == 1
    assert report["eval"] == {"rows": 1, "duplicates_dropped": 1, "exact_dropped": 1,
                              "exact_overlap": 0.5, "ngram_overlap": 0.5}


def test_decontaminate_can_keep_training_prompts_and_still_reports_them():
    _, splits, report = decontaminate(rows("a+b=", "c+d="), {"eval": rows("a + b =", "e+f=")}, 8, drop=False)
    assert [r["prompt"] for r in splits["eval"]] == ["a + b =", "e+f="]  # fit on training prompts, on purpose
    assert report["eval"]["exact_overlap"] == 0.5 and report["eval"]["exact_dropped"] == 0


def test_builtin_task_splits_are_clean():
    from grpo.builtin.arithmetic import Arithmetic

    task = Arithmetic(digits=2)
    _, _, report = decontaminate(task.train_rows(), {"eval": task.eval_rows(), **task.ood_splits(200)}, 8)
    for name in ("eval", "longer", "spaced", "question"):
        assert report[name]["exact_overlap"] == 0.0 and report[name]["duplicates_dropped"] == 0, name
    assert report["eval"]["rows"] == 500 and report["longer"]["rows"] == 200


def test_a_held_out_split_emptied_or_left_too_small_by_decontamination_is_an_error(tmp_path):
    def task(train, evals, *extra):
        files = {}
        for name, prompts in (("train", train), ("eval", evals)):
            files[name] = tmp_path / f"{name}.jsonl"
            files[name].write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in prompts))
        cfg = compose(["model=hf", "model.path=unused", "task=jsonl", f"task.train_file={files['train']}",
                       f"task.eval_file={files['eval']}", *extra])
        return load_rows(cfg, *build_scorers(cfg))

    problems = [f"what is {i} + 1?" for i in range(12)]
    # every held-out problem is a training problem: all 3 dropped, none left
    with pytest.raises(ConfigError, match=r"left 0 of 3 rows in the held-out split 'eval' \(3 seen exactly in "
                                          r"training, 0 duplicates\), under task.min_eval_rows=10"):
        task(problems, problems[:3])
    # 12 held out, 4 of them seen in training (one twice): 8 left, under the default 10
    with pytest.raises(ConfigError, match=r"left 8 of 13 rows .* \(4 seen exactly in training, 1 duplicates\)"):
        task(problems[:4], [*problems, problems[5]])
    assert len(task(problems[:4], problems, "task.min_eval_rows=8")[1]) == 8
    assert len(task(problems[:4], problems, "task.drop_contaminated=false")[1]) == 12  # nothing dropped
    assert len(task(problems[:4], problems[4:7])[1]) == 3  # a small split that nothing was dropped from is fine
