"""grpo-compare: a short comparison on two seeds writes the arms' table with intervals, the differences,
every run, a CSV and a plot."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

pytestmark = pytest.mark.slow


@pytest.mark.learning
def test_short_comparison_on_two_seeds_writes_every_arm_and_run(tmp_path, warm_tiny_dir):
    from grpo.compare.command import LABELS, CompareConfig, compare

    # model.warm_start.seed=0: both seeds start from the cached warm model (the default builds one per seed)
    cfg = CompareConfig(out_dir=str(tmp_path), budget_samples=64, prompts_per_step=8, group_size=8,
                        eval_every_samples=64, dpo_eval_every=1, threads=1, in_process=True, seeds=[0, 1],
                        run_overrides=["task.arithmetic.num_eval=30", "task.arithmetic.num_ood=10",
                                       "model.warm_start.seed=0"],
                        rm_overrides=["train.max_steps=2", "data.arithmetic.num_prompts=40", "train.eval_every=2"])
    arms = compare(cfg)
    names = [LABELS[a] for a in cfg.algorithms]
    assert [r["algorithm"] for r in arms] == names and all(r["seeds"] == 2 for r in arms)
    for r in arms:
        final = r["final_accuracy"]
        assert final.low <= final.mean <= final.high and final.high - final.low > 0  # 30 problems: never a point
    table = (tmp_path / "compare.md").read_text()
    for name in names:
        assert f"| {name} | 2 |" in table
    assert table.count(" - GRPO, final held-out accuracy: ") == len(names) - 1
    # every online arm logged which of the same problems it solved, so its difference is paired by problem
    online = [LABELS[a] for a in cfg.algorithms if a != "dpo"]
    assert sum(f"{name} - GRPO, final held-out accuracy" in line and line.endswith("paired by seed and problem")
               for line in table.splitlines() for name in online[1:]) == len(online) - 1
    assert "best acc: test accuracy at the evaluation with the best val/accuracy" in table
    with (tmp_path / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert sorted((r["algorithm"], r["seed"]) for r in runs) == sorted((n, s) for n in names for s in ("0", "1"))
    assert all(r["problems"] == "30" and r["ood_problems"] and r["best_chosen_on"] == "val" for r in runs)
    with (tmp_path / "compare.csv").open() as f:
        assert [r["algorithm"] for r in csv.DictReader(f)] == names
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    for name in cfg.algorithms:
        assert (tmp_path / name / "seed_1" / "metrics.jsonl").exists()
    assert_the_teacher_was_trained_once_and_distilled_from(tmp_path, table)


def assert_the_teacher_was_trained_once_and_distilled_from(out, table: str) -> None:
    """The distill arm's teacher: one SFT run of 2 x the arms' 1 step, from seed 0's warm start, before both seeds'
    distillation runs, which name its last checkpoint; its cost and held-out accuracy in the notes. Mutations
    caught: no teacher note or the accuracy of its first evaluation in it; a teacher per seed, or none (the
    runs name another path); the arms' own length (1 step)."""
    teacher = out / "teacher_run"
    rows = [json.loads(line) for line in (teacher / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("eval/accuracy") is not None]
    assert [r["step"] for r in evals] == [0, 2]  # its start and its end, nothing between (train.eval_every=2)
    note = next(line for line in table.splitlines() if line.startswith("- On-policy distillation's teacher: "))
    assert note.startswith("- On-policy distillation's teacher: trained by grpo-train algorithm=sft on the training "
                           "split's gold answers from seed 0's warm start, 2 steps of 64 demonstrations in ")
    assert note.endswith(f"held-out accuracy {evals[0]['eval/accuracy']:.3f} -> {evals[-1]['eval/accuracy']:.3f}")
    # the held-out prompts the arms are scored on are never among its training rows
    assert json.loads((teacher / "contamination.json").read_text())["eval"]["exact_overlap"] == 0.0
    policy = teacher / "checkpoints" / "step_2" / "policy"
    for seed in (0, 1):
        config = yaml.safe_load((out / "distill" / f"seed_{seed}" / "config.yaml").read_text())
        assert (config["algorithm"]["name"], config["algorithm"]["teacher"]["path"]) == ("distill", str(policy))
        metrics = (out / "distill" / f"seed_{seed}" / "metrics.jsonl").read_text()
        assert '"distill/reverse_kl"' in metrics
    assert sorted(p.name for p in out.iterdir() if "teacher" in p.name) == ["teacher_run"]


def test_a_comparison_run_again_reuses_finished_runs_and_resumes_the_interrupted_one(tmp_path, warm_tiny_dir, caplog):
    from grpo.compare.command import RUN_RECORD, CompareConfig, compare
    from grpo.errors import ConfigError

    cfg = CompareConfig(out_dir=str(tmp_path), algorithms=["grpo", "sft"], budget_samples=64, prompts_per_step=8,
                        group_size=8, eval_every_samples=32, threads=1, in_process=True, seeds=[0, 1],
                        run_overrides=["task.arithmetic.num_eval=30", "task.arithmetic.num_ood=10",
                                       "model.warm_start.seed=0"])
    first = {r["algorithm"]: r["final_accuracy"].mean for r in compare(cfg)}
    metrics = sorted(tmp_path.glob("*/seed_*/metrics.jsonl"))
    assert len(metrics) == 4 and all((m.parent / RUN_RECORD).exists() for m in metrics)
    written = {m: m.stat().st_mtime_ns for m in metrics}

    # as if the comparison had been killed inside grpo/seed_1 (no record there), or an older version had been
    # killed while writing the record in place (half of it): both runs again; the rest is reused as it is
    (tmp_path / "grpo" / "seed_1" / RUN_RECORD).unlink()
    record = tmp_path / "sft" / "seed_0" / RUN_RECORD
    record.write_text(record.read_text()[:20])
    with caplog.at_level("INFO"):
        again = {r["algorithm"]: r["final_accuracy"].mean for r in compare(cfg)}
    assert any(m.startswith("resuming from ") and "grpo/seed_1/checkpoints" in m for m in caplog.messages)
    assert any(m.startswith(f"{record} is not readable JSON; the run is launched again") for m in caplog.messages)
    assert again == first
    rerun = [m for m in metrics if m.stat().st_mtime_ns != written[m]]
    # each resumed from its latest checkpoint, nothing else ran
    assert rerun == [tmp_path / "grpo" / "seed_1" / "metrics.jsonl", tmp_path / "sft" / "seed_0" / "metrics.jsonl"]
    assert "2 of 4 runs reused from an earlier invocation" in (tmp_path / "compare.md").read_text()
    assert json.loads(record.read_text())["overrides"] and not list(tmp_path.glob(f"*/*/{RUN_RECORD}.tmp"))

    # another comparison's runs in the same out_dir are refused, naming the field and the record
    other = CompareConfig(**{**cfg.__dict__, "budget_samples": 128})
    with pytest.raises(ConfigError, match=rf"out_dir: .*grpo/seed_0/{RUN_RECORD} records a run with other"):
        compare(other)


def test_runs_at_a_time_each_in_its_own_process_all_finish_and_overlap(tmp_path, warm_tiny_dir):
    """jobs=2: the two runs (two arms, one seed: each run is a process, ~20 s of imports) are launched together
    (mutation caught: the pool given one worker, or jobs ignored, leaves no two runs overlapping), each leaves
    its record, and the table has every arm."""
    from grpo.compare.command import LABELS, RUN_RECORD, CompareConfig, compare

    cfg = CompareConfig(out_dir=str(tmp_path), algorithms=["grpo", "sft"], budget_samples=64, prompts_per_step=8,
                        group_size=8, eval_every_samples=64, threads=1, jobs=2, seeds=[0],
                        run_overrides=["task.arithmetic.num_eval=30", "task.arithmetic.num_ood=10",
                                       "task.arithmetic.num_val=10", "model.warm_start.seed=0"])
    arms = compare(cfg)
    assert [(r["algorithm"], r["seeds"]) for r in arms] == [(LABELS["grpo"], 1), (LABELS["sft"], 1)]
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob(f"*/seed_*/{RUN_RECORD}"))]
    assert len(records) == 2
    spans = sorted((r["started"], r["finished"]) for r in records)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))  # a run began before one ended


@pytest.mark.parametrize(("settings", "message"), [({"jobs": 0}, "jobs: must be >= 1"),
                                                   ({"jobs": 2, "in_process": True}, "jobs: runs at a time")])
def test_a_bad_jobs_setting_is_refused_with_its_name(settings, message):
    from grpo.compare.command import CompareConfig, validate_compare
    from grpo.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        validate_compare(CompareConfig(**settings))
