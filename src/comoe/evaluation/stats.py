"""Paired statistics of two evaluations of the same questions: the difference with a paired bootstrap 95%
interval (the test questions' noise), Student's t over training seeds (would another training run agree?),
and how many questions or seeds a 1-point difference needs. One implementation for `comoe compare`,
multi-adapter `comoe eval` and benchmarks/reproduce.py. Pure Python: Student's t quantile is computed here
(tested against scipy's), so nothing beyond the standard library is needed.

A paired difference is given as `diffs`: one list per paired seed of a's answer minus b's on each question
(+1, 0, -1), every seed over the same questions in the same order.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

POWER_FACTOR = (1.96 + 0.84) ** 2  # (z for two-sided 5% + z for 80% power)^2


def seed_means(diffs: list[list[int]]) -> list[float]:
    """Each paired seed's mean difference."""
    return [sum(seed_diffs) / len(seed_diffs) for seed_diffs in diffs]


def paired_bootstrap(diffs: list[list[int]], samples: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of the pooled mean difference, questions resampled with replacement within
    each seed (all seeds pooled, each weighted by its questions); seeded, so the same answers give the same
    interval."""
    rng = random.Random(seed)
    means = []
    for _ in range(samples):
        total = count = 0
        for seed_diffs in diffs:
            picks = [seed_diffs[rng.randrange(len(seed_diffs))] for _ in seed_diffs]
            total, count = total + sum(picks), count + len(picks)
        means.append(total / count)
    means.sort()
    return [means[int(0.025 * samples)], means[int(0.975 * samples) - 1]]


def paired_difference(diffs: list[list[int]], samples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean difference over every paired seed and question, with two 95% intervals.

    `ci95`, a paired bootstrap (`paired_bootstrap`), measures the test questions' noise for these trained
    adapters only. `seed_ci95`, Student's t over the per-seed differences (None below two seeds), also
    counts the spread between training seeds, which on small models is often the larger one: it is the
    interval for "would another training run agree?". `discordant` is the share of answers that differ
    (one right, the other wrong). Empty `diffs` (nothing paired) give {}."""
    diffs = [seed_diffs for seed_diffs in diffs if seed_diffs]
    if not diffs:
        return {}
    questions = sum(map(len, diffs))
    per_seed = seed_means(diffs)
    return {
        "mean": sum(map(sum, diffs)) / questions,
        "ci95": paired_bootstrap(diffs, samples, seed),
        "seed_ci95": seed_interval(per_seed),
        "per_seed": per_seed,
        "discordant": sum(d != 0 for seed_diffs in diffs for d in seed_diffs) / questions,
    }


def seed_interval(per_seed: list[float]) -> list[float] | None:
    """95% Student t interval for the mean of per-seed differences (n - 1 degrees of freedom), clipped to
    the feasible range [-1, 1] (-100 to +100 points: an accuracy difference cannot exceed it). With two or
    three seeds t's quantile is large (12.7 for two), so the unclipped interval often runs past that range;
    a clipped bound says only "anything up to the limit"."""
    if len(per_seed) < 2:
        return None
    half = t_quantile(0.975, len(per_seed) - 1) * statistics.stdev(per_seed) / math.sqrt(len(per_seed))
    centre = statistics.mean(per_seed)
    return [max(-1.0, centre - half), min(1.0, centre + half)]


def pooled_seed_intervals(per_seed: dict[str, list[float]]) -> dict[str, list[float]]:
    """95% intervals for the mean of each comparison's per-seed differences with one seed-to-seed standard
    deviation pooled over every comparison (the pooled within-group variance of a one-way layout:
    s_p^2 = sum_m (n_m - 1) s_m^2 / sum_m (n_m - 1), Student t with sum_m (n_m - 1) degrees of freedom),
    clipped to [-1, 1] like `seed_interval`. Assumes the comparisons share one seed-to-seed variance (the
    same training setting and test questions); in exchange, a comparison run on one or two seeds gets an
    interval that includes the seed-to-seed spread, which its own t interval (± 12.7 standard errors for two
    seeds, none for one) cannot give. Comparisons against one reference share its runs, so their
    spreads are not independent and the pooled degrees of freedom overstate the evidence somewhat: read
    the interval as approximate. Keys: comparison names; values: per-seed differences (fractions;
    a per-seed difference already carries its test questions' sampling noise). Every comparison with at
    least one seed gets an interval, none when no comparison has two seeds to measure the spread."""
    spread = [values for values in per_seed.values() if len(values) > 1]
    dof = sum(len(values) - 1 for values in spread)
    if dof == 0:
        return {}
    pooled = math.sqrt(sum((len(values) - 1) * statistics.variance(values) for values in spread) / dof)
    quantile = t_quantile(0.975, dof)
    intervals = {}
    for name, values in per_seed.items():
        if values:
            centre, half = statistics.mean(values), quantile * pooled / math.sqrt(len(values))
            intervals[name] = [max(-1.0, centre - half), min(1.0, centre + half)]
    return intervals


def questions_to_detect(discordant: float, effect: float = 0.01) -> int:
    """Paired test questions needed to detect a true difference `effect` (two-sided 5%, power 80%) when a
    `discordant` fraction of questions is answered differently: (1.96 + 0.84)^2 * discordant / effect^2."""
    return math.ceil(POWER_FACTOR * discordant / effect**2)


def seeds_to_detect(per_seed: list[float], effect: float = 0.01) -> int | None:
    """Training seeds needed to detect a true difference `effect` (two-sided 5%, power 80%, normal
    approximation) given the spread of the per-seed differences measured so far: (1.96 + 0.84)^2 * s^2 /
    effect^2. With three seeds s itself is rough, so this is an order of magnitude, not a plan."""
    if len(per_seed) < 2:
        return None
    return max(2, math.ceil(POWER_FACTOR * statistics.variance(per_seed) / effect**2))


# ---- Student's t without scipy ----------------------------------------------------------------------------


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (scipy.stats.t.ppf(p, df)), by bisection
    on the distribution function (the regularised incomplete beta function): to the last bits of a float."""
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"t_quantile: p={p!r} must be in (0, 1) and df={df!r} > 0")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    if p == 0.5:
        return 0.0
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (near 0 from the centre, so that quantiles
    close to the median keep their precision)."""
    square = t * t / (df + t * t)
    if square < 0.5:
        half = 0.5 * regularized_beta(square, 0.5, df / 2)
        return 0.5 + half if t > 0 else 0.5 - half
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2, 0.5)
    return 1 - tail if t > 0 else tail


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, by its continued fraction (modified Lentz),
    evaluated on the side of x where it converges fast."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1 - regularized_beta(1 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    return math.exp(log_front) * _beta_fraction(x, a, b) / a


def _beta_fraction(x: float, a: float, b: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1) < 1e-16:
            break
    return result
