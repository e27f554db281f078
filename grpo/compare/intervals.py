"""Confidence intervals for comparisons over seeds and shared evaluation problems, and the family-wise rule.

The design is crossed: every seed of every arm is evaluated on the same held-out problems (the split is built
without the run's seed). Outcome x[s, i] (1 = seed s solved problem i; for a difference between two arms, the
first arm's outcome minus the second's on the same seed and problem) follows the two-way random-effects model
x[s, i] = mu + a[s] + b[i] + e[s, i]. The estimand is mu, the mean over the population of seeds and of problems
the split was drawn from; its estimate, the grand mean, has variance

    Var = var_a / S + var_b / n + var_e / (S n).

The problem term var_b / n is NOT divided by S: every seed (and both arms) sees the same n problems, so their
draw is one draw for the whole comparison. A bootstrap replicate therefore draws ONE set of n problem indices
and applies it to every seed and both arms. Redrawing each seed's problems apart, as a per-seed bootstrap does,
divides that term by S and gives intervals too narrow by up to sqrt(S).

How each part is estimated (moment estimators of the two-way ANOVA, e.g. Searle, Casella & McCulloch,
"Variance Components", ch. 4):

- seed part: the sample variance of the S seed means, over S (E = var_a / S + var_e / (S n)), S - 1 degrees
  of freedom;
- problem part: the variance of the grand mean over replicates that each draw one shared set of problem
  indices, in closed form (the limit of infinitely many replicates, with the n / (n - 1) correction: the
  sample variance of the n problem means over seeds, over n; E = var_b / n + var_e / (S n)), less the residual
  mean square over S n, which both parts contain (E[MS_e] = var_e); n - 1 degrees of freedom. The closed form
  has no Monte Carlo noise and is vectorised over many comparisons, which lets coverage be checked by
  simulation (tests/unit/test_intervals.py also checks it against replicates drawn one by one).

The interval is mean -+ sqrt(t_seed^2 x seed part + t_problem^2 x problem part), each part scaled by Student's
97.5% quantile at its own degrees of freedom: at 3 seeds t_seed is 4.30, not 1.96, which is what a
percentile bootstrap over 3 seed values cannot give (3 values resampled never leave their range, and their
variance is biased low by (S - 1) / S). Adding the scaled parts in quadrature is conservative where both parts
matter; a single Satterthwaite t on their sum covered 0.93-0.95 in the simulations of
tests/unit/test_intervals.py, this 0.95-0.98. The p-value of a difference is the alpha at which the same
construction at 1 - alpha just reaches 0, so "p < 0.05" and "the 95% interval excludes 0" agree.

Single-arm accuracies near 0 and 1: the interval is widened, where it is narrower, to the Wilson score interval
of the S n outcomes taken as independent (the least a binomial count leaves uncertain), so an arm that solved
1,500 of 1,500 gets [0.997, 1.000], never a zero-width [1.000, 1.000]. A difference whose every outcome is the
same (V = 0) gets the Wilson bound on the share of problems where the arms could still disagree.

Two arms' splits that hold different problems (the gap between in-distribution and out-of-distribution
accuracy, on problems of another kind) are paired by seed only: the seed part is the variance of the per-seed
differences, and the two problem parts add, each drawn with its own shared indices. Splits of the same problems
(a paraphrase of the test split) are paired by problem as two arms are.

When per-problem outcomes were not logged, only per-seed accuracies p[s] on n problems are known: the problem
part is then bounded, not estimated (p(1 - p) / n for an accuracy, (sd_1 + sd_2)^2 / n for a difference on the
same problems, the most any correlation between the arms allows), which is conservative.

The family-wise rule: a table's differences are judged together with Holm's step-down procedure (Holm 1979,
"A simple sequentially rejective multiple test procedure") at 5%: the p-values (two-sided, as above) are
sorted, the k-th smallest of m is multiplied by m - k + 1, made non-decreasing, and a difference is supported
when its adjusted p-value is below 0.05. This holds the chance of any false "supported" in the table to 5%
whatever the dependence between the comparisons. Each printed interval stays a 95% interval on its own, so one
can exclude 0 while its difference is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
Z = 1.959963984540054  # the normal's 97.5% quantile: the Wilson floor's
_THETA = np.linspace(0.0, np.pi / 2, 4001)  # the grid Student's t distribution is integrated on (`t_quantile`)
_MAX_DF = 1_000.0  # held there: the 97.5% quantile is then 1.962 (the normal's 1.960), and the grid resolves it
_ALPHAS = np.geomspace(1e-6, 1.0, 2401)  # the levels `p_value` reads a p-value from


@dataclass(frozen=True)
class Interval:
    """An estimate, its 95% interval and, for a difference, its two-sided p-value against 0."""

    mean: float
    low: float
    high: float
    p_value: float | None = None

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def outcome_grid(outcomes: list[str], what: str = "outcomes") -> np.ndarray:
    """Seeds' per-problem outcomes ("0110...", the same problems in the same order) as a [S, n] 0/1 array."""
    if not outcomes:
        raise ValueError(f"{what}: need at least one seed")
    sizes = sorted({len(o) for o in outcomes})
    if len(sizes) != 1 or sizes[0] == 0:
        raise ValueError(f"{what}: every seed needs the same problems, got {sizes} problems per seed")
    if any(set(o) - {"0", "1"} for o in outcomes):
        raise ValueError(f"{what}: outcomes are strings of 0 and 1, got {outcomes[0][:20]!r}...")
    return np.array([[c == "1" for c in o] for o in outcomes], dtype=float)  # [S, n]


def accuracy_interval(outcomes: list[str]) -> Interval:
    """An arm's accuracy, the mean over its seeds and the split's problems, with its interval."""
    return _as_interval(*crossed_accuracy(outcome_grid(outcomes)))


def difference_interval(first: list[str], second: list[str], *, same_problems: bool = True) -> Interval:
    """The first arm's accuracy minus the second's, paired by seed (`first[s]` and `second[s]` come from the same
    seed), and by problem when `same_problems` (the same problems in the same order on both sides); otherwise
    the two hold different problems (e.g. in-distribution against out-of-distribution)."""
    if len(first) != len(second):
        raise ValueError(f"paired by seed: need the same seeds on both sides, got {len(first)} and {len(second)}")
    a, b = outcome_grid(first, "first"), outcome_grid(second, "second")
    if same_problems and a.shape != b.shape:
        raise ValueError(f"paired by problem: need the same problems, got {a.shape[1]} and {b.shape[1]}")
    return _as_interval(*crossed_difference(a, b, same_problems=same_problems))


def crossed_accuracy(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """(mean, low, high, p) of accuracies x [..., S, n] (0/1), over any leading batch dimensions; p is NaN."""
    mean, parts = variance_parts(x)
    half = half_width(parts)
    w_low, w_high = wilson(mean, x.shape[-2] * x.shape[-1])  # the floor: S n outcomes as if independent
    low, high = np.minimum(np.clip(mean - half, 0, 1), w_low), np.maximum(np.clip(mean + half, 0, 1), w_high)
    return mean, low, high, np.full_like(mean, np.nan)


def crossed_difference(a: np.ndarray, b: np.ndarray, *, same_problems: bool = True) -> tuple[np.ndarray, ...]:
    """(mean, low, high, p) of mean(a) - mean(b), a [..., S, n_a], b [..., S, n_b], paired by seed, and by
    problem when `same_problems` (then n_a == n_b and column i of both is the same problem)."""
    if same_problems:
        mean, parts = variance_parts(a - b)
    else:
        (mean_a, (_, problem_a)), (mean_b, (_, problem_b)) = variance_parts(a), variance_parts(b)
        seeds = a.shape[-2]
        per_seed = a.mean(-1) - b.mean(-1)  # [..., S]
        seed = per_seed.var(-1, ddof=1) / seeds if seeds > 1 else np.zeros_like(mean_a)
        mean, parts = mean_a - mean_b, [(seed, seeds - 1), problem_a, problem_b]
    half = half_width(parts)
    # every outcome the same (no variance to estimate): at most a Wilson bound's share of them could differ
    _, could_differ = wilson(np.zeros_like(mean), a.shape[-2] * a.shape[-1])
    half = np.where(half > 0, half, could_differ)
    return mean, np.clip(mean - half, -1, 1), np.clip(mean + half, -1, 1), p_value(mean, parts)


def variance_parts(x: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, int]]]:
    """(grand mean, [(seed part, S - 1), (problem part, n - 1)]) of outcomes x [..., S, n]: the module
    docstring's estimators, each with its degrees of freedom."""
    seeds, n = x.shape[-2:]
    seed_means, problem_means = x.mean(-1), x.mean(-2)  # [..., S], [..., n]
    mean = seed_means.mean(-1)
    problem = problem_means.var(-1, ddof=1) / n if n > 1 else np.zeros_like(mean)
    if seeds == 1:  # the seed part cannot be estimated; the problem part holds all there is
        return mean, [(np.zeros_like(mean), 0), (problem, n - 1)]
    seed = seed_means.var(-1, ddof=1) / seeds
    residual = x - seed_means[..., None] - problem_means[..., None, :] + mean[..., None, None]
    ms_e = (residual**2).sum((-2, -1)) / ((seeds - 1) * max(n - 1, 1))
    return mean, [(seed, seeds - 1), (np.maximum(problem - ms_e / (seeds * n), 0.0), n - 1)]


def half_width(parts: list[tuple[np.ndarray, int]], alpha: float = 1 - LEVEL) -> np.ndarray:
    """sqrt(sum_k t_k^2 V_k): each variance part V_k times its own Student quantile t_k (two-sided 1 - alpha, at
    its degrees of freedom), added in quadrature; parts with no degrees of freedom are empty."""
    return np.sqrt(sum(t_quantile(df, alpha) ** 2 * np.maximum(v, 0.0) for v, df in parts if df > 0))


def p_value(mean: np.ndarray, parts: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """The two-sided p-value of mean against 0 that matches `half_width`: the alpha at which the 1 - alpha
    interval just reaches 0 (found on a grid of alphas from 1e-6 to 1; below 1e-6 it reads 1e-6)."""
    quantiles = {df: t_quantile(df, _ALPHAS) for _, df in parts if df > 0}  # [A] each
    halves = np.sqrt(sum(quantiles[df][None, :] ** 2 * np.maximum(np.ravel(v), 0.0)[:, None]
                         for v, df in parts if df > 0))  # [K, A], decreasing along the alphas
    distance = np.abs(np.ravel(mean))
    reached = halves <= distance[:, None]
    j = np.clip(np.argmax(reached, axis=1), 1, len(_ALPHAS) - 1)  # the smallest alpha whose interval reaches 0
    k = np.arange(len(distance))
    above, below = halves[k, j - 1], halves[k, j]  # interpolated in log alpha between the two grid points
    w = np.clip((above - distance) / np.where(above > below, above - below, 1.0), 0.0, 1.0)
    p = np.exp(np.log(_ALPHAS[j - 1]) * (1 - w) + np.log(_ALPHAS[j]) * w)
    p = np.where(reached.any(axis=1), p, 1.0)
    return np.where(distance == 0, 1.0, p).reshape(np.shape(mean))


def wilson(p, n: int, z: float = Z) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval of a proportion p out of n independent trials (Wilson 1927)."""
    p = np.asarray(p, float)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def t_quantile(df: float, alpha=1 - LEVEL) -> np.ndarray:
    """Student's t quantile at 1 - alpha / 2 (two-sided 1 - alpha) with df >= 1 degrees of freedom, not
    necessarily whole. numpy has no t distribution: with t = sqrt(df) tan(theta) its density becomes
    proportional to cos(theta)^(df - 1) on [0, pi/2), which the trapezoid rule integrates to about 1e-7 on the
    grid `_THETA`; df is held at most 1,000 (quantile 1.962 against the normal's 1.960)."""
    df = min(max(float(df), 1.0), _MAX_DF)
    density = np.cos(_THETA) ** (df - 1)  # [G]
    cumulative = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(_THETA))])
    theta = np.interp((1 - np.asarray(alpha, float)) * cumulative[-1], cumulative, _THETA)
    return np.sqrt(df) * np.tan(theta)


def _as_interval(mean, low, high, p) -> Interval:
    p = float(p)
    return Interval(float(mean), float(low), float(high), None if np.isnan(p) else p)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the given order: the k-th smallest of m times m - k + 1, made
    non-decreasing along the sorted order, at most 1."""
    order = np.argsort(p_values, kind="stable")
    m, adjusted, running = len(p_values), [0.0] * len(p_values), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p_values[i]))
        adjusted[i] = running
    return adjusted


def rates_accuracy(per_seed: list[float], problems: int) -> Interval:
    """An accuracy from per-seed accuracies on `problems` shared problems, for runs that logged no per-problem
    outcomes: the problem part bounded by p(1 - p) / n (the module docstring)."""
    x = _rates_checked(per_seed, per_seed, problems)
    mean = float(x.mean())
    half = float(half_width(_rates_parts(x, mean * (1 - mean) / problems, problems)))
    w_low, w_high = wilson(mean, x.size * problems)
    return Interval(mean, min(max(mean - half, 0.0), float(w_low)), max(min(mean + half, 1.0), float(w_high)))


def rates_difference(first: list[float], second: list[float], problems: int, second_problems: int | None = None
                     ) -> Interval:
    """first - second from per-seed accuracies, paired by seed, for runs that logged no per-problem outcomes:
    on the same `problems` problems when `second_problems` is None (problem part bounded by (sd_1 + sd_2)^2 / n,
    whatever the arms' correlation), on `second_problems` other problems otherwise."""
    a, b = _rates_checked(first, second, problems), _rates_checked(second, first, second_problems or problems)
    pa, pb = a.mean(), b.mean()
    if second_problems is None:
        bound = (np.sqrt(pa * (1 - pa)) + np.sqrt(pb * (1 - pb))) ** 2 / problems
    else:
        bound = pa * (1 - pa) / problems + pb * (1 - pb) / second_problems
    parts = _rates_parts(a - b, bound, min(problems, second_problems or problems))
    mean = float((a - b).mean())
    half = float(half_width(parts))
    return Interval(mean, max(mean - half, -1.0), min(mean + half, 1.0), float(p_value(np.asarray(mean), parts)))


def _rates_checked(values: list[float], other: list[float], problems: int) -> np.ndarray:
    if len(values) != len(other) or not values:
        raise ValueError(f"paired by seed: need the same seeds on both sides, got {len(values)} and {len(other)}")
    if problems < 1:
        raise ValueError(f"problems must be >= 1, got {problems}")
    return np.asarray(values, float)


def _rates_parts(per_seed: np.ndarray, problem_bound: float, problems: int) -> list[tuple[np.ndarray, int]]:
    seed = per_seed.var(ddof=1) / per_seed.size if per_seed.size > 1 else 0.0
    return [(np.asarray(seed), per_seed.size - 1), (np.asarray(problem_bound), problems - 1)]
