"""Confidence intervals for comparisons over seeds: a two-level bootstrap, over seeds and over problems.

An arm's accuracy varies for two reasons: the seed (the run's trajectory) and the finite evaluation
set. One bootstrap replicate resamples both:

1. draw S seeds from the S observed ones, with replacement;
2. for each drawn seed, redraw its accuracy on n problems: resampling n right/wrong outcomes with
   replacement from a run that got a fraction p right gives Binomial(n, p) / n;
3. average over the drawn seeds.

The 95% interval is the 2.5th and 97.5th percentile of 10,000 replicates. With fewer than two seeds the
seed level has no spread to show, and the interval reflects the problems only.

A difference between two arms is paired by seed, and, when both runs of a seed were evaluated on the same
problems and their per-problem outcomes are known, by problem too (`paired_problem_difference`): step 2
then redraws the same problems for both arms. Two arms that solve mostly the same problems differ by little
on any redraw, so the paired interval is narrower, and honest, where redrawing each arm's problems on its
own (`paired_difference`) would add the spread of problems both arms solve or both miss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REPLICATES = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over seeds and its bootstrap interval."""

    mean: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_interval(per_seed: list[float], problems: int, *, seed: int = 0, replicates: int = REPLICATES
                       ) -> Interval:
    """The mean over seeds of an accuracy measured on `problems` problems per seed, with its interval."""
    return paired_difference(per_seed, [0.0] * len(per_seed), problems, 0, seed=seed, replicates=replicates)


def paired_difference(first: list[float], second: list[float], problems: int, second_problems: int | None = None,
                      *, seed: int = 0, replicates: int = REPLICATES) -> Interval:
    """Mean over seeds of `first[s] - second[s]`, accuracies on `problems` and `second_problems` problems
    (default: the same number; 0: `second` is a constant, not redrawn), with its interval."""
    second_problems = problems if second_problems is None else second_problems
    if len(first) != len(second) or not first:
        raise ValueError(f"paired by seed: need the same seeds on both sides, got {len(first)} and {len(second)}")
    if problems < 1 or second_problems < 0:
        raise ValueError(f"problems must be >= 1 (second: >= 0), got {problems}, {second_problems}")
    rng = np.random.default_rng(seed)
    a, b = np.clip(np.asarray(first, float), 0, 1), np.clip(np.asarray(second, float), 0, 1)
    seeds = rng.integers(0, len(a), size=(replicates, len(a)))  # [R, S] step 1: seeds drawn with replacement
    redrawn_a = rng.binomial(problems, a[seeds]) / problems  # [R, S] step 2: each drawn seed over its problems
    redrawn_b = rng.binomial(second_problems, b[seeds]) / second_problems if second_problems else b[seeds]
    draws = (redrawn_a - redrawn_b).mean(axis=1)  # [R] step 3
    low, high = np.quantile(draws, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return Interval(float(np.mean(np.asarray(first) - np.asarray(second))), float(low), float(high))


def paired_problem_difference(first: list[str], second: list[str], *, seed: int = 0,
                              replicates: int = REPLICATES) -> Interval:
    """Mean over seeds of the accuracy difference between two arms, paired by seed and by problem.

    `first[s]` and `second[s]` are seed s's per-problem outcomes ("0110...", one character per problem, the
    same problems in the same order on both sides). Resampling n problems with replacement draws each problem's
    difference (+1: only `first` solved it, -1: only `second`, 0: both or neither) from seed s's observed
    ones, so the drawn counts of +1, 0 and -1 are Multinomial(n, their observed shares).
    """
    if len(first) != len(second) or not first:
        raise ValueError(f"paired by seed: need the same seeds on both sides, got {len(first)} and {len(second)}")
    shares = []  # [S, 3] per seed: the shares of problems with difference +1, 0, -1
    for s, (a, b) in enumerate(zip(first, second)):
        if len(a) != len(b) or not a:
            raise ValueError(f"seed {s}: paired by problem needs the same problems, got {len(a)} and {len(b)}")
        plus = sum(x == "1" and y == "0" for x, y in zip(a, b))
        minus = sum(x == "0" and y == "1" for x, y in zip(a, b))
        shares.append([plus / len(a), 1 - (plus + minus) / len(a), minus / len(a)])
    sizes = {len(a) for a in first}
    if len(sizes) != 1:
        raise ValueError(f"paired by problem: every seed needs the same number of problems, got {sorted(sizes)}")
    n, shares = sizes.pop(), np.clip(np.asarray(shares), 0, 1)
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, len(first), size=(replicates, len(first)))  # [R, S] seeds drawn with replacement
    counts = rng.multinomial(n, shares[seeds])  # [R, S, 3] each drawn seed's problems redrawn, both arms alike
    draws = ((counts[..., 0] - counts[..., 2]) / n).mean(axis=1)  # [R]
    low, high = np.quantile(draws, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return Interval(float((shares[:, 0] - shares[:, 2]).mean()), float(low), float(high))
