"""Confidence intervals for comparisons over seeds: a two-level bootstrap, over seeds and over problems.

An arm's accuracy varies for two reasons: the seed (the run's trajectory) and the finite evaluation
set. One bootstrap replicate resamples both:

1. draw S seeds from the S observed ones, with replacement;
2. for each drawn seed, redraw its accuracy on n problems: resampling n right/wrong outcomes with
   replacement from a run that got a fraction p right gives Binomial(n, p) / n;
3. average over the drawn seeds.

The 95% interval is the 2.5th and 97.5th percentile of 10,000 replicates. A difference between two arms
is paired by seed: replicate the per-seed differences (each side redrawn over its own problems, which
ignores that both arms saw the same problems and so is, if anything, wider than a paired-problem
bootstrap). With fewer than two seeds the seed level has no spread to show, and the interval reflects
the problems only.
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
