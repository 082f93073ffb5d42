"""The codebook: the per-layer coding decision that every rank must share exactly.

A layer's entry says how its gradient is coded this step (bit width, lane layout, shared scale)
and carries a version that advances with every reduction. Its digest travels in every payload
header (see ``wire``), so ranks that disagree are caught at the step where they diverge.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

from hvd_gradq.packing import LaneLayout
from hvd_gradq.wire import DIGEST_BITS

#: bit width that means "sent as float32" (layers below ``min_elements``)
FLOAT_BITS = 32


@dataclass
class LayerCode:
    """How one layer is coded. ``scale`` is None until a float32 step has calibrated it."""

    name: str
    numel: int
    bits: int  # 1..8, or FLOAT_BITS for a layer always sent as float32
    layout: LaneLayout | None  # lane layout of the packed codes; None for float32 layers
    scale: float | None = None  # shared clipping scale of the quantizer
    version: int = 0  # number of reductions this entry has gone through

    @property
    def packed(self) -> bool:
        """True when this step sends packed codes, False when it sends float32."""
        return self.bits != FLOAT_BITS and self.scale is not None

    def digest(self, size: int) -> int:
        scale = "none" if self.scale is None else float(self.scale).hex()
        layout = None if self.layout is None else (str(self.layout.container), self.layout.lane_bits)
        key = f"{self.name}|{self.numel}|{self.bits}|{layout}|{scale}|{self.version}|{size}"
        return zlib.crc32(key.encode()) & ((1 << DIGEST_BITS) - 1)

    def state_dict(self) -> dict:
        return {"bits": self.bits, "scale": self.scale, "version": self.version, "numel": self.numel}


class Codebook:
    """All layers' entries, keyed by parameter name."""

    def __init__(self) -> None:
        self.layers: dict[str, LayerCode] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __getitem__(self, name: str) -> LayerCode:
        return self.layers[name]

    def add(self, code: LayerCode) -> LayerCode:
        self.layers[code.name] = code
        return code

    def state_dict(self) -> dict:
        return {name: code.state_dict() for name, code in self.layers.items()}
