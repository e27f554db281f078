"""The comparison's bootstrap intervals against values worked out by hand."""

from __future__ import annotations

import pytest

from grpo.compare.intervals import bootstrap_interval, paired_difference, paired_problem_difference
from grpo.compare.report import differences


def test_one_seed_is_the_binomial_interval_of_its_problems():
    # p = 0.5 on 100 problems: sd sqrt(0.25 / 100) = 0.05, so about 0.5 -+ 1.96 x 0.05 = [0.402, 0.598]
    interval = bootstrap_interval([0.5], 100)
    assert interval.mean == 0.5
    assert interval.low == pytest.approx(0.40, abs=0.011) and interval.high == pytest.approx(0.60, abs=0.011)


def test_two_seeds_on_very_many_problems_spread_as_the_seeds_do():
    # seeds 0 and 1 drawn twice with replacement: the mean is 0, 0.5 or 1 with odds 1/4, 1/2, 1/4, so the
    # 2.5th and 97.5th percentiles are 0 and 1 (the problems add almost nothing at 10^6 of them)
    interval = bootstrap_interval([0.0, 1.0], 1_000_000)
    assert interval.mean == 0.5
    assert interval.low == pytest.approx(0.0, abs=0.003) and interval.high == pytest.approx(1.0, abs=0.003)


def test_a_certain_accuracy_has_no_spread():
    interval = bootstrap_interval([1.0, 1.0, 1.0], 50)
    assert (interval.low, interval.mean, interval.high) == (1.0, 1.0, 1.0)


def test_a_difference_is_paired_by_seed():
    # arm A is arm B plus 0.1 on every seed, though the seeds differ by 0.3: pairing removes the seeds'
    # spread, so the interval is the problems' alone, about 0.1 -+ 1.96 x sqrt(2 x 0.21 x 0.79 / (3 x 1000))
    a, b = [0.2, 0.5, 0.8], [0.1, 0.4, 0.7]
    interval = paired_difference(a, b, 1000)
    assert interval.mean == pytest.approx(0.1) and interval.excludes_zero()
    assert interval.high - interval.low < 0.1
    unpaired_spread = bootstrap_interval(a, 1000)
    assert unpaired_spread.high - unpaired_spread.low > 0.3  # the seeds' own spread, which pairing removed


def test_equal_arms_differ_by_nothing_the_interval_supports():
    interval = paired_difference([0.4, 0.6], [0.4, 0.6], 200)
    assert interval.mean == 0.0 and not interval.excludes_zero()


def test_paired_by_problem_two_problems_each_arm_solving_one():
    # one seed, A solved problem 1 only, B problem 2 only: each problem's difference is +1 or -1, shares 1/2.
    # Two problems redrawn: (+1, +1) -> 1 with odds 1/4, (+1, -1) or (-1, +1) -> 0 with 1/2, (-1, -1) -> -1
    # with 1/4, so the 2.5th and 97.5th percentiles are -1 and 1, the mean 0
    interval = paired_problem_difference(["10"], ["01"])
    assert (interval.low, interval.mean, interval.high) == (-1.0, 0.0, 1.0)


def test_paired_by_problem_arms_that_solve_the_same_problems_differ_by_exactly_nothing():
    # both arms solve the same 100 of 200 problems on every seed: every redraw differs by 0, where the
    # Binomial redraw of each arm's accuracy on its own spreads about -+1.96 x sqrt(2 x 0.25 / 200) x 1/sqrt(3)
    same = ["1" * 100 + "0" * 100] * 3
    paired = paired_problem_difference(same, same)
    assert (paired.low, paired.mean, paired.high) == (0.0, 0.0, 0.0)
    unpaired = paired_difference([0.5] * 3, [0.5] * 3, 200)
    assert unpaired.low < -0.05 and unpaired.high > 0.05


def test_paired_by_problem_supports_a_small_difference_the_seed_pairing_cannot():
    # A solves the 140 problems B solves and 10 more, on 3 seeds: the difference is 10/200 = 0.05 on every
    # draw's expectation; only the 10 problems where they disagree vary, so the interval is about
    # 0.05 -+ 1.96 x sqrt(0.05 x 0.95 / 600) = [0.033, 0.067] and excludes 0. Redrawing each arm on its own
    # (accuracies 0.75 and 0.70) spreads -+1.96 x sqrt((0.1875 + 0.21) / 600) = -+0.05 and reaches 0.
    a, b = ["1" * 150 + "0" * 50] * 3, ["1" * 140 + "0" * 60] * 3
    paired = paired_problem_difference(a, b)
    assert paired.mean == pytest.approx(0.05) and paired.excludes_zero()
    assert paired.low == pytest.approx(0.033, abs=0.004) and paired.high == pytest.approx(0.067, abs=0.004)
    assert not paired_difference([0.75] * 3, [0.70] * 3, 200).excludes_zero()


def test_bad_input_names_what_is_wrong():
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([0.1, 0.2], [0.1], 10)
    with pytest.raises(ValueError, match="problems"):
        bootstrap_interval([0.1], 0)
    with pytest.raises(ValueError, match="seed 1: paired by problem needs the same problems"):
        paired_problem_difference(["10", "10"], ["01", "011"])


def test_the_comparison_pairs_by_problem_only_where_both_runs_saw_the_same_problems():
    def run(accuracy):  # the fields `differences` reads of one run's summary
        return {"final_accuracy": accuracy, "final_ood_accuracy": None, "problems": 4, "ood_problems": None}

    runs = {"A": [run(0.5), run(0.5)], "B": [run(0.75), run(0.75)]}
    same = {"A": [{"test": ("1100", "d0")}, {"test": ("1100", "d1")}],
            "B": [{"test": ("1110", "d0")}, {"test": ("1110", "d1")}]}
    (paired,) = differences(runs, same)
    # B solves A's problems and one more, on both seeds: a redraw of the 4 problems differs by the number
    # of times it drew that problem, over 4, so never below 0; redrawn apart (0.75 vs 0.5 on 4 problems
    # each) B can come out below A
    assert paired["paired_by"] == "seed and problem" and paired["difference"].low >= 0.0
    other = {"A": same["A"], "B": [{"test": ("1110", "d0")}, {"test": ("1110", "another split")}]}
    (unpaired,) = differences(runs, other)
    assert unpaired["paired_by"] == "seed" and unpaired["difference"].low < 0.0
