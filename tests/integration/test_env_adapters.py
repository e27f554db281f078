"""Adapters of other libraries' environments (grpo/envs/adapters/): GEM's Guess-the-Number and Mastermind
played by hand through our reset/step, the episode's return as the Done reward (hand-worked), rows seeding
the games, the trainer's global random streams left alone, and `env=gem` through the real GRPO loop."""

from __future__ import annotations

import importlib.util
import random
import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from grpo.envs import Done, Environment, Observation, environment_factory
from grpo.envs.chat import render
from tests.conftest import compose, requires
from tests.integration.test_episodes import train

HAS_GEM = importlib.util.find_spec("gem") is not None
pytestmark = requires(HAS_GEM, "gem-llm is not installed (pip install -e '.[envs]')")

GEM = "grpo.envs.adapters.gem:GemEnvironment"
EASY = {"env_id": "game:GuessTheNumber-v0-easy"}  # a number in 1..10, 4 turns


def guess(n: int) -> str:
    return f"I think it is \\boxed{{{n}}}."


def play_by_bisection(env) -> tuple[list[int], Observation | Done]:
    """Guess the middle of what the hints leave, until the game ends; the guesses and the last result."""
    lo, hi, guesses = 1, 10, []
    while True:
        guesses.append((lo + hi) // 2)
        result = env.step(guess(guesses[-1]))
        if isinstance(result, Done):
            return guesses, result
        (message,) = result.messages
        assert message["role"] == "user" and message["content"].endswith("\nEnter your next guess.")
        if "is higher than" in message["content"]:
            lo = guesses[-1] + 1
        else:
            assert "is lower than" in message["content"]
            hi = guesses[-1] - 1


def test_guess_the_number_is_won_by_bisection_with_reward_one():
    make = environment_factory(GEM, EASY)
    for seed in range(6):
        env = make()
        assert isinstance(env, Environment) and env.tools == []
        (opening,) = env.reset({"prompt": "unused", "seed": seed})
        assert opening["role"] == "user" and opening["content"].startswith("You are playing Guess The Number.")
        target = env.env.game_number
        guesses, result = play_by_bisection(env)
        # bisection over 1..10 finds any number within 4 guesses: 5, then 2 or 8, ...
        assert guesses[-1] == target and len(guesses) <= 4
        assert result == Done(1.0)  # inner steps give 0, the win 1


def test_an_unreadable_move_ends_the_game_with_the_format_penalty():
    env = environment_factory(GEM, EASY)()
    env.reset({"prompt": "a"})
    assert env.step("five") == Done(-0.1)


def test_running_out_of_turns_scores_the_distance_of_the_last_guess():
    env = environment_factory(GEM, {**EASY, "max_turns": 2})()
    env.reset({"prompt": "a", "seed": 3})
    target = env.env.game_number
    wrong = [n for n in range(1, 11) if n != target][:2]
    assert isinstance(env.step(guess(wrong[0])), Observation)
    # the last turn's reward is 1 - |guess - target| / (10 - 1); the inner step's 0
    assert env.step(guess(wrong[1])) == Done(pytest.approx(1 - abs(wrong[1] - target) / 9, abs=1e-12))


def test_a_row_seeds_its_game_so_a_group_plays_one_game():
    make = environment_factory(GEM, {"env_id": "game:Mastermind-v0-easy"})
    row = {"prompt": "12+34="}
    a, b, c = make(), make(), make()
    openings = [e.reset(r) for e, r in ((a, row), (b, row), (c, {"prompt": "12+35="}))]
    assert openings[0] == openings[1]
    assert [a.env.game_code, b.env.game_code] == [a.env.game_code] * 2
    secrets = set()
    for i in range(8):
        e = make()
        e.reset({"prompt": f"row {i}"})
        secrets.add(tuple(e.env.game_code))
    assert len(secrets) > 1  # other rows, other codes
    # interleaved play (as episodes run in lockstep) gives each episode the observations it gets alone
    moves = ["\\boxed{1 2}", "\\boxed{3 4}"]
    alone = make()
    alone.reset(row)
    expected = [alone.step(m) for m in moves]
    a.reset(row)
    b.reset(row)
    got_a, got_b = [], []
    for m in moves:
        got_a.append(a.step(m))
        got_b.append(b.step(m))
    assert got_a == expected and got_b == expected


def test_the_trainers_global_random_streams_are_left_alone():
    random.seed(123)
    np.random.seed(123)
    before = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)
    env = environment_factory(GEM, EASY)()
    env.reset({"prompt": "x", "seed": 7})
    env.step(guess(5))
    assert (random.random(), np.random.rand()) == before


def test_an_unknown_gem_id_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match="env.kwargs.env_id: 'game:Nope' is not a registered GEM environment"):
        environment_factory(GEM, {"env_id": "game:Nope"})()


def test_env_gem_config_weighs_the_task_reward_zero():
    cfg = compose(["env=gem"])
    assert cfg.env.name == GEM and cfg.env.kwargs == EASY
    assert [(f.name, f.weight) for f in cfg.reward.functions] == [("math_accuracy", 0.0)]


@pytest.mark.slow
def test_grpo_train_env_gem_runs_steps_with_the_games_reward(tmp_path, tiny_random_dir):
    lines = train(tmp_path, tiny_random_dir, "gem", "env=gem", "train.max_steps=2", "rollout.max_episode_tokens=40")
    steps = [m for m in lines if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        # four characters never hold a \boxed{} guess: every game ends at the first turn with GEM's -0.1
        assert m["env/turns_mean"] == 1 and m["env/truncated_frac"] == 0
        assert m["reward/env_mean"] == pytest.approx(-0.1, abs=1e-6) and m["reward/env_none_frac"] == 0
        assert "reward/math_accuracy_mean" in m


def test_the_game_text_reaches_the_model_rendered_by_the_chat_template(tiny_random_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_random_dir)
    env = environment_factory(GEM, EASY)()
    text = render(tokenizer, env.reset({"prompt": "a"}))
    assert text.startswith("<user>You are playing Guess The Number.") and text.endswith("<assistant>")
    assert re.search(r"between 1 and 10", text)
