"""The reward plug-in contract: registry, dotted paths, entry points, weighting, None masking, failures."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import math
import subprocess
import sys

import pytest

import rewards
from rewards import (
    REWARDS,
    Registry,
    Reward,
    RewardScorer,
    RewardSpec,
    get_reward,
    known_rewards,
    per_sample,
    register_reward,
)
from rewards.registry import RewardCounts


def constant(value):
    def fn(prompts, completions, **columns):
        return [value] * len(completions)

    return fn


def echo_answer(prompts, completions, answer):
    """Uses a column by name and no **kwargs: only that column is passed."""
    return [float(a) for a in answer]


def test_import_is_light():
    code = (
        "import sys, rewards; "
        "heavy = [m for m in ('sympy', 'math_verify', 'torch', 'rewards.math_accuracy', 'rewards.code_tests') "
        "if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_builtins_are_known_and_resolve():
    assert {"math_accuracy", "code_tests", "format", "length"} <= set(known_rewards())
    for name in ("math_accuracy", "format", "length"):
        assert callable(get_reward(name))


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="math_accuracy") as info:
        get_reward("math_acuracy")
    assert "unknown reward 'math_acuracy'" in str(info.value)


def test_dotted_path():
    assert get_reward("tests.unit.test_rewards:echo_answer") is echo_answer
    with pytest.raises(ValueError, match="no attribute"):
        get_reward("tests.unit.test_rewards:missing")
    with pytest.raises(ValueError, match="cannot import"):
        get_reward("no_such_module_xyz:fn")


def test_register_reward_and_duplicate():
    @register_reward("test_rewards_const_one")
    def one(prompts, completions, **_):
        return [1.0] * len(completions)

    assert get_reward("test_rewards_const_one") is one
    assert "test_rewards_const_one" in known_rewards()
    register_reward("test_rewards_const_one")(one)  # the same function again is fine
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_rewards_const_one")(constant(2.0))


def test_entry_point(monkeypatch):
    ep = importlib.metadata.EntryPoint(name="from_a_plugin", value="tests.unit.test_rewards:echo_answer",
                                       group="grpo.rewards")
    monkeypatch.setattr(REWARDS, "_entry_points", lambda: [ep])
    assert "from_a_plugin" in known_rewards()
    assert get_reward("from_a_plugin") is echo_answer


def test_weighted_total_masks_none():
    # r1 = [1, None, None], r2 = [0.5, 2, None]; weights 2 and -1:
    # total = [2*1 - 0.5, -2, None]
    def r1(prompts, completions, **_):
        return [1.0, None, None]

    def r2(prompts, completions, **_):
        return [0.5, 2, None]

    register_reward("test_rewards_r1")(r1)
    register_reward("test_rewards_r2")(r2)
    scorer = RewardScorer([RewardSpec("test_rewards_r1", 2.0), RewardSpec("test_rewards_r2", -1.0)])
    batch = scorer(["p"] * 3, ["a", "b", "c"], {})
    assert batch.total == [1.5, -2.0, None]
    assert batch.per_reward == {"test_rewards_r1": [1.0, None, None], "test_rewards_r2": [0.5, 2.0, None]}
    m = batch.metrics()
    assert m["reward/test_rewards_r1_mean"] == 1.0 and m["reward/test_rewards_r1_std"] == 0.0
    assert m["reward/test_rewards_r1_none_frac"] == pytest.approx(2 / 3, abs=1e-12)
    # r2 present values [0.5, 2]: mean 1.25, std 0.75
    assert m["reward/test_rewards_r2_mean"] == 1.25 and m["reward/test_rewards_r2_std"] == 0.75
    assert m["reward/test_rewards_r2_error_frac"] == 0.0


def test_all_none_reward_has_no_mean():
    register_reward("test_rewards_none")(constant(None))
    batch = RewardScorer([RewardSpec("test_rewards_none")])(["p"], ["a"], {})
    assert batch.total == [None]
    assert "reward/test_rewards_none_mean" not in batch.metrics()
    assert batch.metrics()["reward/test_rewards_none_none_frac"] == 1.0


def test_columns_passed_by_name_and_checked():
    scorer = RewardScorer([RewardSpec("tests.unit.test_rewards:echo_answer")])
    assert scorer.required_columns() == {"answer"}
    batch = scorer(["p", "q"], ["a", "b"], {"answer": ["1", "2"], "unused": [0, 0]})
    assert batch.per_reward["tests.unit.test_rewards:echo_answer"] == [1.0, 2.0]
    with pytest.raises(ValueError, match="need columns"):
        scorer(["p"], ["a"], {})
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2"):
        scorer(["p", "q"], ["a", "b"], {"answer": ["1"]})


def test_builtin_required_columns():
    scorer = RewardScorer([RewardSpec("math_accuracy"), RewardSpec("format", 0.1), RewardSpec("length", 0.1)])
    assert scorer.required_columns() == {"answer"}


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="takes no option"):
        RewardScorer([RewardSpec("math_accuracy", kwargs={"strictt": True})])
    with pytest.raises(ValueError, match="unknown reward"):
        RewardScorer([RewardSpec("nope")])
    with pytest.raises(ValueError, match="appears twice"):
        RewardScorer([RewardSpec("format"), RewardSpec("format")])
    with pytest.raises(ValueError, match="finite"):
        RewardScorer([RewardSpec("format", weight=math.nan)])


def test_raising_reward_becomes_none_and_is_logged_once(caplog):
    calls = []

    def broken(prompts, completions, **_):
        calls.append(1)
        raise RuntimeError("boom")

    register_reward("test_rewards_broken")(broken)
    register_reward("test_rewards_ones")(constant(1.0))
    scorer = RewardScorer([RewardSpec("test_rewards_broken"), RewardSpec("test_rewards_ones")])
    with caplog.at_level(logging.ERROR, logger="rewards.scorer"):
        first = scorer(["p"] * 2, ["a", "b"], {})
        second = scorer(["p"] * 2, ["a", "b"], {})
    assert first.per_reward["test_rewards_broken"] == [None, None]
    assert first.total == [1.0, 1.0]
    assert second.metrics()["reward/test_rewards_broken_error_frac"] == 1.0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "test_rewards_broken" in errors[0].getMessage()
    assert len(calls) == 2


def test_invalid_outputs_are_flagged():
    register_reward("test_rewards_short")(lambda p, c, **_: [1.0])
    register_reward("test_rewards_nan")(lambda p, c, **_: [math.nan, "x", 1, True])
    scorer = RewardScorer([RewardSpec("test_rewards_short"), RewardSpec("test_rewards_nan")])
    batch = scorer(["p"] * 4, ["a"] * 4, {})
    assert batch.per_reward["test_rewards_short"] == [None] * 4
    assert batch.per_reward["test_rewards_nan"] == [None, None, 1.0, 1.0]
    assert batch.errors["test_rewards_nan"] == [True, True, False, False]
    assert batch.metrics()["reward/test_rewards_nan_error_frac"] == 0.5


def test_async_rewards_run_concurrently():
    async def slow_len(prompts, completions, **_):
        await asyncio.sleep(0.2)
        return [float(len(c)) for c in completions]

    async def slow_fail(prompts, completions, **_):
        await asyncio.sleep(0.2)
        raise ValueError("api down")

    register_reward("test_rewards_async_len")(slow_len)
    register_reward("test_rewards_async_fail")(slow_fail)
    scorer = RewardScorer([RewardSpec("test_rewards_async_len"), RewardSpec("test_rewards_async_fail")])
    import time

    start = time.perf_counter()
    batch = scorer(["p", "p"], ["ab", "abc"], {})
    assert time.perf_counter() - start < 0.38  # both sleeps overlap
    assert batch.per_reward["test_rewards_async_len"] == [2.0, 3.0]
    assert batch.per_reward["test_rewards_async_fail"] == [None, None]


def test_async_reward_inside_running_loop():
    async def one(prompts, completions, **_):
        return [1.0] * len(completions)

    register_reward("test_rewards_async_one")(one)
    scorer = RewardScorer([RewardSpec("test_rewards_async_one")])

    async def main():
        return scorer(["p"], ["a"], {})

    assert asyncio.run(main()).total == [1.0]


def test_per_sample_helper_and_kwargs():
    @per_sample
    def close_to(prompt, completion, target, *, scale=1.0):
        return -abs(len(completion) - target) * scale

    register_reward("test_rewards_close_to")(close_to)
    scorer = RewardScorer([RewardSpec("test_rewards_close_to", kwargs={"scale": 0.5})])
    # |2 - 3| * 0.5 = 0.5 ; |4 - 4| * 0.5 = 0
    assert scorer.required_columns() == {"target"}
    assert scorer(["p", "q"], ["ab", "abcd"], {"target": [3, 4], "other": [0, 0]}).total == [-0.5, 0.0]


def test_column_and_option_clash():
    scorer = RewardScorer([RewardSpec("math_accuracy", kwargs={"strict": True})])
    with pytest.raises(ValueError, match="both a column and an option"):
        scorer(["p"], ["1"], {"answer": ["1"], "strict": [False]})


def test_package_exports():
    assert set(rewards.__all__) >= {"register_reward", "get_reward", "known_rewards", "RewardSpec", "RewardScorer"}


def test_a_registry_loads_a_built_in_when_first_asked_and_lists_what_it_knows():
    # "json:dumps" stands for a built-in's module: imported only when its name is looked up
    registry = Registry("codec", lazy={"json": "json:dumps"}, paths=True)
    assert list(registry) == ["json"] and "json" not in registry._entries
    import json

    assert registry["json"] is json.dumps and registry.resolve("json:loads") is json.loads
    with pytest.raises(KeyError):
        registry["yaml"]
    with pytest.raises(ValueError, match=r"unknown codec 'yaml'. Known: json. .*'package.module:attr'"):
        registry.resolve("yaml")


def test_a_registry_refuses_a_second_entry_under_one_name():
    registry = Registry("advantage estimator")
    registry.register("a")(len)
    registry.register("a", len)  # the same entry again is fine
    with pytest.raises(ValueError, match="advantage estimator 'a' is already registered to builtins:len"):
        registry.register("a", abs)


def test_a_rewards_counters_are_part_of_its_registration_and_are_logged():
    counted = {"n": 0}

    def counters():
        out, counted["n"] = {"calls": float(counted["n"])}, 0
        return out

    @register_reward("test_rewards_counted", metrics=counters)
    def counted_reward(prompts, completions, **_):
        counted["n"] += 1
        return [1.0] * len(completions)

    assert REWARDS["test_rewards_counted"] == Reward(counted_reward, None, counters)
    scorer = RewardScorer([RewardSpec("test_rewards_counted")])
    assert scorer(["p"], ["c"], {}).metrics()["reward/test_rewards_counted_calls"] == 1.0


def test_the_reward_model_comes_through_the_entry_point_its_package_declares():
    """`rewards` names nothing outside itself: the learned reward model is an installed package's entry point."""
    from reward_models.scorer import REWARD_MODEL

    assert "reward_model" not in REWARDS._lazy and "reward_model" in known_rewards()
    assert REWARDS.resolve("reward_model") is REWARD_MODEL and REWARD_MODEL.metrics is not None


def test_infra_errors_are_a_figure_per_reward_the_rewards_own_plus_a_call_that_raised():
    def infra_counter():
        return {"infra_errors": 1.0}  # the reward could not score one sample (its None below)

    register_reward("test_rewards_one_unscored", metrics=infra_counter)(lambda p, c, **_: [None, 0.0, 1.0])
    register_reward("test_rewards_raises_infra")(lambda p, c, **_: 1 / 0)
    register_reward("test_rewards_wrong")(lambda p, c, **_: [0.0] * len(c))
    scorer = RewardScorer([RewardSpec("test_rewards_one_unscored"), RewardSpec("test_rewards_raises_infra"),
                           RewardSpec("test_rewards_wrong")])
    m = scorer(["p"] * 3, ["a", "b", "c"], {}).metrics()
    # its own count (1); a raising call counts its 3 samples; wrong answers (0.0) are no infrastructure failure
    assert m["reward/test_rewards_one_unscored_infra_errors"] == 1.0
    assert m["reward/test_rewards_raises_infra_infra_errors"] == 3.0
    assert m["reward/test_rewards_wrong_infra_errors"] == 0.0


def test_reward_counts_are_read_once_and_name_their_always_keys():
    """3 adds of 1 and one of 2 = 5 timeouts, 2 unparsed; then `always` keys read 0 and nothing else remains.
    Catches: a read that does not clear, an always-key missing when nothing was counted, `n` ignored."""
    counts = RewardCounts("infra_errors")
    for _ in range(3):
        counts.add("timeouts")
    counts.add("timeouts", 2)
    counts.update({"unparsed": 2})
    assert counts.pop() == {"infra_errors": 0.0, "timeouts": 5.0, "unparsed": 2.0}
    assert counts.pop() == {"infra_errors": 0.0}
