"""Chunk bounds: how a layer is cut into one chunk per rank for the two-phase exchange. Pure."""
from __future__ import annotations

from hvd_gradq import checks


def chunk_bounds(numel: int, size: int, align: int = 1) -> list[int]:
    """``size + 1`` boundaries cutting ``numel`` elements into near-equal chunks whose inner
    boundaries are multiples of ``align`` (so a codec's buckets are never split); trailing chunks
    may be empty when the layer is small."""
    checks.integer(size, "size (ranks)", low=1)
    if numel < 0 or align < 1:
        raise ValueError(f"chunk_bounds needs numel >= 0 and align >= 1, got {numel}, {align}")
    units = -(-numel // align)
    bounds = [min(numel, (units * j // size) * align) for j in range(size)]
    return [*bounds, numel]
