"""The comparison's intervals: coverage by simulation of crossed seeds x problems, values worked out by hand,
Holm's rule, and the report's pairing, paraphrase and family-wise handling."""

from __future__ import annotations

import numpy as np
import pytest

from grpo.compare.intervals import (
    accuracy_interval,
    crossed_accuracy,
    crossed_difference,
    difference_interval,
    half_width,
    holm,
    outcome_grid,
    rates_accuracy,
    rates_difference,
    t_quantile,
    variance_parts,
    wilson,
)
from grpo.compare.report import differences, summarise_arm, summarise_run

COMPARISONS, PROBLEMS = 1_000, 500


def simulate(rng, seeds: int, delta: float, problems: int = PROBLEMS):
    """Outcomes [K, S, n] of two arms on the same n problems, K comparisons at once. Arm A's chance on problem i
    with seed s is q_i + delta/2 + c_i/2 + u_s + v_s, arm B's q_i - delta/2 - c_i/2 + u_s + w_s: problems differ
    in difficulty (q) and in which arm they favour (c, mean 0), a seed moves both arms alike (u: correlated seeds)
    and each arm apart (v, w). Every term is uniform and the chances stay inside [0.01, 0.99], so the true
    difference is exactly delta and A's true accuracy exactly 0.5 + delta / 2. A seed's two runs draw one
    uniform per problem (outcomes correlated across arms, as two arms from one warm start are)."""
    k = COMPARISONS
    q, c = rng.uniform(0.35, 0.65, (k, 1, problems)), rng.uniform(-0.5, 0.5, (k, 1, problems))
    u, v, w = rng.uniform(-0.03, 0.03, (3, k, seeds, 1))
    draw = rng.random((k, seeds, problems))
    a = draw < q + delta / 2 + c / 2 + u + v
    b = draw < q - delta / 2 - c / 2 + u + w
    return a.astype(float), b.astype(float)


def covered(low, high, truth) -> float:
    return float(((low <= truth) & (truth <= high)).mean())


@pytest.mark.parametrize("seeds", [3, 5])
@pytest.mark.parametrize("delta", [0.0, 0.06], ids=["null", "effect"])
def test_intervals_cover_the_truth_with_seeds_and_problems_crossed(seeds, delta):
    # the problem part and the seed part are of the same size here (about 2e-4 each in the difference's variance),
    # so an interval that redraws problems per seed (problem part / S) or takes 1.96 for 4.30 at 3 seeds
    # undercovers; measured: 0.95-0.98 for each of the three intervals
    rng = np.random.default_rng(100 * seeds + int(100 * delta))
    a, b = simulate(rng, seeds, delta)
    _, low, high, p = crossed_difference(a, b)
    assert covered(low, high, delta) >= 0.93
    _, low, high, _ = crossed_accuracy(a)
    assert covered(low, high, 0.5 + delta / 2) >= 0.93
    # the gap between two splits of different problems: B on 300 problems of its own, paired by seed only
    _, other = simulate(rng, seeds, delta, problems=300)
    _, low, high, _ = crossed_difference(a, other, same_problems=False)
    assert covered(low, high, delta) >= 0.93
    if delta == 0:  # the p-value agrees: under the null, "p < 0.05" no more often than 7% (binomial slack)
        assert (p < 0.05).mean() <= 0.07


def old_per_seed_bootstrap(rng, a, b, replicates=400):
    """The method this module replaced, in its few lines: draw S seeds with replacement, redraw each drawn seed's
    problems on its own (a multinomial over its shares of +1, 0, -1 differences), percentiles of the means."""
    k, seeds, n = a.shape
    d = a - b
    shares = np.stack([(d == 1).mean(-1), (d == 0).mean(-1), (d == -1).mean(-1)], -1)  # [K, S, 3]
    drawn = rng.integers(0, seeds, (k, replicates, seeds))
    counts = rng.multinomial(n, np.take_along_axis(shares[:, None], drawn[..., None], 2))  # [K, R, S, 3]
    means = ((counts[..., 0] - counts[..., 2]) / n).mean(-1)  # [K, R]
    return np.quantile(means, 0.025, axis=1), np.quantile(means, 0.975, axis=1)


@pytest.mark.parametrize("delta", [0.0, 0.06], ids=["null", "effect"])
def test_the_old_per_seed_bootstrap_fails_the_same_check(delta):
    # same simulation at 3 seeds: the old interval covered 0.88-0.89 (the crossed one 0.97), below the 0.93 bar
    rng = np.random.default_rng(30 + int(100 * delta))
    a, b = simulate(rng, 3, delta)
    low, high = old_per_seed_bootstrap(rng, a, b)
    assert covered(low, high, delta) < 0.93
    _, low, high, _ = crossed_difference(a, b)
    assert covered(low, high, delta) >= 0.93


def test_the_problem_part_is_one_draw_of_problems_shared_by_every_seed():
    # 3 seeds that solve the same 2 of 4 problems: the problem means are 1, 1, 0, 0 (sample variance 1/3), so the
    # problem part is 1/3 / 4 = 1/12; no seed part (equal seed means) and no residual. A bootstrap drawing one
    # set of 4 problem indices for all seeds has variance 0.25 / 4 = 1/16, times 4/3 (n / (n - 1)) = 1/12;
    # redrawing each seed's problems apart averages 3 independent draws: 1/48
    grid = outcome_grid(["1100"] * 3)
    mean, ((seed, seed_df), (problem, problem_df)) = variance_parts(grid)
    assert (float(mean), float(seed), seed_df, problem_df) == (0.5, 0.0, 2, 3)
    assert float(problem) == pytest.approx(1 / 12, abs=1e-12)
    rng = np.random.default_rng(0)
    shared = rng.integers(0, 4, (40_000, 4))  # [R, n]: one draw for every seed
    assert grid[:, shared].mean((0, 2)).var() * 4 / 3 == pytest.approx(1 / 12, rel=0.03)
    apart = rng.integers(0, 4, (40_000, 3, 4))  # [R, S, n]: each seed its own draw
    per_seed = np.take_along_axis(grid[None], apart, 2).mean((1, 2))
    assert per_seed.var() * 4 / 3 == pytest.approx(1 / 36, rel=0.03)  # 1/48 x 4/3: what the old method used


def test_seed_and_problem_parts_by_hand():
    # seeds "1100", "1000", "1110": seed means 0.5, 0.25, 0.75, sample variance 0.0625, seed part 0.0625 / 3 = 3/144.
    # Problem means 1, 2/3, 1/3, 0: sample variance 0.18519, over 4 = 0.046296. Residuals x - seed mean -
    # problem mean + 0.5: (0, 1/3, -1/3, 0), (0.25, -5/12, -1/12, 0.25), (-0.25, 1/12, 5/12, -0.25), squares
    # summing to 5/6, MS_e = (5/6) / (2 x 3) = 5/36, over S n = 12: 0.011574; problem part 0.046296 - 0.011574 =
    # 5/144. (A percentile bootstrap's variance over 3 seeds, ddof 0, would give 2/144; no residual, 6.67/144.)
    mean, ((seed, _), (problem, _)) = variance_parts(outcome_grid(["1100", "1000", "1110"]))
    assert float(mean) == 0.5
    assert float(seed) == pytest.approx(3 / 144, abs=1e-12) and float(problem) == pytest.approx(5 / 144, abs=1e-12)


def test_a_gap_between_splits_of_different_problems_adds_both_problem_parts():
    # 3 identical seeds: 50 of 100 in-distribution problems solved, 50 of 100 other problems: no seed part, each
    # problem part 0.25 x 100 / 99 / 100 = 0.0025253 at 99 df (t 1.9842): half width 1.9842 x sqrt(2 x 0.0025253)
    # = 0.14101 (0.0997 with one problem part only)
    interval = difference_interval(["10" * 50] * 3, ["1100" * 25] * 3, same_problems=False)
    assert interval.mean == 0.0 and interval.high == pytest.approx(0.14101, abs=1e-4)


def test_three_seeds_take_students_quantile_at_two_degrees_of_freedom():
    # seed part 1/9 (sd 1/3) at 2 degrees of freedom: t = 4.3027, half width 1.4342; a problem part 0.0004 at
    # 499 (t = 1.9647) adds in quadrature: sqrt(1.4342^2 + (1.9647 x 0.02)^2) = 1.4347
    assert float(t_quantile(2)) == pytest.approx(4.3027, abs=1e-4)
    assert float(t_quantile(499)) == pytest.approx(1.9647, abs=1e-4)
    assert float(half_width([(np.array(1 / 9), 2), (np.array(0.0), 499)])) == pytest.approx(1.4342, abs=1e-4)
    assert float(half_width([(np.array(1 / 9), 2), (np.array(0.0004), 499)])) == pytest.approx(1.4347, abs=1e-4)


def test_a_certain_accuracy_keeps_the_wilson_bound():
    # 3 seeds x 500 problems all solved: the Wilson lower bound of 1,500 / 1,500 is 1500 / (1500 + 1.96^2) =
    # 0.99745; the seed and problem parts are 0, so without the floor the interval would be [1, 1]
    interval = accuracy_interval(["1" * 500] * 3)
    assert interval.mean == 1.0 and interval.high == 1.0
    assert interval.low == pytest.approx(1500 / (1500 + 1.959964**2), abs=1e-6)
    assert rates_accuracy([1.0, 1.0, 1.0], 500).low == pytest.approx(interval.low, abs=1e-9)
    # none solved out of 10: upper bound z^2 / (10 + z^2) = 3.8415 / 13.8415 = 0.2775
    low, high = wilson(0.0, 10)
    assert (float(low), float(high)) == (0.0, pytest.approx(0.27753, abs=1e-5))


def test_two_arms_that_solve_the_same_problems_still_leave_room_to_differ():
    # nothing varies, so the interval is the Wilson bound on the share of 600 seed-problem pairs that could
    # still differ: 3.8415 / 603.8415 = 0.00636 either side, and the p-value is 1
    same = ["1" * 100 + "0" * 100] * 3
    interval = difference_interval(same, same)
    assert interval.mean == 0.0 and interval.p_value == 1.0
    assert interval.high == pytest.approx(3.8415 / 603.8415, abs=1e-5) and interval.low == -interval.high


def test_a_small_difference_on_identical_seeds_is_the_problems_t_interval():
    # B solves A's 40 of 100 problems and 4 more, alike on 3 seeds: the per-problem differences are 4 ones and
    # 96 zeros, sample variance 4 x 96 / (100 x 99) = 0.03879, problem part / 100 = 3.879e-4 (sd 0.019695),
    # t at 99 df 1.9842: 0.04 -+ 0.03908, so [0.00092, 0.07908], p just under 0.05 (t = 2.031)
    b, a = ["1" * 44 + "0" * 56] * 3, ["1" * 40 + "0" * 60] * 3
    interval = difference_interval(b, a)
    assert interval.mean == pytest.approx(0.04)
    assert interval.low == pytest.approx(0.00092, abs=2e-5) and interval.high == pytest.approx(0.07908, abs=2e-5)
    assert 0.04 < interval.p_value < 0.05


def test_holm_adjusts_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> non-decreasing 0.02, 0.03,
    # 0.06, 0.06; back in the given order
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([]) == []


def test_per_seed_accuracies_without_outcomes_bound_the_problem_part():
    # seeds 0.8, 0.9, 0.85 against 0.7, 0.75, 0.8 on 500 problems: differences 0.1, 0.15, 0.05 (sample variance
    # 0.0025, part 0.0025 / 3); the problem part is bounded by (sqrt(0.85 x 0.15) + sqrt(0.75 x 0.25))^2 / 500 =
    # (0.35707 + 0.43301)^2 / 500 = 0.0012485; half width sqrt(4.3027^2 x 0.000833 + 1.9647^2 x 0.0012485) = 0.1423
    interval = rates_difference([0.8, 0.9, 0.85], [0.7, 0.75, 0.8], 500)
    assert interval.mean == pytest.approx(0.1)
    assert interval.high - interval.mean == pytest.approx(0.1423, abs=2e-4)


def test_bad_input_names_what_is_wrong():
    with pytest.raises(ValueError, match="same seeds"):
        difference_interval(["10", "01"], ["10"])
    with pytest.raises(ValueError, match="paired by problem: need the same problems"):
        difference_interval(["10"], ["011"])
    with pytest.raises(ValueError, match="every seed needs the same problems"):
        accuracy_interval(["10", "011"])
    with pytest.raises(ValueError, match="strings of 0 and 1"):
        accuracy_interval(["1x"])
    with pytest.raises(ValueError, match="problems must be >= 1"):
        rates_difference([0.1], [0.2], 0)


def run(accuracy, ood=None):  # the fields the report reads of one run's summary
    return {"final_accuracy": accuracy, "best_accuracy": accuracy, "final_ood_accuracy": ood, "problems": 100,
            "ood_problems": None if ood is None else 8, "start_accuracy": 0.0, "samples_to_best": 0,
            "minutes_to_best": 0.0, "train_minutes": 0.0, "wall_minutes": 0.0, "peak_memory_mib": 0.0}


def outcomes(test: str, digest: str = "d", **ood: str) -> dict:
    final = {"test": (test, digest)} | {f"ood/{k}": (v, f"d-{k}") for k, v in ood.items()}
    return {"final": final, "best": final}


def test_the_table_judges_its_differences_together_by_holm():
    # held out, B - A is the 0.04 of the test above (p 0.048: its interval excludes 0); OOD the arms are equal
    # (p 1). Holm over the 2 differences: 0.048 x 2 = 0.096, not supported, though the interval excludes 0
    runs = {"A": [run(0.40, 0.0)] * 3, "B": [run(0.44, 0.0)] * 3}
    seen = {"A": [outcomes("1" * 40 + "0" * 60, longer="0" * 8)] * 3,
            "B": [outcomes("1" * 44 + "0" * 56, longer="0" * 8)] * 3}
    held_out, ood = differences(runs, seen)
    assert held_out["paired_by"] == "seed and problem" and held_out["difference"].excludes_zero()
    assert held_out["p_holm"] == pytest.approx(2 * held_out["p_value"]) and not held_out["supported"]
    assert ood["p_holm"] == 1.0 and not ood["supported"]


def test_the_comparison_pairs_by_problem_only_where_both_runs_saw_the_same_problems():
    runs = {"A": [run(0.5)] * 2, "B": [run(0.75)] * 2}
    same = {"A": [outcomes("1100"), outcomes("1100")], "B": [outcomes("1110"), outcomes("1110")]}
    (paired,) = differences(runs, same)
    assert paired["paired_by"] == "seed and problem"
    other = {"A": same["A"], "B": [outcomes("1110"), outcomes("1110", digest="another split")]}
    (unpaired,) = differences(runs, other)
    assert unpaired["paired_by"] == "seed"


def test_paraphrases_are_reported_apart_not_pooled_as_new_problems():
    # OOD: 8 new `longer` problems, none solved; `spaced` and `question` rephrase 8 held-out problems, all
    # solved. Pooled as 24 problems the OOD accuracy would be 16 / 24 = 0.667 with a gap of 0.5 - 0.667;
    # over the new problems it is 0.0, the gap 0.5
    seen = outcomes("10" * 50, longer="0" * 8, spaced="1" * 8, question="1" * 8)
    points = [{"step": 5, "accuracy": 0.5, "ood_accuracy": 16 / 24, "val_accuracy": None, "problems": 100,
               "ood_problems": 24, "samples": 10, "minutes": 1.0}]
    summary = summarise_run("A", 0, points, 60.0, 100.0, seen["final"], ("spaced", "question"))
    assert (summary["final_ood_accuracy"], summary["ood_problems"], summary["final_gap"]) == (0.0, 8, 0.5)
    arm = summarise_arm("A", [summary] * 3, [seen] * 3, ("spaced", "question"))
    assert arm["final_ood_accuracy"].mean == 0.0 and arm["final_gap"].mean == 0.5
    assert sorted(arm["paraphrases"]) == ["question", "spaced"] and arm["paraphrases"]["spaced"].mean == 1.0
    # 24 new problems if nothing is declared a paraphrase: what the table used to pool
    assert summarise_arm("A", [summary] * 3, [seen] * 3)["final_ood_accuracy"].mean == pytest.approx(16 / 24)


def test_a_paraphrase_split_the_task_does_not_have_is_refused_by_name():
    from grpo.compare.command import CompareConfig, validate_compare
    from grpo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"paraphrase_splits: \['qestion'\] not among"):
        validate_compare(CompareConfig(paraphrase_splits=["spaced", "qestion"]))
    validate_compare(CompareConfig(paraphrase_splits=["spaced", "question"]))
