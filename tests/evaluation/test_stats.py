"""comoe.evaluation.stats: Student's t without scipy (checked against scipy), the paired bootstrap against a
hand-written resampling loop, the seed interval and the power formulas."""

import math
import random
import statistics

import pytest

from comoe.evaluation.stats import (
    paired_bootstrap,
    paired_difference,
    pooled_seed_intervals,
    questions_to_detect,
    seed_interval,
    seed_means,
    seeds_to_detect,
    t_cdf,
    t_quantile,
)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 7, 9, 10, 20, 29, 50, 100, 1000, 0.5, 2.5):
        for p in (0.5001, 0.6, 0.9, 0.95, 0.975, 0.99, 0.995, 0.9995, 0.025, 0.1, 1e-6):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8), (p, df)
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, rel=1e-9)


def test_t_quantile_known_values_and_refusals():
    # closed forms: tan(pi (p - 1/2)) for 1 degree of freedom, (2p - 1) / sqrt(2p(1 - p)) for 2
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-12)
    assert t_quantile(0.5, 3) == 0.0 and t_quantile(0.025, 4) == -t_quantile(0.975, 4)
    with pytest.raises(ValueError, match="p=1"):
        t_quantile(1, 3)
    with pytest.raises(ValueError, match="df=0"):
        t_quantile(0.9, 0)


def test_paired_bootstrap_is_the_seeded_resampling_loop():
    diffs = [[1, 0, -1, 1, 0, 0, 1], [0, 0, 1, -1, 1, 1, 0]]
    rng, means = random.Random(3), []
    for _ in range(500):
        picks = [seed[rng.randrange(len(seed))] for seed in diffs for _ in seed]
        means.append(sum(picks) / len(picks))
    means.sort()
    assert paired_bootstrap(diffs, samples=500, seed=3) == [means[12], means[486]]


def test_paired_difference_counts_and_brackets_the_mean():
    diffs = [[1, 0, 0, 1], [0, -1, 0, 1]]
    diff = paired_difference(diffs)
    assert diff["mean"] == pytest.approx(2 / 8) and diff["per_seed"] == [0.5, 0.0]
    assert diff["discordant"] == pytest.approx(4 / 8)
    assert diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
    assert diff["seed_ci95"] == seed_interval([0.5, 0.0])
    assert paired_difference([]) == {} and paired_difference([[]]) == {}
    assert paired_difference([[1, 1]])["seed_ci95"] is None  # one seed: no spread to measure


def test_seed_interval_and_power():
    per_seed = [0.015, -0.011, 0.023]
    half = 4.302652729911275 * statistics.stdev(per_seed) / 3**0.5
    assert seed_interval(per_seed) == [pytest.approx(0.009 - half), pytest.approx(0.009 + half)]
    assert seed_interval([0.1]) is None and seed_means([[1, 0], [0, 0, 0, -1]]) == [0.5, -0.25]
    # two seeds far apart: t's 12.7 * spread runs past +-1 (-342.7 to +292.7 points unclipped)
    assert seed_interval([-0.6, 0.1]) == [-1.0, 1.0]
    assert seed_interval([0.7, 0.8]) == [pytest.approx(0.75 - 12.706 * 0.05, abs=1e-3), 1.0]
    assert abs(questions_to_detect(0.5, effect=0.1) - 392) <= 1
    assert seeds_to_detect([-0.021, 0.044, 0.002]) == 86 and seeds_to_detect([0.01]) is None


def test_pooled_seed_intervals_pool_the_spread_of_every_comparison_with_two_seeds_or_more():
    stats = pytest.importorskip("scipy.stats")
    per_seed = {"a": [0.01, 0.02, 0.03], "b": [0.02, -0.01], "c": [-0.03]}
    # by hand: squared deviations 2e-4 (a, 2 df) and 4.5e-4 (b, 1 df): s_p^2 = 6.5e-4 / 3 with 3 df
    pooled = math.sqrt(6.5e-4 / 3)
    t = stats.t.ppf(0.975, 3)
    got = pooled_seed_intervals(per_seed)
    for name, values in per_seed.items():
        centre, half = sum(values) / len(values), t * pooled / math.sqrt(len(values))
        assert got[name] == pytest.approx([centre - half, centre + half], rel=1e-9), name
    # a one-seed comparison gets an interval (c) where its own t interval has none
    assert seed_interval(per_seed["c"]) is None and got["c"][0] < -0.03 < got["c"][1]
    # with two seeds the pooled interval is far narrower than the comparison's own (t with 1 df)
    own = seed_interval(per_seed["b"])
    assert got["b"][1] - got["b"][0] < (own[1] - own[0]) / 2
    assert pooled_seed_intervals({"x": [0.1], "y": [0.2]}) == {}  # no spread measured: no interval
    assert pooled_seed_intervals({"x": [0.9, 0.99], "y": [0.0, 0.5]})["x"][1] == 1.0  # clipped
