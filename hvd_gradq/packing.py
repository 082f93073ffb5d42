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


# ---- byte streams (allgather / alltoall / broadcast accept uint8) --------------------------------


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits occupy in a byte stream."""
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (n,) with values below ``2**bits`` into a uint8 stream of ``packed_nbytes(n, bits)``.

    Every group of 8 codes becomes ``bits`` bytes (code i at bit offset bits*i, little-endian), so
    the stream is exactly as long as the bits it carries, for every width 1..8.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n = codes.numel()
    if bits == 8:
        return codes.reshape(-1).to(torch.uint8)
    groups = -(-n // 8)
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=codes.device)
    padded[:n] = codes.reshape(-1)
    cols = padded.view(groups, 8)
    word = cols[:, 0].clone()
    for i in range(1, 8):  # 8 vectorised steps over all groups, not a loop over elements
        word |= cols[:, i] << (bits * i)
    out = torch.empty(groups, bits, dtype=torch.uint8, device=codes.device)
    for j in range(bits):
        out[:, j] = (word >> (8 * j)) & 0xFF
    return out.view(-1)[: packed_nbytes(n, bits)]


def unpack_bits(stream: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``n`` codes (uint8) from a uint8 ``stream``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if stream.numel() != packed_nbytes(n, bits):
        raise ValueError(f"a stream of {n} {bits}-bit codes has {packed_nbytes(n, bits)} bytes, got {stream.numel()}")
    if bits == 8:
        return stream.clone()
    groups = -(-n // 8)
    padded = torch.zeros(groups * bits, dtype=torch.int64, device=stream.device)
    padded[: stream.numel()] = stream
    rows = padded.view(groups, bits)
    word = rows[:, 0].clone()
    for j in range(1, bits):
        word |= rows[:, j] << (8 * j)
    mask = (1 << bits) - 1
    out = torch.empty(groups, 8, dtype=torch.uint8, device=stream.device)
    for i in range(8):
        out[:, i] = (word >> (bits * i)) & mask
    return out.view(-1)[:n]
