"""benchmarks.crossing on synthetic curves and samples with known answers: the interpolated crossing
on the best-so-far curve, the bootstrap intervals, the steps x seconds product, the overlap test."""
import math
import random
import statistics

import pytest

from benchmarks.crossing import Interval, best_so_far, bootstrap_interval, crossing_step, separated, time_to_target


def curve(*points):
    return [{"step": s, "valid_ppl": p} for s, p in points]


def test_the_crossing_is_interpolated_between_the_evaluations_around_it():
    # a straight line from 200 at step 0 to 100 at step 100: it reaches 150 at step 50 exactly,
    # whichever evaluations are kept
    for every in (10, 25, 30, 40):
        steps = list(range(0, 101, every)) + ([100] if 100 % every else [])
        c = curve(*[(s, 200 - s) for s in steps])
        assert crossing_step(c, 150.0) == pytest.approx(50.0)
    assert crossing_step(curve((0, 200.0), (25, 120.0)), 140.0) == pytest.approx(25 * 60 / 80)
    assert crossing_step(curve((0, 130.0), (25, 120.0)), 140.0) == 0.0  # starts at or below the target
    assert crossing_step(curve((0, 200.0), (25, 150.0)), 140.0) is None  # never gets there
    assert crossing_step(curve((0, 200.0), (25, 140.0)), 140.0) == 25.0  # "at or below"


def test_the_best_so_far_curve_keeps_a_crossing_a_later_bump_would_undo():
    c = curve((0, 200.0), (25, 139.0), (50, 150.0), (75, 138.0))
    assert [p["valid_ppl"] for p in best_so_far(c)] == [200.0, 139.0, 139.0, 138.0]
    assert crossing_step(c, 140.0) == pytest.approx(25 * 60 / 61)
    # a bump above the best does not make a second crossing; a NaN evaluation is not an improvement
    c = curve((0, 200.0), (25, math.nan), (50, 160.0), (75, 120.0))
    assert [p["valid_ppl"] for p in best_so_far(c)] == [200.0, 200.0, 160.0, 120.0]
    assert crossing_step(c, 140.0) == pytest.approx(50 + 25 * 20 / 40)
    with pytest.raises(ValueError, match="must increase"):
        best_so_far(curve((0, 1.0), (0, 2.0)))
    with pytest.raises(ValueError, match="finite"):
        crossing_step(c, math.nan)


def test_a_mean_s_bootstrap_interval_covers_it_with_the_normal_width():
    rng = random.Random(1)
    sigma, n = 2.0, 400
    values = [10.0 + rng.gauss(0, sigma) for _ in range(n)]
    iv = bootstrap_interval(values, resamples=4000, seed=3)
    assert iv.value == pytest.approx(statistics.fmean(values))
    assert iv.low < iv.value < iv.high and iv.samples == n
    width = 2 * 1.96 * statistics.stdev(values) / math.sqrt(n)  # the normal interval's width
    assert iv.high - iv.low == pytest.approx(width, rel=0.15)
    assert bootstrap_interval(values, resamples=4000, seed=3) == iv  # the same seed: the same interval
    one = bootstrap_interval([5.0])
    assert (one.low, one.value, one.high) == (5.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="missed the target"):
        bootstrap_interval([1.0, math.inf])
    with pytest.raises(ValueError, match="no samples"):
        bootstrap_interval([])


def test_a_95_percent_interval_covers_the_true_mean_about_95_times_in_100():
    rng = random.Random(7)
    covered = 0
    for trial in range(200):
        values = [rng.expovariate(1.0) for _ in range(40)]  # true mean 1, skewed
        iv = bootstrap_interval(values, resamples=400, seed=trial)
        covered += iv.low <= 1.0 <= iv.high
    assert 0.88 <= covered / 200 <= 0.99, covered


def test_time_to_target_is_steps_times_seconds_with_both_spreads():
    iv = time_to_target([300.0, 320.0, 340.0, 310.0, 330.0], [0.30, 0.31, 0.29], resamples=4000)
    assert iv.value == pytest.approx(320.0 * 0.30)
    assert iv.low < iv.value < iv.high and iv.samples == 3
    steps_only = time_to_target([300.0, 320.0, 340.0, 310.0, 330.0], [0.30], resamples=4000)
    seconds_only = time_to_target([320.0], [0.30, 0.31, 0.29], resamples=4000)
    both = iv.high - iv.low  # both spreads together are wider than either alone
    assert both > steps_only.high - steps_only.low and both > seconds_only.high - seconds_only.low
    assert time_to_target([100.0], [0.5]) == Interval(50.0, 50.0, 50.0, 0.95, 1)


def test_rows_are_told_apart_only_when_their_intervals_do_not_overlap():
    a = time_to_target([300, 305, 310, 295, 300], [0.30, 0.301, 0.299])
    b = time_to_target([350, 355, 360, 345, 350], [0.30, 0.301, 0.299])
    c = time_to_target([290, 330, 300, 320, 310], [0.30, 0.301, 0.299])
    assert separated(a, b) and separated(b, a)
    assert not separated(a, c)  # 5% apart in the means, but the seeds spread more than that
