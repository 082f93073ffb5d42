"""Where a quality curve crosses its target, and how sure we are: the arithmetic of time to quality
that resolves rows whose gaps are smaller than an evaluation interval.

A validation curve scored every few steps moves by more than the gaps between rows from one
evaluation to the next, so "the first evaluation at or below the target" quantises every row's
answer to the evaluation interval and lets noise pick the crossing. Here instead:

- ``best_so_far``: the running minimum of the curve (a checkpoint that reached a perplexity keeps
  it; a later bump does not undo the crossing);
- ``crossing_step``: the step where the best-so-far curve reaches the target, interpolated linearly
  between the last evaluation above it and the first at or below it;
- ``bootstrap_interval``: a percentile bootstrap interval of a statistic of independent samples
  (the crossing steps of several seeds, the seconds per step of several repeats);
- ``time_to_target``: steps to the target x seconds per step, from independent samples of each
  (the steps from seeds, the seconds from repeats on the emulated cluster), with its bootstrap
  interval (not ``benchmarks.time_to_quality.time_to_target``, the first evaluation at or below
  the target); ``separated`` says whether two such intervals do not overlap.

Pure Python (no torch): the benchmarks and their tests import it.
"""
from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def best_so_far(curve: Sequence[dict], key: str = "valid_ppl") -> list[dict]:
    """``curve`` (points {"step", key, ...} in step order) with ``key`` replaced by its running
    minimum; a non-finite value counts as not better than what came before."""
    out, best = [], math.inf
    last = -math.inf
    for point in curve:
        if point["step"] <= last:
            raise ValueError(f"the curve's steps must increase; got {point['step']} after {last}")
        last = point["step"]
        v = point[key]
        if math.isfinite(v) and v < best:
            best = v
        out.append({**point, key: best})
    return out


def crossing_step(curve: Sequence[dict], target: float, key: str = "valid_ppl") -> float | None:
    """The step at which the best-so-far of ``curve`` reaches ``target`` (lower is better),
    interpolated linearly between the two evaluations around it; the first step if the curve
    starts at or below it; None if it never gets there."""
    if not math.isfinite(target):
        raise ValueError(f"the target must be a finite number, got {target}")
    prev = None
    for point in best_so_far(curve, key):
        v = point[key]
        if v <= target:
            if prev is None or not math.isfinite(prev[key]):
                return float(point["step"])
            s0, v0, s1 = prev["step"], prev[key], point["step"]
            return s0 + (s1 - s0) * (v0 - target) / (v0 - v)  # v0 > target >= v: within (s0, s1]
        prev = point
    return None


@dataclass(frozen=True)
class Interval:
    """A point estimate and its ``level`` bootstrap interval [low, high]."""

    value: float
    low: float
    high: float
    level: float
    samples: int  # the independent samples it came from (for the product: the smaller count)

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``sorted_values``, linear between order statistics."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _interval(point: float, draws: list[float], level: float, samples: int) -> Interval:
    """``point`` with the central ``level`` range of its bootstrap ``draws``."""
    draws = sorted(draws)
    tail = (1 - level) / 2
    return Interval(point, _percentile(draws, tail), _percentile(draws, 1 - tail), level, samples)


def _check(values: Sequence[float], what: str) -> list[float]:
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError(f"{what}: no samples")
    bad = [v for v in vals if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what}: non-finite samples {bad} (a run that missed the target has no crossing: "
                         "report it as missed instead of averaging it)")
    return vals


def bootstrap_interval(values: Sequence[float], stat: Callable[[Sequence[float]], float] = statistics.fmean,
                       level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> Interval:
    """``stat`` of ``values`` with its percentile bootstrap interval at ``level`` (resampling the
    values with replacement ``resamples`` times, from a fixed ``seed``: the same inputs give the
    same interval). With one value the interval is that value: one sample tells no spread."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    vals = _check(values, "bootstrap_interval")
    point = stat(vals)
    if len(vals) == 1:
        return Interval(point, point, point, level, 1)
    rng = random.Random(seed)
    n = len(vals)
    return _interval(point, [stat([vals[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples)], level, n)


def time_to_target(steps: Sequence[float], seconds_per_step: Sequence[float], level: float = 0.95,
                   resamples: int = 10_000, seed: int = 0) -> Interval:
    """Mean steps to the target (one per seed) x mean seconds per step (one per repeat), with a
    bootstrap interval that resamples both independently."""
    s = _check(steps, "steps to target")
    t = _check(seconds_per_step, "seconds per step")
    point = statistics.fmean(s) * statistics.fmean(t)
    if len(s) == 1 and len(t) == 1:
        return Interval(point, point, point, level, 1)
    rng = random.Random(seed)
    draws = [statistics.fmean([s[rng.randrange(len(s))] for _ in s]) *
             statistics.fmean([t[rng.randrange(len(t))] for _ in t]) for _ in range(resamples)]
    return _interval(point, draws, level, min(len(s), len(t)))


def separated(a: Interval, b: Interval) -> bool:
    """Whether the two intervals do not overlap (then the gap exceeds the spread at their level)."""
    return a.high < b.low or b.high < a.low
