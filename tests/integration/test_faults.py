"""Fault injection: a run SIGKILLed at several points and resumed ends exactly where an uninterrupted run does.

Each training run is a real `python -m grpo.train` subprocess; `GRPO_KILL_AT` (grpo/faults.py) makes it
SIGKILL itself at a named point and step, so the kills land at the same places on every machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo.training.checkpoint import latest_checkpoint, load_state

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _args(run_dir: Path, model_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "grpo.train", f"run_dir={run_dir}", "model=hf", f"model.path={model_dir}",
        "threads=1", "seed=3", "train.max_steps=6", "train.prompts_per_step=4", "algorithm.group_size=4",
        "task.arithmetic.num_eval=8", "train.eval_every=0", "train.samples_every=1", "checkpoint.every_steps=2",
        "checkpoint.keep_last=2", "optim.lr=1e-4", "algorithm.dynamic_sampling=true", "algorithm.max_resample=1",
        "tracking.progress_bar=false", "tracking.plot=false", "resume=auto",
    ]


def _env(kill_at: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("GRPO_KILL_AT", None)
    if kill_at:
        env["GRPO_KILL_AT"] = kill_at
    return env


def _without_timings(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_killed_and_resumed_run_matches_the_uninterrupted_one(tmp_path, warm_tiny_dir):
    straight_dir, crashed_dir = tmp_path / "straight", tmp_path / "crashed"
    # the reference run goes on alongside the crashing one (one thread each)
    straight_log = (tmp_path / "straight.log").open("w")
    straight = subprocess.Popen(_args(straight_dir, warm_tiny_dir), env=_env(None), cwd=tmp_path,
                                stdout=straight_log, stderr=subprocess.STDOUT)
    # Kill points, in the order the crashing run meets them:
    #   mid_step@2            weights updated in memory, no checkpoint yet: the resume starts from scratch
    #   checkpoint_write@4    half of step_4 written under a temporary name: resumes from step_2, warns
    #   after_metrics@5       step 5's metrics line written, its checkpoint not: the line must not double
    #   checkpoint_publish@6  step_6 renamed into place, `latest` still names step_4: re-runs 5-6, re-saves 6
    output = {}  # each process's log
    for kill_at in ("mid_step@2", "checkpoint_write@4", "after_metrics@5", "checkpoint_publish@6", None):
        proc = subprocess.run(_args(crashed_dir, warm_tiny_dir), env=_env(kill_at), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        expected = 0 if kill_at is None else -9  # -9: SIGKILL
        assert proc.returncode == expected, (kill_at, proc.stdout[-3000:])
        output[kill_at] = proc.stdout
    assert straight.wait() == 0, (tmp_path / "straight.log").read_text()[-3000:]

    assert "ignoring partial checkpoint" in output["after_metrics@5"] and ".tmp_step_4" in output["after_metrics@5"]
    assert "resuming from" not in output["checkpoint_write@4"]  # the kill at step 2 left nothing to resume from
    assert "step_4 (step 4)" in output[None]  # the pointer still named step_4 when step 6 was killed

    a, b = (latest_checkpoint(d) for d in (straight_dir, crashed_dir))
    assert a.name == b.name == "step_6"
    assert sorted(p.name for p in (crashed_dir / "checkpoints").iterdir()) == ["latest", "step_4", "step_6"]
    wa, wb = (load_file(c / "policy" / "model.safetensors") for c in (a, b))
    w0 = load_file(warm_tiny_dir / "model.safetensors")
    assert any(not torch.equal(wa[k], w0[k]) for k in w0)  # the run did train
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-6, rtol=0, msg=name)
    sa, sb = load_state(a), load_state(b)
    assert sa["sampler"] == sb["sampler"]
    for ma, mb in zip(sa["backend"]["optimizer"]["state"].values(), sb["backend"]["optimizer"]["state"].values()):
        torch.testing.assert_close(mb["exp_avg_sq"], ma["exp_avg_sq"], atol=1e-9, rtol=0)

    ma, mb = (_without_timings(d / "metrics.jsonl") for d in (straight_dir, crashed_dir))
    assert [r["step"] for r in mb] == [0, 1, 2, 3, 4, 5, 6]  # nothing doubled, nothing missing
    for rb, ra in zip(mb, ma):
        assert rb == pytest.approx(ra, abs=1e-6), rb["step"]
    sa_lines, sb_lines = ((d / "samples.jsonl").read_text() for d in (straight_dir, crashed_dir))
    assert sb_lines == sa_lines
