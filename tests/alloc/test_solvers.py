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
    hull = lagrangian(curves, budget, fill_budget=False)
    assert hull.rate <= budget + 1e-9
    # the bisection's point is optimal for its own rate (it lies on the lower convex hull)
    assert hull.distortion == pytest.approx(brute_force(curves, hull.rate).distortion, rel=1e-9, abs=1e-15)
    lag = lagrangian(curves, budget)  # then filled
    assert lag.rate <= budget + 1e-9 and lag.rate >= hull.rate
    assert best.distortion - 1e-12 <= lag.distortion <= hull.distortion
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


def realistic_curves(rng, layers):
    """Layers of very different sizes (biases to embeddings) at options 0..8 bits, distortion
    sensitivity * 4^-b with noise: the shape of the allocator's real tables."""
    options = tuple(range(9))
    sizes = np.exp(rng.uniform(np.log(1e3), np.log(5e6), size=layers)).round()
    rate = np.outer(sizes, options) * rng.uniform(1.0, 1.1, size=(layers, 1))
    sens = rng.lognormal(0, 2.0, size=layers) * sizes
    dist = sens[:, None] * np.array([4.0 ** -b for b in options])[None, :] * rng.uniform(0.7, 1.3, (layers, 9))
    dist = np.minimum.accumulate(dist, axis=1)
    return RDCurves(tuple(f"l{i}" for i in range(layers)), options, dist, rate)


@pytest.mark.parametrize("seed", range(30))
def test_lagrangian_spends_the_budget(seed):
    rng = np.random.default_rng(1000 + seed)
    curves = realistic_curves(rng, int(rng.integers(8, 60)))
    budget = float(rng.uniform(0.5, 4.0) * curves.rate[:, 1].sum())  # 0.5 to 4 bits per element
    hull = lagrangian(curves, budget, fill_budget=False)
    lag = lagrangian(curves, budget)
    dp = mckp_dp(curves, budget, units=20_000)
    assert lag.rate <= budget + 1e-6
    # >= 99% of the budget, or all of what an exact allocation spends (if it cannot spend 99% either)
    assert lag.rate >= min(0.99 * budget, dp.rate * (1 - 1e-3)), (lag.rate / budget, hull.rate / budget,
                                                                  dp.rate / budget)
    assert lag.distortion <= hull.distortion


def test_filling_closes_most_of_the_gap_to_the_exact_allocation():
    hull_gaps, gaps, hull_spent = [], [], []
    for seed in range(30):
        rng = np.random.default_rng(1000 + seed)
        curves = realistic_curves(rng, int(rng.integers(8, 60)))
        budget = float(rng.uniform(0.5, 4.0) * curves.rate[:, 1].sum())
        hull = lagrangian(curves, budget, fill_budget=False)
        lag, dp = lagrangian(curves, budget), mckp_dp(curves, budget, units=20_000)
        hull_gaps.append(hull.distortion / dp.distortion - 1)
        gaps.append(lag.distortion / dp.distortion - 1)
        hull_spent.append(hull.rate / budget)
    # measured on these tables: the bisection alone spends down to ~76% of the budget and is ~5%
    # worse than the exact allocation at the median; filled, the median gap is ~0 (worst ~0.8x:
    # one large layer that only many downgrades elsewhere could pay for)
    assert min(hull_spent) < 0.9  # the tables do exercise the fill
    assert np.median(gaps) < 0.01 < np.median(hull_gaps)


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
