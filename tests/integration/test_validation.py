"""The validation split: apart from the test split, scored at every evaluation, and what it drives: the best
checkpoint (`checkpoint.keep_best`) and early stopping (`train.early_stop`)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from grpo.data.loading import load_task, load_val_split
from grpo.errors import ConfigError
from grpo.training.loop import track_best
from tests.conftest import compose


def test_the_validation_split_shares_no_problem_with_the_test_split():
    cfg = compose(["task.arithmetic.num_eval=500", "task.arithmetic.num_val=300"])
    _, test = load_task(cfg.task, set())
    val = load_val_split(cfg.task, set())
    assert len(test) == 500 and len(val) == 300
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in val}
    too_many = compose(["task.arithmetic.num_val=5000"])
    with pytest.raises(ConfigError, match="task.arithmetic.num_val: 5000 validation problems"):
        load_val_split(too_many.task, set())


def test_the_best_is_the_first_of_the_highest_and_patience_counts_evaluations_since():
    run = SimpleNamespace(best={}, cfg=SimpleNamespace(checkpoint=SimpleNamespace(keep_best=False)))
    seen = []
    for step, accuracy in [(0, 0.1), (10, 0.3), (20, 0.2), (30, 0.3), (40, 0.25)]:
        metrics = {"val/accuracy": accuracy}
        track_best(run, step, metrics)
        seen.append((metrics["val/best_step"], run.best["since"]))
    assert seen == [(0, 0), (10, 0), (10, 1), (10, 2), (10, 3)]  # 0.3 again at step 30 is not better


def test_early_stop_ends_the_run_and_keep_best_keeps_the_best_policy(tmp_path, tiny_random_dir):
    from grpo.cli import train_from_config

    # a random model answers nothing right: val/accuracy stays 0, so the best is step 0's and after
    # 2 evaluations without a better one the run stops at step 2 of 6, with a checkpoint there
    cfg = compose(["model=hf", f"model.path={tiny_random_dir}", "model.dtype=float32", "train.max_steps=6",
                   "train.eval_every=1", "train.early_stop=2", "checkpoint.keep_best=true",
                   "checkpoint.every_steps=0", "train.prompts_per_step=2", "algorithm.group_size=2",
                   "task.arithmetic.num_eval=20", "task.arithmetic.num_val=20", "task.arithmetic.num_ood=0",
                   "tracking.progress_bar=false", "tracking.plot=false"])
    cfg.run_dir = str(tmp_path / "run")
    history = train_from_config(cfg)
    assert [h["step"] for h in history] == [0, 1, 2]
    assert all(h["val/accuracy"] == 0.0 and h["val/best_step"] == 0 and h["val/problems"] == 20 for h in history)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "step_2" / "policy").is_dir() and not (checkpoints / "step_6").exists()
    best = json.loads((checkpoints / "best" / "best.json").read_text())
    assert best["step"] == 0 and best["val/accuracy"] == 0.0 and "eval/accuracy" in best
    assert (checkpoints / "best" / "model.safetensors").exists()
    # every evaluation's per-problem outcomes, one character per problem of each split
    outcomes = [json.loads(line) for line in (tmp_path / "run" / "eval_outcomes.jsonl").read_text().splitlines()]
    assert [o["step"] for o in outcomes] == [0, 1, 2]
    assert all(o["test"]["solved"] == "0" * 20 and o["val"]["solved"] == "0" * 20 for o in outcomes)
    assert outcomes[0]["test"]["digest"] != outcomes[0]["val"]["digest"]  # different problems
    # and each problem's key, in row order: the rows' own, "a+b" on the built-in task
    assert outcomes[0]["test"]["keys"] == [r["problem_key"] for r in load_task(cfg.task, set())[1]]
    assert outcomes[0]["val"]["keys"] == [r["problem_key"] for r in load_val_split(cfg.task, set())]
    assert all("+" in key for o in outcomes for key in o["test"]["keys"] + o["val"]["keys"])


def test_keep_best_without_a_validation_split_is_refused_before_training(tmp_path, tiny_random_dir):
    from grpo.training.run import build_run

    cfg = compose(["model=hf", f"model.path={tiny_random_dir}", "checkpoint.keep_best=true",
                   "task.arithmetic.num_val=0"])
    cfg.run_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="need a validation split"):
        build_run(cfg)
