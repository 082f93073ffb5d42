"""A layer's elements in descending order of magnitude, without sorting the layer (for JointSQ).

The order is by |x| descending, ties by index ascending; an element's key is its float32 bit
pattern without the sign, which is monotone in |x|. One pass builds a histogram of the top 16 bits
of the keys (bins 0.4% wide in |x|) with the float64 sum of the float32 squares in each bin; a
rank then lies in a known bin, and only the bins where a question is decided (a class boundary, a
threshold of the greedy allocation) are gathered and sorted, a few per encode. The prefix of the
order up to the element of rank r (its "cut", key c and index j) is the set {key > c, or key == c
and index <= j}: the passes that classify and emit compare each element with at most three cuts.

Native kernels (``bits/csrc/jointsq.c``) take the passes over the layer; without them the torch
path computes the same histogram, gathers and cuts.
"""
from __future__ import annotations

import ctypes

import numpy as np
import torch

from hvd_gradq.bits import native

BINS = 1 << 16
_SHIFT = 15
NONE_CUT = (0xFFFFFFFF, -1)  # the cut of the empty prefix: no key exceeds it


def _bin_bounds() -> tuple[np.ndarray, np.ndarray]:
    """Per bin, the smallest and largest float32 square of a finite key in it (as float64)."""
    lo = (np.arange(BINS, dtype=np.int64) << _SHIFT).astype(np.uint32).view(np.float32)
    hi = (((np.arange(BINS, dtype=np.int64) + 1) << _SHIFT) - 1).astype(np.uint32).view(np.float32)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        sq_lo, sq_hi = (lo * lo).astype(np.float64), (hi * hi).astype(np.float64)
    sq_lo[0x7F800000 >> _SHIFT:] = np.inf  # infinities and NaNs: never asked, kept sorted
    sq_hi[0x7F800000 >> _SHIFT:] = np.inf
    return sq_lo, sq_hi


_SQ_LO, _SQ_HI = _bin_bounds()


def keys_of(x: torch.Tensor) -> torch.Tensor:
    """The int64 keys (float32 bits without the sign) of flat float32 ``x``."""
    return (x.view(torch.int32).to(torch.int64) & 0x7FFFFFFF)


class MagnitudeOrder:
    """The magnitude order of flat, contiguous float32 ``x`` (kept by reference, not copied)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.n = n = x.numel()
        lib = native.load() if x.device.type == "cpu" else None
        self._lib = lib
        if lib is not None:
            counts = np.zeros(BINS, dtype=np.int64)
            sums = np.zeros(BINS, dtype=np.float64)
            lib.hvdgq_jsq_hist(x.data_ptr(), n, counts.ctypes.data, sums.ctypes.data)
        else:
            b = keys_of(x) >> _SHIFT
            counts = torch.bincount(b, minlength=BINS).numpy()
            sums = torch.bincount(b, weights=(x * x).double(), minlength=BINS).numpy()
        self.counts, self.sums = counts, sums
        #: no NaN or infinity (their keys are 0x7F800000 and above)
        self.finite = bool(counts[0x7F800000 >> _SHIFT:].sum() == 0)
        self.total = float(sums.sum())
        # ranks: bins in descending order; above[b] = elements in bins > b
        desc = counts[::-1].cumsum()
        self._desc_cum = desc
        self.above = np.concatenate([desc[::-1][1:], [0]])
        self._sum_above = np.concatenate([sums[::-1].cumsum()[::-1][1:], [0.0]])
        self._count_ge_bin = self.above + counts  # elements in bins >= b
        self._bins: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        self.gathers = 0  # passes over the layer to gather bins
        self._gaps: dict[int, int] = {}

    # ---- bins ---------------------------------------------------------------------------------
    def _load(self, bins) -> None:
        """Gather and sort the elements of ``bins`` (one pass over the layer for all of them), and
        of their neighbours while that adds few elements (a search that moves on to the next bin
        then needs no other pass)."""
        need = {int(b) for b in bins if int(b) not in self._bins and self.counts[int(b)] > 0}
        held = int(self.counts[list(need)].sum()) if need else 0
        budget = max(1 << 16, 2 * held) if need else 0
        for b in sorted(need):
            for nb in (*range(b - 1, max(-1, b - 9), -1), *range(b + 1, min(BINS, b + 9))):
                if nb not in self._bins and nb not in need and held + int(self.counts[nb]) <= budget:
                    need.add(nb)
                    held += int(self.counts[nb])
        need = sorted(need)
        for b in (int(b) for b in bins):
            if self.counts[b] == 0:
                self._bins[b] = tuple(np.zeros(0, dtype=t) for t in (np.int64, np.int64, np.float64, np.float64))
        if not need:
            return
        self.gathers += 1
        total = int(self.counts[need].sum())
        if self._lib is not None:
            runs = []  # runs of consecutive bins -> key ranges
            for b in need:
                if runs and runs[-1][1] == b - 1:
                    runs[-1][1] = b
                else:
                    runs.append([b, b])
            lo = np.array([r[0] << _SHIFT for r in runs], dtype=np.uint32)
            hi = np.array([((r[1] + 1) << _SHIFT) - 1 for r in runs], dtype=np.uint32)
            idx = np.empty(total, dtype=np.int64)
            got = self._lib.hvdgq_jsq_gather(self.x.data_ptr(), self.n, lo.ctypes.data, hi.ctypes.data, len(runs),
                                             idx.ctypes.data, total)
            assert got == total, (got, total)
            idx_t = torch.from_numpy(idx)
        else:
            mask = torch.zeros(BINS, dtype=torch.bool)
            mask[need] = True
            idx_t = mask[keys_of(self.x) >> _SHIFT].nonzero().view(-1)
        vals = self.x[idx_t]
        keys = keys_of(vals).numpy()
        idx = idx_t.numpy()
        sq = (vals * vals).double().numpy()
        order = np.lexsort((idx, -keys))  # key descending, index ascending
        keys, idx, sq = keys[order], idx[order], sq[order]
        bins_of = keys >> _SHIFT
        for b in need:
            sel = bins_of == b
            s = sq[sel]
            self._bins[b] = (keys[sel], idx[sel], s, np.concatenate([[0.0], np.cumsum(s)]))

    def _bin_of_rank(self, r: int) -> int:
        p = int(np.searchsorted(self._desc_cum, r, side="right"))
        return BINS - 1 - p

    def _at(self, r: int):
        """(bin contents, position in the bin) of rank ``r``."""
        b = self._bin_of_rank(r)
        if b not in self._bins:
            self._load([b])
        return self._bins[b], r - int(self.above[b])

    # ---- what the allocation asks ------------------------------------------------------------
    def value(self, r: int) -> float:
        """The float32 square (as float64) of the element of rank ``r``."""
        data, j = self._at(r)
        return float(data[2][j])

    def cut(self, r: int) -> tuple[int, int]:
        """(key, index) of the element of rank ``r``; ``NONE_CUT`` for r = -1 (empty prefix)."""
        if r < 0:
            return NONE_CUT
        data, j = self._at(r)
        return int(data[0][j]), int(data[1][j])

    def prefix_sum(self, r: int) -> float:
        """Sum of the squares of the ranks below ``r``."""
        if r <= 0:
            return 0.0
        if r >= self.n:
            return self.total
        b = self._bin_of_rank(r)
        data, j = self._at(r)
        return float(self._sum_above[b]) + float(data[3][j])

    def _straddling(self, t: float) -> range:
        """The bins whose squares may lie on both sides of ``t``."""
        b_lo = int(np.searchsorted(_SQ_LO, t, side="left"))  # bins >= b_lo: every square >= t
        b_hi = int(np.searchsorted(_SQ_HI, t, side="left"))  # bins < b_hi: every square < t
        return range(b_hi, max(b_hi, b_lo))

    def count_bounds(self, t: float) -> tuple[int, int]:
        """(lower, upper) bound of #{square >= t}; exact (equal) once the straddling bins are loaded."""
        span = self._straddling(t)
        full = int(self._count_ge_bin[span.stop]) if span.stop < BINS else 0
        lo = hi = full
        for b in span:
            if b in self._bins:
                s = self._bins[b][2]  # descending
                c = int(np.searchsorted(-s, -t, side="right"))
                lo, hi = lo + c, hi + c
            else:
                hi += int(self.counts[b])
        return lo, hi

    def load_for(self, thresholds) -> None:
        """Load the straddling bins of every threshold (one pass)."""
        self._load([b for t in thresholds for b in self._straddling(t)])

    def count_ge(self, t: float) -> int:
        """#{square >= t}, exact (gathers the straddling bins if needed)."""
        lo, hi = self.count_bounds(t)
        if lo != hi:
            self.load_for([t])
            lo, hi = self.count_bounds(t)
        return lo

    def max_gap(self, k: int) -> int:
        """Largest gap between consecutive indices of the first ``k`` ranks (the first counted
        from 0), as the delta coding of the positions sees them."""
        if k <= 0:
            return 0
        if k in self._gaps:
            return self._gaps[k]
        self._gaps[k] = gap = self._max_gap(k)
        return gap

    def _max_gap(self, k: int) -> int:
        ck, ci = self.cut(k - 1)
        if self._lib is not None:
            count = ctypes.c_int64(0)
            gap = self._lib.hvdgq_jsq_max_gap(self.x.data_ptr(), self.n, ck, ci, ctypes.byref(count))
            assert count.value == k, (count.value, k)
            return int(gap)
        sent = self.members([(ck, ci)])[0].nonzero().view(-1)
        return int(torch.diff(sent, prepend=torch.zeros(1, dtype=sent.dtype)).max())

    def members(self, cuts) -> list[torch.Tensor]:
        """Boolean masks of the prefixes up to each cut (torch path)."""
        keys = keys_of(self.x)
        idx = torch.arange(self.n)
        return [(keys > ck) | ((keys == ck) & (idx <= ci)) for ck, ci in cuts]


class TensorOrder:
    """The same questions answered from descending squares already sorted (tests, small layers)."""

    def __init__(self, sq_desc: torch.Tensor, total: float | None = None) -> None:
        self.s = sq_desc.detach().cpu().double().numpy()
        self.n = len(self.s)
        self.cum = np.concatenate([[0.0], np.cumsum(self.s)])
        self.total = float(self.cum[-1]) if total is None else float(total)

    def value(self, r: int) -> float:
        return float(self.s[r])

    def prefix_sum(self, r: int) -> float:
        return float(self.cum[min(max(r, 0), self.n)])

    def count_bounds(self, t: float) -> tuple[int, int]:
        c = int(np.searchsorted(-self.s, -t, side="right"))
        return c, c

    def load_for(self, thresholds) -> None:
        pass

    def count_ge(self, t: float) -> int:
        return self.count_bounds(t)[0]
