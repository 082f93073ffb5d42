"""Bit packing: b-bit codes <-> word containers that Horovod's allreduce can sum.

Horovod's torch allreduce accepts int32/int64/float16/float32/float64 only, and ``op=Average``
truncates integers. Codes of ``lane_bits`` bits each are therefore packed side by side ("lanes")
into words, leaving enough headroom in every lane that the sum over N ranks never carries into
the next lane. Summing packed words is then the same as summing every lane separately.

Two containers:
  * ``int64``  (63 usable bits: the sign bit is never touched, so no signed overflow), for
    reductions with ``op=Sum``;
  * ``float64`` holding exact integers below 2**48, for ``op=Average``: Horovod multiplies the
    exact integer sum by 1/N, and ``round(value * N)`` recovers the sum exactly because the
    relative error of that product (a few ulp) times 2**48 stays far below 0.5.

int32 words are not offered: floor(63/w) >= 2*floor(31/w) for every lane width w, so int64 never
carries fewer codes per byte (int32 would only trim the padding of the last word).

Everything here is pure tensor code: no Horovod, no MPI.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: Usable bits per word for each container dtype (see module docstring).
USABLE_BITS = {torch.int64: 63, torch.float64: 48}


@dataclass(frozen=True)
class LaneLayout:
    """How codes sit in words: ``lanes_per_word`` lanes of ``lane_bits`` bits each."""

    container: torch.dtype
    lane_bits: int
    lanes_per_word: int

    @property
    def word_bytes(self) -> int:
        return torch.empty((), dtype=self.container).element_size()

    def words(self, n: int) -> int:
        """Number of words that hold ``n`` codes."""
        return -(-n // self.lanes_per_word)

    def nbytes(self, n: int) -> int:
        """Bytes of the packed lanes for ``n`` codes (no header)."""
        return self.words(n) * self.word_bytes


def lane_bits_for(bits: int, summands: int) -> int:
    """Lane width that holds the sum of ``summands`` codes of ``bits`` bits without carry."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if summands < 1:
        raise ValueError(f"summands must be >= 1, got {summands}")
    return (summands * ((1 << bits) - 1)).bit_length()


def lane_layout(bits: int, summands: int, container: torch.dtype) -> LaneLayout:
    """The lane layout for ``bits``-bit codes summed over ``summands`` ranks in ``container``."""
    if container not in USABLE_BITS:
        raise ValueError(f"container must be one of {list(USABLE_BITS)}, got {container}")
    width = lane_bits_for(bits, summands)
    lanes = USABLE_BITS[container] // width
    if lanes < 1:
        raise ValueError(
            f"{bits}-bit codes summed over {summands} ranks need {width}-bit lanes, wider than "
            f"the {USABLE_BITS[container]} usable bits of {container}"
        )
    return LaneLayout(container, width, lanes)


def _shifts(layout: LaneLayout, device: torch.device) -> torch.Tensor:
    return torch.arange(layout.lanes_per_word, device=device, dtype=torch.int64) * layout.lane_bits


def pack_lanes(codes: torch.Tensor, layout: LaneLayout) -> torch.Tensor:
    """Pack non-negative int64 ``codes`` (n,) into ``layout.words(n)`` words of the container dtype.

    Each code must be below ``2**layout.lane_bits`` (not checked on the hot path; see tests).
    """
    n = codes.numel()
    words = layout.words(n)
    padded = torch.zeros(words * layout.lanes_per_word, dtype=torch.int64, device=codes.device)
    padded[:n] = codes.reshape(-1)
    # lanes never overlap, so the sum of the shifted lanes equals their bitwise or
    packed = (padded.view(words, layout.lanes_per_word) << _shifts(layout, codes.device)).sum(dim=1)
    return packed if layout.container == torch.int64 else packed.to(layout.container)


def words_to_int64(words: torch.Tensor, multiplier: int = 1) -> torch.Tensor:
    """Reduced words -> exact int64 words.

    ``multiplier`` undoes an average (N for ``op=Average``). Float containers are rounded to the
    nearest integer; a value further than 0.25 from an integer means the payload was not what
    this module packed, and raises.
    """
    if words.dtype == torch.int64:
        return words * multiplier if multiplier != 1 else words
    scaled = words.to(torch.float64) * multiplier
    rounded = scaled.round()
    if words.numel() and (scaled - rounded).abs().max().item() > 0.25:
        raise ValueError("float lane words are not integers after reduction: the payload was altered")
    return rounded.to(torch.int64)


def unpack_lanes(words: torch.Tensor, layout: LaneLayout, n: int) -> torch.Tensor:
    """Unpack int64 ``words`` into the first ``n`` int64 lane values (n,)."""
    mask = (1 << layout.lane_bits) - 1
    lanes = (words.view(-1, 1) >> _shifts(layout, words.device)) & mask
    return lanes.view(-1)[:n]
