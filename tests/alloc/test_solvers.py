"""Solvers against brute force on small random R-D tables."""
import numpy as np
import pytest

from hvd_gradq.alloc.solvers import AMPASchedule, RDCurves, brute_force, greedy, lagrangian, mckp_dp, same_bits


def random_curves(rng, layers, options=(0, 2, 3, 4, 8)):
    sizes = rng.integers(1, 50, size=layers) * 64
    rate = np.outer(sizes, options).astype(float)
    # distortion falls with bits, roughly 4^-b times a layer sensitivity, with noise
    sens = rng.lognormal(0, 1.5, size=layers)
    base = np.array([4.0 ** -b for b in options])
    dist = sens[:, None] * base[None, :] * rng.uniform(0.5, 1.5, size=(layers, len(options)))
    dist = np.minimum.accumulate(dist, axis=1)  # more bits never hurt
    names = tuple(f"l{i}" for i in range(layers))
    return RDCurves(names, tuple(options), dist, rate)


@pytest.mark.parametrize("seed", range(60))
def test_dp_is_optimal_and_lagrangian_and_greedy_stay_in_budget(seed):
    rng = np.random.default_rng(seed)
    curves = random_curves(rng, int(rng.integers(1, 7)))
    budget = float(rng.uniform(curves.min_rate, curves.max_rate))
    best = brute_force(curves, budget)
    dp = mckp_dp(curves, budget)
    assert dp.info["exact"]
    assert dp.rate <= budget and dp.distortion == pytest.approx(best.distortion, rel=1e-12, abs=1e-15)
    lag = lagrangian(curves, budget)
    assert lag.rate <= budget + 1e-9
    assert lag.distortion >= best.distortion - 1e-12
    # the Lagrangian point is optimal for its own rate (it lies on the lower convex hull)
    assert lag.distortion == pytest.approx(brute_force(curves, lag.rate).distortion, rel=1e-9, abs=1e-15)
    gr = greedy(curves, budget)
    assert gr.rate <= budget + 1e-9 and gr.distortion >= best.distortion - 1e-12
    un = same_bits(curves, budget) if curves.rate[:, 0].sum() <= budget else None
    if un is not None:
        assert un.rate <= budget + 1e-9 and len(set(un.bits.values())) == 1


def test_lagrangian_gap_is_reported_against_the_dp():
    rng = np.random.default_rng(123)
    gaps = []
    for _ in range(40):
        curves = random_curves(rng, 6)
        budget = float(rng.uniform(curves.min_rate, curves.max_rate))
        lag, dp = lagrangian(curves, budget), mckp_dp(curves, budget)
        gaps.append(lag.distortion / dp.distortion - 1 if dp.distortion > 0 else 0.0)
    assert min(gaps) >= -1e-9
    assert np.median(gaps) < 0.5  # measured on these tables; the worst case is what the hull skips


def test_budget_errors_name_the_fix():
    curves = random_curves(np.random.default_rng(0), 3, options=(2, 4))
    with pytest.raises(ValueError, match="below the cheapest allocation"):
        lagrangian(curves, curves.min_rate - 1)
    for bad in (float("nan"), -1.0, True):
        with pytest.raises(ValueError, match="budget"):
            greedy(curves, bad)
    with pytest.raises(ValueError, match=r"\(layers, options\)"):
        RDCurves(("a",), (2, 4), np.zeros((1, 3)), np.zeros((1, 2)))


def test_ampa_raises_the_most_sensitive_layers_and_keeps_a_taboo_list():
    sched = AMPASchedule(levels=(4, 6, 8), alpha=0.5, thr=2)
    sens = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.5}
    assert sched.update(sens) == {"a": 6, "b": 6, "c": 4, "d": 4}
    assert sched.update(sens) == {"a": 8, "b": 8, "c": 4, "d": 4}
    sched.update(sens)
    sched.update(sens)  # a and b picked twice at the top: taboo
    assert sched.taboo == {"a", "b"}
    assert sched.update(sens) == {"a": 8, "b": 8, "c": 6, "d": 6}
