"""Failures to score are figures, not zeros, through the real loop: a reward whose sandbox cannot start logs
`reward/<name>_infra_errors` (its samples None, not 0.0), and past `reward.max_infra_error_frac` the run stops
with one line and exit status 2."""

from __future__ import annotations

import sys

import pytest

from grpo.errors import RewardInfraError
from rewards.sandbox import SandboxUnavailable, resolve_sandbox
from tests.conftest import requires
from tests.integration.test_episodes import QUIET, train

try:
    resolve_sandbox("auto")
    HAS_SANDBOX = True
except SandboxUnavailable:
    HAS_SANDBOX = False

# One-digit sums from reasoning-gym, scored by the reasoning_gym reward in a sandbox that cannot start: 16 MiB of
# address space is too little for the interpreter to import reasoning-gym, whatever the completions say.
BROKEN = ["task=reasoning_gym", "task.reasoning_gym.names=[basic_arithmetic]", "task.reasoning_gym.size=20",
          "task.reasoning_gym.num_eval=2", "task.reasoning_gym.num_val=2",
          "+task.reasoning_gym.options={basic_arithmetic: {min_terms: 2, max_terms: 2, max_digits: 1}}",
          "task.prompt_template='{prompt}'", "reward.accuracy=reasoning_gym",
          "reward.functions=[{name: reasoning_gym, kwargs: {answer_tag: null, memory_mb: 16}}]"]


@requires(HAS_SANDBOX, "no sandbox here (bubblewrap, or unprivileged user namespaces)")
@pytest.mark.slow
def test_infra_errors_are_logged_and_past_the_threshold_stop_the_run(tmp_path, tiny_random_dir, monkeypatch,
                                                                     capsys):
    # Threshold 1.0 (never): the steps run, every sample masked, and the count is logged.
    lines = train(tmp_path, tiny_random_dir, "counted", *BROKEN, "train.max_steps=1",
                  "reward.max_infra_error_frac=1.0", "train.max_masked_steps=0")
    step = next(m for m in lines if m.get("step") == 1)
    # 2 prompts x 4 completions, none scored: 8 infra errors, a fraction of 8 / 8
    assert step["reward/reasoning_gym_infra_errors"] == 8.0
    assert step["train/reward_infra_error_frac"] == 1.0 and step["train/reward_masked_frac"] == 1.0

    # The default threshold (0.5): the first step stops the run, with an error that names the field.
    with pytest.raises(RewardInfraError, match=r"failed on 100% of the samples .* reward.max_infra_error_frac=0.5"):
        train(tmp_path, tiny_random_dir, "stopped", *BROKEN, "train.max_steps=2")

    # With asynchronous rollout the batch is scored on the rollout thread; the trainer stops when it takes it.
    with pytest.raises(RewardInfraError, match=r"step 1: the rewards' infrastructure failed on 100%"):
        train(tmp_path, tiny_random_dir, "async", *BROKEN, "train.max_steps=2", "rollout.max_staleness=1",
              "algorithm.tis_cap=2")

    # Through the command line: one line and exit status 2.
    from grpo.cli import train_main

    monkeypatch.setattr(sys, "argv", ["grpo-train", f"run_dir={tmp_path / 'cli'}", *QUIET,
                                      f"model.path={tiny_random_dir}", *BROKEN, "train.max_steps=2"])
    with pytest.raises(SystemExit) as exit_info:
        train_main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the rewards' infrastructure failed on 100% of the samples")
