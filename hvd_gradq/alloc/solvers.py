"""Solvers of the layer-wise bit allocation: min sum_l D_l(b_l) s.t. sum_l R_l(b_l) <= B. Pure numpy.

The input is an ``RDCurves`` table: for every layer l and bit option k, a distortion D[l, k] (any
metric from ``alloc.distortion``) and a rate R[l, k] in bits (the paper's b * N_l, or the real wire
bits of the layer's transport). All solvers return an ``Allocation`` that never exceeds the budget.

* ``lagrangian``  Algorithm 1 of the LAD paper: bisection on lambda over [0, lambda_max] where
                  lambda_max is the largest R-D slope, each layer taking argmin D + lambda R. The
                  bisection only reaches allocations on the lower convex hull of the summed R-D
                  curve and can leave a third of the budget unused; afterwards ``fill`` spends the
                  rest (single upgrades by slope, then pairs of moves that trade bits between two
                  layers). ``mckp_dp`` measures the remaining gap.
* ``greedy``      the paper's Greedy baseline: start every layer at its cheapest option and keep
                  raising the layer with the highest current distortion while the next option fits.
* ``same_bits``   the uniform-allocation baseline of the papers: the largest single option
                  that fits, for every layer.
* ``mckp_dp``     exact multiple-choice knapsack by dynamic programming on rates discretised into
                  ``units`` steps (rounded up, so its answer is feasible; exact when the rates are
                  multiples of the unit).
* ``AMPASchedule`` AMPA's interval schedule: raise the top alpha fraction of layers by sensitivity
                  one level, with a taboo list after ``thr`` selections at the top level.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hvd_gradq import checks


@dataclass(frozen=True)
class RDCurves:
    """Per-layer rate-distortion points: ``distortion`` and ``rate`` are (layers, options)."""

    names: tuple[str, ...]
    options: tuple[int, ...]
    distortion: np.ndarray
    rate: np.ndarray

    def __post_init__(self) -> None:
        d = np.asarray(self.distortion, dtype=np.float64)
        r = np.asarray(self.rate, dtype=np.float64)
        shape = (len(self.names), len(self.options))
        if d.shape != shape or r.shape != shape:
            raise ValueError(f"distortion and rate must be (layers, options) = {shape}, got {d.shape} and {r.shape}")
        if not (np.isfinite(d).all() and np.isfinite(r).all()):
            raise ValueError("distortion and rate must be finite")
        if (r < 0).any() or (d < 0).any():
            raise ValueError("distortion and rate must be >= 0")
        if len(self.names) == 0 or len(self.options) == 0:
            raise ValueError("need at least one layer and one bit option")
        object.__setattr__(self, "distortion", d)
        object.__setattr__(self, "rate", r)

    @property
    def min_rate(self) -> float:
        return float(self.rate.min(axis=1).sum())

    @property
    def max_rate(self) -> float:
        return float(self.rate.max(axis=1).sum())

    def allocation(self, choice, solver: str, **info) -> Allocation:
        choice = np.asarray(choice, dtype=np.int64)
        rows = np.arange(len(self.names))
        return Allocation(
            bits={n: int(self.options[k]) for n, k in zip(self.names, choice)},
            choice=tuple(int(k) for k in choice),
            rate=float(self.rate[rows, choice].sum()),
            distortion=float(self.distortion[rows, choice].sum()),
            solver=solver,
            info=info,
        )


@dataclass(frozen=True)
class Allocation:
    """A bit width per layer, with its total rate (bits) and total distortion."""

    bits: dict[str, int]
    choice: tuple[int, ...]
    rate: float
    distortion: float
    solver: str
    info: dict = field(default_factory=dict)
    #: layers sent as low-rank factors instead (``Allocator(ranks=...)``): name -> rank
    ranks: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        hist: dict[str, int] = {}
        for label in [f"{b}b" for b in sorted(self.bits.values())] + [f"r{r}" for r in sorted(self.ranks.values())]:
            hist[label] = hist.get(label, 0) + 1
        parts = " ".join(f"{k}:{c}" for k, c in hist.items())
        return f"{self.solver}: layers {parts}, rate {self.rate:.0f} bits, distortion {self.distortion:.4g}"


def _check_budget(curves: RDCurves, budget: float) -> float:
    checks.number(budget, "budget (bits)", low=0)
    if budget < curves.min_rate - 1e-9:
        raise ValueError(
            f"budget {budget:.0f} bits is below the cheapest allocation ({curves.min_rate:.0f} bits: every layer at "
            f"its smallest option); raise the budget or add a smaller bit option (e.g. 0 = not sent)"
        )
    return float(budget)


def _pick(curves: RDCurves, lam: float) -> np.ndarray:
    """argmin_k D[l,k] + lam R[l,k] per layer; ties go to the lower rate, then the lower index."""
    cost = curves.distortion + lam * curves.rate
    best = cost.min(axis=1, keepdims=True)
    tol = 1e-12 * np.maximum(1.0, np.abs(best))
    tied = cost <= best + tol
    rate = np.where(tied, curves.rate, np.inf)
    return rate.argmin(axis=1)


def _lambda_max(curves: RDCurves) -> float:
    """The largest slope (D_k - D_j) / (R_j - R_k) over option pairs with R_j > R_k: above it every
    layer takes its cheapest option."""
    d, r = curves.distortion, curves.rate
    dr = r[:, None, :] - r[:, :, None]  # [l, k, j] = R_j - R_k
    dd = d[:, :, None] - d[:, None, :]  # [l, k, j] = D_k - D_j
    with np.errstate(divide="ignore", invalid="ignore"):
        slopes = np.where(dr > 0, dd / dr, 0.0)
    return float(max(slopes.max(), 0.0))


def lagrangian(curves: RDCurves, budget: float, *, eps: float = 1e-9, max_iter: int = 200,
               fill_budget: bool = True) -> Allocation:
    """Algorithm 1: bisection on lambda until the interval is below ``eps`` (relative to lambda_max),
    then (``fill_budget``) ``fill`` spends what the hull point left of the budget."""
    budget = _check_budget(curves, budget)
    lam_hi = _lambda_max(curves) * (1 + 1e-9) + 1e-300
    lam_lo = 0.0
    best = _pick(curves, lam_hi)
    rows = np.arange(len(curves.names))
    if curves.rate[rows, best].sum() > budget + 1e-9:  # only through ties: take the cheapest options
        best = curves.rate.argmin(axis=1)
    first = _pick(curves, 0.0)
    if curves.rate[rows, first].sum() <= budget + 1e-9:
        return curves.allocation(first, "lagrangian", lam=0.0, iterations=0)
    iterations = 0
    tol = eps * lam_hi
    while lam_hi - lam_lo > tol and iterations < max_iter:
        iterations += 1
        mid = 0.5 * (lam_lo + lam_hi)
        choice = _pick(curves, mid)
        if curves.rate[rows, choice].sum() > budget + 1e-9:
            lam_lo = mid
        else:
            lam_hi, best = mid, choice
    hull_rate = float(curves.rate[rows, best].sum())
    if fill_budget:
        best = fill(curves, best, budget)
    return curves.allocation(best, "lagrangian", lam=lam_hi, iterations=iterations, hull_rate=hull_rate)


def fill(curves: RDCurves, choice: np.ndarray, budget: float, *, max_rounds: int = 200) -> np.ndarray:
    """Spend what ``choice`` leaves of ``budget``: move one layer to the option with the largest
    distortion drop per extra bit that still fits, until none fits; then trade: the pair of moves
    (one layer down, another up) that lowers the distortion most and fits, then fill again, until
    no pair helps (or ``max_rounds``)."""
    choice = np.array(choice, dtype=np.int64)
    rows = np.arange(len(curves.names))
    d, r = curves.distortion, curves.rate
    layers, options = d.shape
    same_layer = np.repeat(np.arange(layers), options)
    same_layer = same_layer[:, None] == same_layer[None, :]
    for _ in range(max_rounds):
        while True:  # single upgrades, best slope first
            slack = budget - float(r[rows, choice].sum())
            extra = r - r[rows, choice][:, None]
            gain = d[rows, choice][:, None] - d
            ok = (extra > 0) & (gain > 0) & (extra <= slack + 1e-9)
            if not ok.any():
                break
            slope = np.where(ok, gain / np.where(ok, extra, 1.0), -np.inf)
            layer, option = np.unravel_index(int(slope.argmax()), slope.shape)
            choice[layer] = option
        # pairs of moves in two different layers
        slack = budget - float(r[rows, choice].sum())
        dd = (d - d[rows, choice][:, None]).reshape(-1)
        dr = (r - r[rows, choice][:, None]).reshape(-1)
        total_d = dd[:, None] + dd[None, :]
        fits = (dr[:, None] + dr[None, :] <= slack + 1e-9) & ~same_layer
        total_d = np.where(fits, total_d, np.inf)
        best = int(total_d.argmin())
        if not total_d.flat[best] < -1e-12 * max(1.0, float(d[rows, choice].sum())):
            break
        a, b = divmod(best, layers * options)
        choice[a // options], choice[b // options] = a % options, b % options
    return choice


def greedy(curves: RDCurves, budget: float) -> Allocation:
    """The Greedy baseline: raise the most distorted layer to its next option while it fits."""
    budget = _check_budget(curves, budget)
    order = np.argsort(curves.rate, axis=1, kind="stable")  # options of each layer by rate
    pos = np.zeros(len(curves.names), dtype=np.int64)
    rows = np.arange(len(curves.names))
    choice = order[rows, pos]
    used = curves.rate[rows, choice].sum()
    blocked = np.zeros(len(curves.names), dtype=bool)
    while True:
        cur = curves.distortion[rows, choice]
        cand = np.where(blocked | (pos + 1 >= order.shape[1]), -np.inf, cur)
        top = int(cand.argmax())
        if cand[top] == -np.inf:
            break
        nxt = order[top, pos[top] + 1]
        extra = curves.rate[top, nxt] - curves.rate[top, choice[top]]
        if used + extra > budget + 1e-9:
            blocked[top] = True  # the next option does not fit: this layer stays
            continue
        pos[top] += 1
        choice[top] = nxt
        used += extra
    return curves.allocation(choice, "greedy")


def same_bits(curves: RDCurves, budget: float) -> Allocation:
    """The papers' uniform-allocation baseline: the same option index for every layer, the largest that fits."""
    budget = _check_budget(curves, budget)
    fits = [k for k in range(len(curves.options)) if curves.rate[:, k].sum() <= budget + 1e-9]
    if not fits:
        raise ValueError(
            f"no single bit option fits the budget of {budget:.0f} bits for every layer "
            f"(smallest needs {curves.rate.sum(axis=0).min():.0f}); raise the budget"
        )
    k = max(fits, key=lambda k: (curves.rate[:, k].sum(), -curves.distortion[:, k].sum()))
    return curves.allocation(np.full(len(curves.names), k), "same_bits")


def mckp_dp(curves: RDCurves, budget: float, *, units: int = 4000) -> Allocation:
    """Exact multiple-choice knapsack on rates discretised to ``budget / units`` (rounded up)."""
    budget = _check_budget(curves, budget)
    checks.integer(units, "units", low=1)
    rate = curves.rate
    # exact integer rates when they share a unit no smaller than budget / units
    g = np.gcd.reduce(np.round(rate).astype(np.int64).ravel()) if np.allclose(rate, np.round(rate)) else 0
    unit = float(g) if g and budget / g <= units else (budget / units if budget > 0 else 1.0)
    cost = np.ceil(rate / unit - 1e-9).astype(np.int64)
    cap = math.floor(budget / unit + 1e-9)
    n_layers, n_opts = cost.shape
    inf = np.inf
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    back = np.zeros((n_layers, cap + 1), dtype=np.int64)
    for layer in range(n_layers):
        new = np.full(cap + 1, inf)
        arg = np.zeros(cap + 1, dtype=np.int64)
        for k in range(n_opts):
            c = cost[layer, k]
            if c > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[c:] = dp[:cap + 1 - c] + curves.distortion[layer, k]
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        dp, back[layer] = new, arg
    if not np.isfinite(dp).any():
        raise ValueError("no allocation fits the budget after discretisation; raise units or the budget")
    j = int(np.argmin(dp))
    choice = np.zeros(n_layers, dtype=np.int64)
    for layer in range(n_layers - 1, -1, -1):
        k = back[layer, j]
        choice[layer] = k
        j -= cost[layer, k]
    return curves.allocation(choice, "mckp_dp", unit=unit, exact=bool(g) and unit == float(g))


def brute_force(curves: RDCurves, budget: float) -> Allocation:
    """Every combination (tests and tiny problems only: |options| ** layers)."""
    budget = _check_budget(curves, budget)
    n_layers, n_opts = curves.rate.shape
    if n_opts ** n_layers > 2_000_000:
        raise ValueError("brute_force is for tiny problems (<= 2e6 combinations)")
    grids = np.stack(np.meshgrid(*[np.arange(n_opts)] * n_layers, indexing="ij"), -1).reshape(-1, n_layers)
    rows = np.arange(n_layers)
    rates = curves.rate[rows, grids].sum(axis=1)
    dist = curves.distortion[rows, grids].sum(axis=1)
    dist = np.where(rates <= budget + 1e-9, dist, np.inf)
    return curves.allocation(grids[int(np.argmin(dist))], "brute_force")


SOLVERS = {"lagrangian": lagrangian, "greedy": greedy, "same_bits": same_bits, "mckp_dp": mckp_dp}


@dataclass
class AMPASchedule:
    """AMPA's layer-wise precision update (its Algorithm 1, for gradients only).

    Every call to ``update`` raises the top ``alpha`` fraction of the layers, ranked by sensitivity
    and excluding the taboo list, to the next of ``levels``; a layer picked ``thr`` times while at
    the top level joins the taboo list, so others get their turn.
    """

    levels: tuple[int, ...] = (4, 6, 8)
    alpha: float = 0.1
    thr: int = 3
    bits: dict[str, int] = field(default_factory=dict)
    picks_at_top: dict[str, int] = field(default_factory=dict)
    taboo: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha!r}")
        if not self.levels or list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"levels must rise strictly, got {self.levels!r}")
        if self.thr < 1:
            raise ValueError(f"thr must be >= 1, got {self.thr!r}")

    def update(self, sensitivity: dict[str, float]) -> dict[str, int]:
        for name in sensitivity:
            self.bits.setdefault(name, self.levels[0])
        ranked = sorted((n for n in sensitivity if n not in self.taboo), key=lambda n: -sensitivity[n])
        top = ranked[:max(1, math.ceil(self.alpha * len(sensitivity)))] if ranked else []
        for name in top:
            i = self.levels.index(self.bits[name])
            if i + 1 < len(self.levels):
                self.bits[name] = self.levels[i + 1]
            else:
                self.picks_at_top[name] = self.picks_at_top.get(name, 0) + 1
                if self.picks_at_top[name] >= self.thr:
                    self.taboo.add(name)
        return dict(self.bits)
