"""Train/eval overlap and deduplication, with counts worked out by hand."""

from grpo.data.contamination import decontaminate, deduplicate, ngrams, overlap


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
