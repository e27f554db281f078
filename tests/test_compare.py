"""grpo-compare: a short comparison writes a table with every algorithm's row, a CSV and a plot."""

from __future__ import annotations

import csv

import pytest

pytestmark = pytest.mark.slow


def test_short_comparison_writes_every_row(tmp_path, warm_tiny_dir):
    from grpo.compare import LABELS, CompareConfig, compare

    cfg = CompareConfig(out_dir=str(tmp_path), budget_samples=64, prompts_per_step=8, group_size=8,
                        eval_every_samples=64, dpo_eval_every=1, threads=1, in_process=True,
                        run_overrides=["task.arithmetic.num_eval=30", "task.arithmetic.num_ood=10"],
                        rm_overrides=["train.max_steps=2", "data.arithmetic.num_prompts=40", "train.eval_every=2"])
    rows = compare(cfg)
    names = [LABELS[a] for a in cfg.algorithms]
    assert [r["algorithm"] for r in rows] == names
    table = (tmp_path / "compare.md").read_text()
    for name in names:
        assert f"| {name} |" in table
    with (tmp_path / "compare.csv").open() as f:
        assert [r["algorithm"] for r in csv.DictReader(f)] == names
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    for r in rows:
        assert r["final_ood_accuracy"] is not None and r["samples_to_best"] <= cfg.budget_samples
