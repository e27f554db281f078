"""A run survives hostile turns: a tool call nested 1,000 deep, a turn full of calls to a program that never
ends (real sandbox), and an environment that raises on one episode. The model is the tiny random one; what
it writes is replaced by the script below, as `CallsOnce` does in test_episodes.py."""

from __future__ import annotations

import itertools
import json

import pytest

from grpo.envs.python import python_tool
from grpo.envs.tools import ToolEnvironment
from tests.integration.test_episodes import train
from tests.unit.test_rewards_code import needs_sandbox

NESTED = '<tool_call>{"name": "python", "arguments": {"code": ' + "[" * 1000 + "]" * 1000 + "}}</tool_call>"
LOOP = f"<tool_call>{json.dumps({'name': 'python', 'arguments': {'code': 'while 1: pass'}})}</tool_call>"
HOSTILE_TURN = NESTED + LOOP * 20  # 21 calls: one malformed, then twenty that would each run to the timeout
BUILT = itertools.count(1)  # environments built in this process: the run's first check builds number 1


class Hostile:
    """The python tool (0.5 s per call); on the model's first turn, whatever it wrote, `HOSTILE_TURN`; its second
    turn ends the episode, scored 1 for an even length. The third environment built raises in its first step."""

    def __init__(self):
        self.number = next(BUILT)
        self.toolbox = ToolEnvironment([python_tool(timeout_s=0.5)], score=lambda text, row: float(len(text) % 2 == 0))
        self.tools, self.counts, self.turns = self.toolbox.tools, self.toolbox.counts, 0

    def reset(self, row):
        return self.toolbox.reset(row)

    def step(self, text):
        self.turns += 1
        if self.number == 3:
            raise RuntimeError("the environment broke")
        return self.toolbox.step(text.replace("<tool_call>", "") + (HOSTILE_TURN if self.turns == 1 else ""))

    def close(self):
        self.toolbox.close()


@needs_sandbox
@pytest.mark.slow
def test_a_run_with_hostile_tool_calls_and_a_failing_environment_completes_its_steps(tmp_path, tiny_random_dir):
    lines = train(tmp_path, tiny_random_dir, "hostile", "env.name=tests.integration.test_hostile_episodes:Hostile",
                  "train.max_steps=2", "rollout.max_turns=3", "rollout.max_episode_tokens=3000",
                  "env.max_tool_calls_per_turn=3", "env.episode_timeout_s=60",
                  "reward.functions=[{name: 'tests.integration.test_options:parity_reward'}]")
    steps = [m for m in lines if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    # 2 prompts x 4 = 8 episodes a step; step 1 builds environments 2-9, so number 3 fails in step 1
    assert [m["env/errors"] for m in steps] == [1, 0]
    # every other episode: 21 calls in its first turn (1 malformed, 2 loops run to the timeout, 18 refused),
    # then Done: 7 * 21 / 8 calls per episode in step 1, and 19 failures of 21 calls
    assert [m["env/tool_calls_mean"] for m in steps] == [7 * 21 / 8, 21]
    assert [m["env/tool_error_frac"] for m in steps] == [19 / 21, 19 / 21]
    assert [m["env/turns_mean"] for m in steps] == [(7 * 2 + 1) / 8, 2]  # the failed one took one turn
    assert [m["env/timeout_frac"] for m in steps] == [0, 0]
    # the failed episode's reward is None: its share of the step's rewards
    assert steps[0]["train/reward_none_frac"] == 1 / 8 and steps[1]["train/reward_none_frac"] == 0
