"""JointSQ's width classes within one layer: how many of the largest elements get 8, 4 and 2 bits
under a value budget (Greedy Allocation, Sec. 3.3.1, the MCKP greedy), the noise model of an
allocation (Eq. 6 with Eq. 11), and the budget-neutral Reallocation moves (Sec. 3.3.2). Pure
arithmetic on the descending squared magnitudes; the codec is ``codecs.jointsq``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

WIDTHS = (8, 4, 2)  # the non-zero classes, largest first
# incremental profit densities (Eq. 14) of the upgrades 0->2, 2->4, 4->8, with p(b) = 1 - 4^-b (Eq. 13)
_DENSITY = {0: (1 - 4.0**-2) / 2, 1: (4.0**-2 - 4.0**-4) / 2, 2: (4.0**-4 - 4.0**-8) / 4}
_COST = {0: 2, 1: 2, 2: 4}


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


def noise(sq_desc: torch.Tensor, alloc: ClassCounts, total: float | None = None) -> float:
    """h' (Eq. 6 with the per-element model of Eq. 11): sum g^2 4^-b / ||g||^2. ``sq_desc``: the
    largest g^2 in descending order (all of them, or a prefix with ``total`` the sum of all)."""
    s = sq_desc.double()
    total = float(s.sum()) if total is None else total
    if total == 0:
        return 0.0
    a, b, c = alloc.k8, alloc.k8 + alloc.k4, alloc.k
    sent = s[:a].sum() / 4**8 + s[a:b].sum() / 4**4 + s[b:c].sum() / 4**2
    return (float(sent) + total - float(s[:c].sum())) / total


def greedy_allocation(sq_desc: torch.Tensor, budget: int) -> ClassCounts:
    """MCKP greedy (Sec. 3.3.1): upgrades in descending incremental profit density while they fit,
    then the next upgrades that still fit (cost-2 ones: 0->2 or 2->4).

    Upgrade j of an element with square g^2 has density D_j g^2, so the upgrades taken down to a
    density t are counts of the sorted squares: n_j(t) = #{g^2 >= t / D_j}. The greedy's stopping
    density is found by bisection on t, O(log n) per step after the one sort."""
    sq = sq_desc.double()
    pos = int((sq > 0).sum())
    if pos == 0 or budget < 2:
        return ClassCounts(0, 0, 0)
    neg = -sq[:pos]  # ascending, for searchsorted

    def counts(t: float) -> tuple[int, int, int]:
        return tuple(int(torch.searchsorted(neg, torch.tensor([-t / _DENSITY[j]], dtype=torch.float64),
                                            right=True)) for j in range(3))

    def cost(c: tuple[int, int, int]) -> int:
        return 2 * c[0] + 2 * c[1] + 4 * c[2]

    lo, hi = 0.0, float(sq[0]) * _DENSITY[0]  # at hi one item is taken at most
    if cost(counts(hi)) > budget:
        return ClassCounts(0, 0, 0) if budget < 2 else ClassCounts(0, 0, 1)
    for _ in range(200):  # smallest density threshold whose prefix fits
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if cost(counts(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    n_ge2, n_ge4, n8 = counts(hi)
    left = budget - cost((n_ge2, n_ge4, n8))
    # The first item below the threshold did not fit, so fewer than 4 bits are left: at most one
    # more cost-2 item fits, the denser of the next 0->2 and the next 2->4 upgrade.
    if left >= 2:
        up02 = _DENSITY[0] * float(sq[n_ge2]) if n_ge2 < pos else -1.0
        up24 = _DENSITY[1] * float(sq[n_ge4]) if n_ge4 < n_ge2 else -1.0
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


def reallocate(sq_desc: torch.Tensor, alloc: ClassCounts, k_target: int, max_moves: int = 4096) -> ClassCounts:
    """Reallocation (Sec. 3.3.2): step k towards ``k_target``, taking the first noise-reducing move."""
    n = sq_desc.numel()
    s = sq_desc.detach().cpu().double().numpy()  # a view: each move reads only a few entries
    for _ in range(min(max_moves, abs(k_target - alloc.k))):
        up = alloc.k < k_target
        best = None
        for new, changes in _moves(alloc, up):
            if any(i < 0 or i >= n for i, _, _ in changes):
                continue
            delta = sum(float(s[i]) * (4.0**-b_new - 4.0**-b_old) for i, b_old, b_new in changes)
            if delta < 0:
                best = new
                break
        if best is None:
            break
        alloc = best
    return alloc
