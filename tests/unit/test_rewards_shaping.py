"""format and length shaping rewards."""

from __future__ import annotations

import pytest

from rewards import get_reward
from rewards.shaping import overlong_penalty

format_reward = get_reward("format")
length_reward = get_reward("length")


def test_format_tags():
    completions = [
        "<think>a</think> <answer>5</answer>",
        "<think>a</think>\n<answer> 5 </answer>\n",
        "<think></think><answer>5</answer>",  # empty think
        "x<think>a</think><answer>5</answer>",  # text outside the tags
        "<answer>5</answer><think>a</think>",  # wrong order
        "<think>a<think>b</think><answer>5</answer>",  # nested tag
        "<think>a</think><answer>5</answer><answer>6</answer>",  # answer twice
    ]
    scores = format_reward([""] * len(completions), completions, tags=["think", "answer"])
    assert scores == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_format_boxed_by_default():
    completions = [r"so \boxed{3}", r"\boxed{3} then \boxed{ 3 }", r"\boxed{3} or \boxed{4}", "3", r"\boxed{}"]
    assert format_reward([""] * 5, completions) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_format_tags_and_boxed():
    completions = [r"<answer>\boxed{1}</answer>", "<answer>1</answer>"]
    assert format_reward([""] * 2, completions, tags=["answer"], boxed=True) == [1.0, 0.0]


def test_format_pattern_matches_the_whole_completion():
    # a bare number, as a prompt asking for the answer alone wants it: whitespace around it is fine; a number inside
    # a sentence, or a boxed one, is not this layout (math_accuracy may still score it right)
    completions = [" 84\n", "-3", "The answer is 84", r"\boxed{84}", "84.", ""]
    assert format_reward([""] * 6, completions, pattern="-?[0-9]+") == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    # with tags as well, both must hold
    assert format_reward([""] * 2, ["<answer>7</answer>", "7"], tags=["answer"], pattern="<answer>7</answer>") == \
        [1.0, 0.0]


def test_format_bad_options():
    with pytest.raises(ValueError):
        format_reward([""], ["x"], tags=[], boxed=False)
    with pytest.raises(ValueError, match="valid tag"):
        format_reward([""], ["x"], tags=["a>b"])
    with pytest.raises(ValueError, match=r"format reward: pattern '\(' is not a regex"):
        format_reward([""], ["x"], pattern="(")


def test_length_soft_overlong_penalty():
    # L = 1024, C = 256: zero up to 768, then (768 - l) / 256, -1 past 1024.
    # l = 800 -> -32/256 = -0.125 ; l = 1024 -> -1 ; l = 1025 -> -1
    lengths = [0, 768, 800, 1024, 1025]
    assert length_reward([""] * 5, ["a" * n for n in lengths]) == [0.0, 0.0, -0.125, -1.0, -1.0]


def test_overlong_penalty_by_hand():
    # max 10, buffer 4: free up to 6, then -1/4 per token: 7 -> -0.25, 8 -> -0.5, 10 -> -1, beyond -> -1
    assert overlong_penalty([0, 6, 7, 8, 10, 12], 10, 4) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert overlong_penalty([3, 10, 11], 10, 0) == [0.0, 0.0, -1.0]  # buffer 0: a step past max_length


def test_length_in_tokens_and_hard_cut():
    scores = length_reward([""] * 3, ["", "", ""], max_length=10, buffer=0, unit="tokens",
                           completion_length=[10, 11, 3])
    assert scores == [0.0, -1.0, 0.0]
    with pytest.raises(ValueError, match="completion_length"):
        length_reward([""], [""], unit="tokens")
    with pytest.raises(ValueError):
        length_reward([""], [""], max_length=10, buffer=11)


def test_shaping_on_long_garbage_is_fast():
    import time

    garbage = "<think>" + "a<" * 50_000
    start = time.perf_counter()
    assert format_reward([""], [garbage], tags=["think", "answer"]) == [0.0]
    assert format_reward([""], ["\\boxed{" * 20_000]) == [0.0]
    assert time.perf_counter() - start < 1.0
