"""JointSQ: per-element mixed precision where 0 bits means "not sent" (sparsification).
Paper: ../shared/papers/jointsq-sparse-as-zero-bit.txt.

Within one layer, every element gets 8, 4, 2 or 0 bits under a value budget of ``c`` bits. Per
element, the noise model is g^2 / 4^b (Eq. 11; b = 0 leaves the whole g^2), so the profit of b bits
over 0 is p(b) = (1 - 4^-b) g^2 / ||g||^2 (Eq. 13), and the upgrades 0->2, 2->4, 4->8 have the
incremental profit densities (Eq. 14)

    0.469 g^2,   0.0293 g^2,   0.00097 g^2     (per bit, up to the common 1/||g||^2).

**Greedy Allocation** (MCKP greedy, Sec. 3.3.1; this and the Reallocation are in
``jointsq_widths``) takes upgrades in order of density while they fit the budget. Since an
element's densities fall with each upgrade, the chosen upgrades are prefixes of the magnitude
order: the largest k8 elements get 8 bits, the next k4 get 4, the next k2 get 2.
**Reallocation** (Sec. 3.3.2) then moves k = k8 + k4 + k2 one element at a time towards
k_bar = R c / 8 with budget-neutral swaps at the class boundaries (8->4 + 2->4 + 0->2, or
4->2 + 0->2, and their inverses), kept only when they lower the noise; each move is O(1).
**Adaptive R** (Sec. 3.3.3, Eq. 15-16): R starts from the greedy result and is updated per layer
from the change of the noise between consecutive allocations (``JointSQState``).

Payload: a 32-byte header (k8, k4, k2, the position encoding and its width, three float32 class
scales), the positions of the k sent elements as the smaller of a bitmap (n bits) and fixed-width
delta-coded indices (k * w bits), a 2-bit class per sent element, and each class's values as
QSGDinf-style sign + magnitude codes of its width against its class maximum (unbiased stochastic
rounding). Unsent elements decode to 0: use with ``ErrorFeedback`` (error accumulation), as the
paper's experiments do.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hvd_gradq import checks
from hvd_gradq.bits import native
from hvd_gradq.bits.bitstream import pack_bits, packed_nbytes, unpack_bits
from hvd_gradq.bits.dither import DitherSource
from hvd_gradq.codecs.base import Codec, Encoded, flat_float32
from hvd_gradq.codecs.jointsq_widths import WIDTHS, ClassCounts, greedy_allocation, noise, reallocate
from hvd_gradq.codecs.magnitude_order import MagnitudeOrder

HEADER_BYTES = 4 * 5 + 4 * 3  # int32 k8 k4 k2 mode width | float32 scale of each class
_SLACK_BYTES = 8  # byte rounding of the packed parts
_BITMAP, _DELTA = 0, 1


@dataclass
class JointSQState:
    """Per-layer state of the adaptive Reallocation: R and the previous noise h'."""

    R: float | None = None
    last_noise: float | None = None


class JointSQCodec(Codec):
    """JointSQ at a target compression ``ratio`` against float32 (positions and scales included).

    ``lr`` scales Eq. 16: R <- R - lr * (h'_i - h'_(i-1)) / h'_(i-1), clipped to [1, 4] (k_bar between
    c/8 and c/2); a rise of the noise pulls R back. ``reallocation=False`` keeps the greedy result.
    """

    name = "jointsq"
    unbiased = False  # unsent elements decode to zero: error feedback keeps them

    def __init__(self, ratio: float, *, reallocation: bool = True, lr: float = 0.5, max_moves: int = 4096) -> None:
        checks.number(ratio, "jointsq: ratio", above=1, hint=" (e.g. 20 or 1000)")
        super().__init__(bits=0)
        self.ratio = float(ratio)
        self.reallocation = reallocation
        self.lr = lr
        self.max_moves = max_moves

    # ---- budget -------------------------------------------------------------------------------
    def target_bytes(self, numel: int) -> int:
        return int(4 * numel / self.ratio)

    def value_budget(self, numel: int) -> int:
        """Value bits c such that header + positions + classes + values fit ``target_bytes``.

        Positions cost at most min(n, k*32) bits and classes 2 bits per sent element; with k <= c/2,
        reserving those for k = c/2 keeps the whole payload within the target."""
        avail = 8 * (self.target_bytes(numel) - HEADER_BYTES - _SLACK_BYTES)
        best = 0
        lo, hi = 0, max(0, avail)
        while lo <= hi:  # largest c whose worst case fits
            c = (lo + hi) // 2
            k = c // 2
            need = c + 2 * k + min(numel, 32 * k)
            if need <= avail:
                best, lo = c, c + 1
            else:
                hi = c - 1
        return best

    def layout(self, numel: int):  # data-dependent: see encoded_bytes / payload_bytes
        raise NotImplementedError("jointsq payloads are data dependent; use encoded_bytes(enc)")

    def payload_bytes(self, numel: int) -> int:
        """Upper bound of the payload for ``numel`` elements (the target size)."""
        return self.target_bytes(numel)

    @staticmethod
    def size_of(alloc: ClassCounts, order, n: int) -> int:
        """Exact payload bytes that ``alloc`` produces (``order``: a ``MagnitudeOrder`` of the layer)."""
        k = alloc.k
        mode, w = _position_code(k, order.max_gap(k), n)
        pos = 0 if k == 0 else _wide_nbytes(k, w) if mode == _DELTA else packed_nbytes(n, 1)
        return (HEADER_BYTES + pos + packed_nbytes(k, 2) + alloc.k8 + packed_nbytes(alloc.k4, 4)
                + packed_nbytes(alloc.k2, 2))

    # ---- encode / decode ------------------------------------------------------------------------
    def allocate(self, x: torch.Tensor, state: JointSQState | None = None,
                 order: MagnitudeOrder | None = None) -> tuple[ClassCounts, MagnitudeOrder]:
        """The allocation for flat float32 ``x`` and its magnitude order (``codecs.magnitude_order``:
        the classes are the ranks [0, k8), [k8, k8 + k4), [k8 + k4, k)).

        The value budget c starts from the worst case of the position cost (``value_budget``) and
        is raised while the payload the allocation really produces stays within the target."""
        x = flat_float32(x).contiguous()
        order = MagnitudeOrder(x) if order is None else order
        R = state.R if (self.reallocation and state is not None) else None
        alloc, r0, c = self._fit_budget(order, x.numel(), self.target_bytes(x.numel()), R, state)
        if self.reallocation and state is not None and c > 0:
            state.R = r0
            h = noise(order, alloc)
            if state.last_noise is not None and state.last_noise > 0:  # Eq. 15-16
                state.R = min(4.0, max(1.0, state.R - self.lr * (h - state.last_noise) / state.last_noise))
            state.last_noise = h
        return alloc, order

    def _fit_budget(self, order, n, target, R, state):
        """(allocation, R used, value budget c) with the payload within ``target`` bytes."""
        def solve(c: int) -> tuple[ClassCounts, float | None]:
            a = greedy_allocation(order, c)
            r = R
            if self.reallocation and state is not None and c > 0:
                r = R if R is not None else min(4.0, max(1.0, 8 * a.k / c))
                a = reallocate(order, a, round(r * c / 8), self.max_moves)
            return a, r

        c = self.value_budget(n)
        alloc, r0 = solve(c)
        for _ in range(4):  # spend what the worst-case reservation left unused
            size = self.size_of(alloc, order, n)
            spare = target - _SLACK_BYTES - size
            if spare < 8 or alloc.value_bits == 0:
                break
            c_new = c + 8 * spare * alloc.value_bits // max(1, 8 * (size - HEADER_BYTES))
            cand, r_new = solve(c_new)
            if self.size_of(cand, order, n) > target - _SLACK_BYTES:
                break
            c, alloc, r0 = c_new, cand, r_new
        return alloc, r0, c

    def encode(self, x: torch.Tensor, rng: DitherSource, state: JointSQState | None = None) -> Encoded:
        x = flat_float32(x).contiguous()
        n = x.numel()
        order = MagnitudeOrder(x)
        if not order.finite:
            alloc, scales = ClassCounts(0, 0, 0), torch.full((3,), float("nan"))
        else:
            alloc, _ = self.allocate(x, state, order)
            scales = torch.zeros(3)
        bounds = [0, alloc.k8, alloc.k8 + alloc.k4, alloc.k]
        counts = (alloc.k8, alloc.k4, alloc.k2)
        cuts = [order.cut(b - 1) for b in bounds[1:]]
        for j in range(3):
            if counts[j] and bool(torch.isfinite(scales[j])):  # the class maximum: its first rank
                scales[j] = x[order.cut(bounds[j])[1]].abs()
        k = alloc.k
        mode, w = _position_code(k, order.max_gap(k), n)
        header = torch.tensor([alloc.k8, alloc.k4, alloc.k2, mode, w], dtype=torch.int32)
        lib = native.load()
        if lib is None or k == 0:
            parts = self._emit_torch(x, order, cuts, scales, counts, mode, w, rng)
        else:
            keys = [rng.key() if c else 0 for c in counts]  # as DitherSource.uniform draws them
            parts = {"positions": torch.empty(_wide_nbytes(k, w) if mode == _DELTA else packed_nbytes(n, 1),
                                              dtype=torch.uint8),
                     "classes": torch.empty(packed_nbytes(k, 2), dtype=torch.uint8),
                     **{f"v{width}": torch.empty(packed_nbytes(c, width), dtype=torch.uint8)
                        for width, c in zip(WIDTHS, counts)}}
            ck = np.array([c[0] for c in cuts], dtype=np.uint32)
            ci = np.array([c[1] for c in cuts], dtype=np.int64)
            sc = scales.float().contiguous()
            dk = np.array(keys, dtype=np.uint64)
            got = lib.hvdgq_jsq_emit(x.data_ptr(), n, ck.ctypes.data, ci.ctypes.data, mode, w, sc.data_ptr(),
                                     dk.ctypes.data, k, parts["positions"].data_ptr(), parts["classes"].data_ptr(),
                                     parts["v8"].data_ptr(), parts["v4"].data_ptr(), parts["v2"].data_ptr())
            assert got == k, (got, k)
        return Encoded(n, {"header": header, "scales": scales.float(), **parts})

    def _emit_torch(self, x, order, cuts, scales, counts, mode, w, rng) -> dict:
        """The payload's parts by tensor operations (the reference of ``hvdgq_jsq_emit``)."""
        n = x.numel()
        masks = order.members(cuts)
        cls = torch.full((n,), 3, dtype=torch.uint8)
        for j in (2, 1, 0):  # the prefixes are nested: the widest class last
            cls[masks[j]] = j
        sent = (cls != 3).nonzero().view(-1)  # index order
        classes = cls[sent]
        parts = {}
        for j, width in enumerate(WIDTHS):
            vals = x[sent[classes == j]]
            parts[f"v{width}"] = self._quantize(vals, float(scales[j]), width, rng)
        pos = torch.zeros(0, dtype=torch.uint8)
        if sent.numel():
            if mode == _DELTA:
                pos = _pack_wide(torch.diff(sent, prepend=torch.zeros(1, dtype=sent.dtype)), w)
            else:
                bitmap = torch.zeros(n, dtype=torch.uint8)
                bitmap[sent] = 1
                pos = pack_bits(bitmap, 1)
        return {"positions": pos,
                "classes": pack_bits(classes, 2) if classes.numel() else torch.zeros(0, dtype=torch.uint8), **parts}

    @staticmethod
    def _quantize(vals: torch.Tensor, scale: float, width: int, rng: DitherSource) -> torch.Tensor:
        """Sign + (width-1)-bit magnitude, uniform levels over [0, scale], stochastic rounding."""
        if vals.numel() == 0:
            return torch.zeros(0, dtype=torch.uint8)
        m = 1 << (width - 1)
        r = vals.abs() / scale if scale > 0 else torch.zeros_like(vals)
        k = r.clamp_(max=1.0).mul_(m - 1).add_(rng.uniform(vals.numel())).floor_().clamp_(max=m - 1)
        codes = k.to(torch.uint8).bitwise_left_shift_(1).bitwise_or_(torch.signbit(vals).to(torch.uint8))
        return pack_bits(codes, width)

    def decode(self, enc: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        n = enc.numel
        result = torch.zeros(n) if out is None else out.zero_()
        k8, k4, k2, mode, w = (int(v) for v in enc.parts["header"])
        scales = enc.parts["scales"]
        if not bool(torch.isfinite(scales).all()):
            return result.fill_(float("nan"))
        k = k8 + k4 + k2
        if k == 0:
            return result
        if mode == _DELTA:
            sent = torch.cumsum(_unpack_wide(enc.parts["positions"], w, k), 0)
        else:
            sent = unpack_bits(enc.parts["positions"], 1, n).nonzero().view(-1)
        classes = unpack_bits(enc.parts["classes"], 2, k)
        for j, (width, count) in enumerate(zip(WIDTHS, (k8, k4, k2))):
            if count == 0:
                continue
            codes = unpack_bits(enc.parts[f"v{width}"], width, count)
            m = 1 << (width - 1)
            mag = (codes >> 1).float() * (float(scales[j]) / (m - 1))
            result[sent[classes == j]] = torch.where((codes & 1).bool(), -mag, mag)
        return result

    # ---- wire ---------------------------------------------------------------------------------
    _ORDER = ("header", "scales", "positions", "classes", "v8", "v4", "v2")

    def encoded_bytes(self, enc: Encoded) -> int:
        """Exact bytes of ``to_bytes(enc)``."""
        return sum(enc.parts[key].numel() * enc.parts[key].element_size() for key in self._ORDER)

    def to_bytes(self, enc: Encoded) -> torch.Tensor:
        return torch.cat([enc.parts[key].contiguous().view(-1).view(torch.uint8) for key in self._ORDER])

    def from_bytes(self, stream: torch.Tensor, numel: int) -> Encoded:
        if stream.dtype != torch.uint8 or stream.numel() < HEADER_BYTES:
            raise ValueError(
                f"jointsq: expected a uint8 stream of at least {HEADER_BYTES} bytes, "
                f"got {stream.dtype}[{stream.numel()}]"
            )
        header = stream[:20].clone().view(torch.int32)
        k8, k4, k2, mode, w = (int(v) for v in header)
        k = k8 + k4 + k2
        sizes = {
            "header": (torch.int32, 5), "scales": (torch.float32, 3),
            "positions": (torch.uint8, _wide_nbytes(k, w) if mode == _DELTA else packed_nbytes(numel, 1) if k else 0),
            "classes": (torch.uint8, packed_nbytes(k, 2)),
            "v8": (torch.uint8, k8),
            "v4": (torch.uint8, packed_nbytes(k4, 4)),
            "v2": (torch.uint8, packed_nbytes(k2, 2)),
        }
        parts, offset = {}, 0
        for key in self._ORDER:
            dtype, count = sizes[key]
            nbytes = count * torch.empty((), dtype=dtype).element_size()
            parts[key] = stream[offset:offset + nbytes].clone().view(dtype)
            offset += nbytes
        if offset != stream.numel():
            raise ValueError(f"jointsq: stream has {stream.numel()} bytes, its header describes {offset}")
        return Encoded(numel, parts)


def _position_code(k: int, max_gap: int, n: int) -> tuple[int, int]:
    """(mode, width) of the positions of k sent elements: delta-coded gaps of ``width`` bits when
    that is smaller than the bitmap of n bits, else the bitmap."""
    if k == 0:
        return _DELTA, 0
    w = max(1, max_gap.bit_length())
    if w <= 32 and _wide_nbytes(k, w) < packed_nbytes(n, 1):
        return _DELTA, w
    return _BITMAP, 1


def _wide_nbytes(count: int, width: int) -> int:
    return sum(packed_nbytes(count, min(8, width - shift)) for shift in range(0, width, 8))


def _pack_wide(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative ints below 2**width (width <= 32) LSB-first: as 4 byte-planes of <= 8 bits."""
    out = []
    for shift in range(0, width, 8):
        w = min(8, width - shift)
        out.append(pack_bits(((values >> shift) & ((1 << w) - 1)).to(torch.uint8), w))
    return torch.cat(out)


def _unpack_wide(stream: torch.Tensor, width: int, count: int) -> torch.Tensor:
    vals = torch.zeros(count, dtype=torch.int64)
    offset = 0
    for shift in range(0, width, 8):
        w = min(8, width - shift)
        nbytes = packed_nbytes(count, w)
        vals |= unpack_bits(stream[offset:offset + nbytes], w, count).long() << shift
        offset += nbytes
    return vals
