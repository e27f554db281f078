"""grpo-compare's distillation arm without a training loop: a given teacher is used as it is, a bad one is refused
naming `teacher_path`, and a comparison directory copied elsewhere keeps its finished runs."""

from __future__ import annotations

import json

import pytest

from grpo.compare.command import (
    RUN_RECORD,
    CompareConfig,
    _compose,
    finished_run,
    run_dir,
    run_overrides,
    teacher_for,
    validate_compare,
)
from grpo.config import register_configs, validate
from grpo.errors import ConfigError


def test_a_given_teacher_path_is_used_without_training_one(tmp_path):
    """Mutations caught: `teacher_path` ignored (a teacher run is launched into out_dir/teacher_run), the distill
    arm's overrides not naming it, or naming it so that Hydra reads another value (unquoted, `{teacher}` left)."""
    teacher = tmp_path / "teacher, v2"  # a comma: unquoted, Hydra would read a sweep over two values
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    out = tmp_path / "cmp"
    cfg = validate_compare(CompareConfig(out_dir=str(out), algorithms=["grpo", "distill"], teacher_path=str(teacher),
                                         budget_samples=64, prompts_per_step=8, group_size=8))
    path, notes = teacher_for(cfg)
    assert path == str(teacher) and notes == [f"On-policy distillation's teacher: {teacher} (given)"]
    assert not out.exists()  # nothing trained, nothing written
    overrides = run_overrides(cfg, "distill", {"rm": None, "teacher": path}, seed=1)
    register_configs()
    composed = validate(_compose("config", overrides))
    assert (composed.algorithm.name, composed.algorithm.teacher.path) == ("distill", str(teacher))
    # the same sizing as GRPO's: 64 samples / (8 x 8) = 1 step
    assert (composed.train.max_steps, composed.seed, composed.model.warm_start.seed) == (1, 1, 1)
    assert teacher_for(CompareConfig(out_dir=str(out), algorithms=["grpo"])) == (None, [])  # no arm, no teacher


@pytest.mark.parametrize("make", [lambda root: root / "absent", lambda root: root], ids=["missing", "no config.json"])
def test_a_bad_teacher_path_is_refused_naming_the_field(tmp_path, make):
    """Mutation caught: no check, so the comparison first runs every other arm and fails in distill's run."""
    path = make(tmp_path)
    with pytest.raises(ConfigError, match=rf"^teacher_path: {path} is not a transformers model directory"):
        validate_compare(CompareConfig(algorithms=["grpo", "distill"], teacher_path=str(path)))


def test_a_copied_comparison_reuses_its_runs_and_still_refuses_another_comparisons(tmp_path):
    """A record written under /old/cmp is read under /new/cmp: its run_dir and the reward model's path in its
    overrides move with the directory. Mutation caught: records compared as written (the copy is refused);
    paths moved but nothing else compared (another budget's run is reused)."""
    old, new = tmp_path / "old" / "cmp", tmp_path / "new" / "cmp"
    cfg_old, cfg_new = CompareConfig(out_dir=str(old)), CompareConfig(out_dir=str(new))
    rm_old, rm_new = ({"rm": f"{root}/reward_model_run/reward_model"} for root in (old, new))
    recorded = run_overrides(cfg_old, "ppo_rlhf", rm_old, seed=2)
    directory = run_dir(cfg_new, "ppo_rlhf", 2)
    directory.mkdir(parents=True)
    (directory / RUN_RECORD).write_text(json.dumps({"overrides": recorded, "wall_s": 1.0, "peak_mib": 2.0}))
    assert f"path:'{old}/reward_model_run/reward_model'" in " ".join(recorded)
    assert finished_run(directory, run_overrides(cfg_new, "ppo_rlhf", rm_new, seed=2))["wall_s"] == 1.0
    other = CompareConfig(out_dir=str(new), budget_samples=25600)
    with pytest.raises(ConfigError, match="out_dir: .* records a run with other overrides"):
        finished_run(directory, run_overrides(other, "ppo_rlhf", rm_new, seed=2))
