"""The TRL side-by-side's own arithmetic (scripts/experiments/smollm2_vs_trl.py): resuming its wall clock across a
stop, checking a checkpoint before resuming from it, the curves its plot draws, and new evaluations merged into
earlier ones."""

import json
from types import SimpleNamespace

import pytest

from scripts.experiments.smollm2_vs_trl import (
    WallClock,
    merge_evals,
    plot,
    plot_series,
    resume_check,
    resumed_walls,
    train_trl,
)


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_resumed_walls_keeps_the_steps_up_to_the_checkpoint_and_offsets_from_its_own():
    # Catches: the offset taken from the file's last line (120.0, step 22, which the resumed run trains again)
    # and the lines past the checkpoint kept (4 lines). Checkpoint at step 20: keep steps 19 and 20, offset 100.0.
    lines = [{"step": 19, "wall_s": 90.0}, {"step": 20, "wall_s": 100.0},
             {"step": 21, "wall_s": 110.0}, {"step": 22, "wall_s": 120.0}]
    kept, offset = resumed_walls(lines, 20)
    assert kept == lines[:2]
    assert offset == 100.0


def test_resumed_walls_refuses_a_step_the_file_lacks():
    with pytest.raises(ValueError, match="no line for step 20"):
        resumed_walls([{"step": 10, "wall_s": 50.0}], 20)


def test_the_wall_clock_appends_the_resumed_steps_after_the_stopped_runs(tmp_path):
    # Catches: the file emptied at the resumed start (step 20's line lost, as a fresh run's clock does) and the
    # resumed seconds not added to step 20's 100.0 (step 21 would read about 0 s).
    path = tmp_path / "wall.jsonl"
    write_jsonl(path, [{"step": 10, "wall_s": 50.0}, {"step": 20, "wall_s": 100.0}, {"step": 21, "wall_s": 107.0}])
    clock = WallClock(path, resume_step=20)
    clock.on_train_begin(None, SimpleNamespace(global_step=20), None)
    clock.on_step_end(None, SimpleNamespace(global_step=21), None)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [10, 20, 21]
    assert 100.0 <= lines[-1]["wall_s"] < 100.0 + 60.0  # the resumed part took well under a minute here


def checkpoint(tmp_path, max_steps, files):
    ckpt = tmp_path / "checkpoint-20"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 20, "max_steps": max_steps}))
    for name in files:
        (ckpt / name).write_bytes(b"")
    return ckpt


def test_resume_check_names_the_state_trainer_would_skip(tmp_path):
    # Catches: a missing file not reported (Trainer itself goes on without it, silently).
    record = resume_check(checkpoint(tmp_path, 40, ["optimizer.pt"]), 40)
    assert record["step"] == 20
    assert record["missing"] == ["scheduler.pt", "rng_state.pth"]


def test_resume_check_refuses_another_max_steps(tmp_path):
    # Catches: max_steps not compared (a resumed run of 50 steps would not be the 40-step run it continues).
    with pytest.raises(ValueError, match="max_steps is 40, the run's 50"):
        resume_check(checkpoint(tmp_path, 40, ["optimizer.pt", "scheduler.pt", "rng_state.pth"]), 50)


def test_resuming_without_optimizer_state_needs_fresh_optimizer(tmp_path):
    # Catches: the refusal dropped (the run would go on to load a model from "unused", another error).
    cfg = SimpleNamespace(train=SimpleNamespace(max_steps=40))
    with pytest.raises(ValueError, match="no optimizer.pt, scheduler.pt, rng_state.pth .*--fresh-optimizer"):
        train_trl(cfg, "unused", tmp_path, 10, 4, checkpoint(tmp_path, 40, []))


def test_plot_series_puts_ours_on_training_seconds_in_step_order(tmp_path):
    # Catches: ours' seconds taken from wall_s (its evaluations included: 130, 830) where TRL's exclude them, and
    # points left in file order (20 before 10).
    trl = [{"step": 0, "wall_s": 0.0, "eval/accuracy": 0.1}, {"step": 20, "wall_s": 1800.0, "eval/accuracy": 0.8},
           {"step": 10, "wall_s": 900.0, "eval/accuracy": 0.9}]
    ours = [{"step": 10, "wall_s": 830.0, "train_s": 660.0, "eval/accuracy": 0.88},
            {"step": 0, "wall_s": 130.0, "train_s": 0.0, "eval/accuracy": 0.1}]
    series = plot_series(trl, ours)
    assert series["TRL GRPOTrainer"] == {"step": [0, 10, 20], "seconds": [0.0, 900.0, 1800.0],
                                         "accuracy": [0.1, 0.9, 0.8]}
    assert series["ours"] == {"step": [0, 10], "seconds": [0.0, 660.0], "accuracy": [0.1, 0.88]}
    assert series["ours, with its evaluations"]["seconds"] == [130.0, 830.0]
    plot(series, tmp_path / "plot.png", resumed_at=20)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_evals_adds_the_new_steps_replaces_a_repeated_one_and_rereads_the_walls():
    # Catches: the old row kept where a new one has its step (20 would read 0.84), rows out of step order (30 before
    # 20), and wall times left as the rows had them (20's stale 999.0 where wall.jsonl now has 1846.0).
    old = [{"step": 0, "wall_s": 0.0, "eval/accuracy": 0.087}, {"step": 20, "wall_s": 999.0, "eval/accuracy": 0.84}]
    new = [{"step": 30, "wall_s": 2700.0, "eval/accuracy": 0.9}, {"step": 20, "wall_s": 999.0, "eval/accuracy": 0.85}]
    merged = merge_evals(old, new, {0: 0.0, 20: 1846.0, 30: 2700.0})
    assert merged == [{"step": 0, "wall_s": 0.0, "eval/accuracy": 0.087},
                      {"step": 20, "wall_s": 1846.0, "eval/accuracy": 0.85},
                      {"step": 30, "wall_s": 2700.0, "eval/accuracy": 0.9}]
