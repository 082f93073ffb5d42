"""JointSQ's width classes within one layer: how many of the largest elements get 8, 4 and 2 bits
under a value budget (Greedy Allocation, Sec. 3.3.1, the MCKP greedy), the noise model of an
allocation (Eq. 6 with Eq. 11), and the budget-neutral Reallocation moves (Sec. 3.3.2). Pure
arithmetic on the descending squared magnitudes, asked of a ``codecs.magnitude_order`` (never a
sort of the layer); the codec is ``codecs.jointsq``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hvd_gradq.codecs.magnitude_order import TensorOrder

WIDTHS = (8, 4, 2)  # the non-zero classes, largest first
# incremental profit densities (Eq. 14) of the upgrades 0->2, 2->4, 4->8, with p(b) = 1 - 4^-b (Eq. 13)
_DENSITY = {0: (1 - 4.0**-2) / 2, 1: (4.0**-2 - 4.0**-4) / 2, 2: (4.0**-4 - 4.0**-8) / 4}
_COST = {0: 2, 1: 2, 2: 4}
_TINY = 2.0**-149  # the smallest positive float32: g^2 >= it means g^2 > 0


@dataclass(frozen=True)
class ClassCounts:
    """How many of the largest elements get 8, 4 and 2 bits (in that order of magnitude)."""

    k8: int
    k4: int
    k2: int

    @property
    def k(self) -> int:
        return self.k8 + self.k4 + self.k2

    @property
    def value_bits(self) -> int:
        return 8 * self.k8 + 4 * self.k4 + 2 * self.k2


def _as_order(sq):
    """A ``MagnitudeOrder``/``TensorOrder`` as it is, a tensor of descending squares wrapped."""
    return TensorOrder(sq) if isinstance(sq, torch.Tensor) else sq


def noise(sq_desc, alloc: ClassCounts, total: float | None = None) -> float:
    """h' (Eq. 6 with the per-element model of Eq. 11): sum g^2 4^-b / ||g||^2. ``sq_desc``: the
    largest g^2 in descending order (all of them, or a prefix with ``total`` the sum of all), or
    a magnitude order (``codecs.magnitude_order``)."""
    order = TensorOrder(sq_desc, total) if isinstance(sq_desc, torch.Tensor) else sq_desc
    total = order.total
    if total == 0:
        return 0.0
    a, b, c = alloc.k8, alloc.k8 + alloc.k4, alloc.k
    pa, pb, pc = order.prefix_sum(a), order.prefix_sum(b), order.prefix_sum(c)
    sent = pa / 4**8 + (pb - pa) / 4**4 + (pc - pb) / 4**2
    return (sent + total - pc) / total


def greedy_allocation(sq_desc, budget: int) -> ClassCounts:
    """MCKP greedy (Sec. 3.3.1): upgrades in descending incremental profit density while they fit,
    then the next upgrades that still fit (cost-2 ones: 0->2 or 2->4).

    Upgrade j of an element with square g^2 has density D_j g^2, so the upgrades taken down to a
    density t are counts of the sorted squares: n_j(t) = #{g^2 >= t / D_j}. The greedy's stopping
    density is found by bisection on t. ``sq_desc``: descending squares or a magnitude order, whose
    counts are bounds until the bins around t / D_j are gathered: a step is decided on the bounds
    where they suffice, so only the bins near the final thresholds are ever gathered."""
    order = _as_order(sq_desc)
    pos = order.count_ge(_TINY)
    if pos == 0 or budget < 2:
        return ClassCounts(0, 0, 0)

    def cost(c: tuple[int, int, int]) -> int:
        return 2 * c[0] + 2 * c[1] + 4 * c[2]

    def counts(t: float) -> tuple[int, int, int]:
        return tuple(order.count_ge(t / _DENSITY[j]) for j in range(3))

    def fits(t: float) -> bool:
        bounds = [order.count_bounds(t / _DENSITY[j]) for j in range(3)]
        if cost(tuple(hi for _, hi in bounds)) <= budget:
            return True
        if cost(tuple(lo for lo, _ in bounds)) > budget:
            return False
        return cost(counts(t)) <= budget

    lo, hi = 0.0, order.value(0) * _DENSITY[0]  # at hi one item is taken at most
    if cost(counts(hi)) > budget:
        return ClassCounts(0, 0, 0) if budget < 2 else ClassCounts(0, 0, 1)
    for _ in range(200):  # smallest density threshold whose prefix fits
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if fits(mid):
            hi = mid
        else:
            lo = mid
    n_ge2, n_ge4, n8 = counts(hi)
    left = budget - cost((n_ge2, n_ge4, n8))
    # The first item below the threshold did not fit, so fewer than 4 bits are left: at most one
    # more cost-2 item fits, the denser of the next 0->2 and the next 2->4 upgrade.
    if left >= 2:
        up02 = _DENSITY[0] * order.value(n_ge2) if n_ge2 < pos else -1.0
        up24 = _DENSITY[1] * order.value(n_ge4) if n_ge4 < n_ge2 else -1.0
        if up02 >= up24 and up02 > 0:
            n_ge2 += 1
        elif up24 > 0:
            n_ge4 += 1
    return ClassCounts(n8, n_ge4 - n8, n_ge2 - n_ge4)


def _moves(alloc: ClassCounts, up: bool):
    """Budget-neutral moves changing k by +1 (up) or -1, as (new allocation, [(index, old, new)])."""
    k8, k4, k2 = alloc.k8, alloc.k4, alloc.k2
    b4, b2 = k8 + k4, k8 + k4 + k2  # first index of the 2-bit and of the 0-bit class
    out = []
    if up:
        if k8 >= 1 and k2 >= 1:  # min 8 -> 4, max 2 -> 4, max 0 -> 2
            out.append((ClassCounts(k8 - 1, k4 + 2, k2), [(k8 - 1, 8, 4), (b4, 2, 4), (b2, 0, 2)]))
        if k4 >= 1:  # min 4 -> 2, max 0 -> 2
            out.append((ClassCounts(k8, k4 - 1, k2 + 2), [(b4 - 1, 4, 2), (b2, 0, 2)]))
    else:
        if k4 >= 2 and k2 >= 1:  # max 4 -> 8, min 4 -> 2, min 2 -> 0
            out.append((ClassCounts(k8 + 1, k4 - 2, k2), [(k8, 4, 8), (b4 - 1, 4, 2), (b2 - 1, 2, 0)]))
        if k2 >= 2:  # max 2 -> 4, min 2 -> 0
            out.append((ClassCounts(k8, k4 + 1, k2 - 2), [(b4, 2, 4), (b2 - 1, 2, 0)]))
    return out


def reallocate(sq_desc, alloc: ClassCounts, k_target: int, max_moves: int = 4096) -> ClassCounts:
    """Reallocation (Sec. 3.3.2): step k towards ``k_target``, taking the first noise-reducing move.
    ``sq_desc``: descending squares or a magnitude order (each move reads a few ranks)."""
    order = _as_order(sq_desc)
    n = order.n
    for _ in range(min(max_moves, abs(k_target - alloc.k))):
        up = alloc.k < k_target
        best = None
        for new, changes in _moves(alloc, up):
            if any(i < 0 or i >= n for i, _, _ in changes):
                continue
            delta = sum(order.value(i) * (4.0**-b_new - 4.0**-b_old) for i, b_old, b_new in changes)
            if delta < 0:
                best = new
                break
        if best is None:
            break
        alloc = best
    return alloc
