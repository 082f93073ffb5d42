"""Chunk bounds: how a layer is cut into one chunk per rank for the two-phase exchange. Pure."""
from __future__ import annotations


def chunk_bounds(numel: int, size: int, align: int = 1) -> list[int]:
    """``size + 1`` boundaries cutting ``numel`` elements into near-equal chunks whose inner
    boundaries are multiples of ``align`` (so a codec's buckets are never split); trailing chunks
    may be empty when the layer is small."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size (ranks) must be an integer >= 1, got {size!r}")
    if numel < 0 or align < 1:
        raise ValueError(f"chunk_bounds needs numel >= 0 and align >= 1, got {numel}, {align}")
    units = -(-numel // align)
    bounds = [min(numel, (units * j // size) * align) for j in range(size)]
    return [*bounds, numel]
