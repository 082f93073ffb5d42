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
    codec: str = "uniform"  # codec name (``codecs.make_codec``) of the packed codes
    transport: str = "allreduce"  # how the layer crosses the ranks (``cost_model``)
    codec_key: str = ""  # the codec's shared parameters (e.g. fitted levels), as text

    @property
    def packed(self) -> bool:
        """True when this step sends packed codes, False when it sends float32."""
        return self.bits != FLOAT_BITS and self.scale is not None

    def digest(self, size: int, codebook_version: int = 0) -> int:
        """20-bit digest of everything ranks must agree on for this layer, with N and the
        codebook's version."""
        scale = "none" if self.scale is None else float(self.scale).hex()
        layout = None if self.layout is None else (str(self.layout.container), self.layout.lane_bits)
        key = (f"{self.name}|{self.numel}|{self.bits}|{layout}|{scale}|{self.version}|{size}|{self.codec}|"
               f"{self.transport}|{self.codec_key}|{codebook_version}")
        return zlib.crc32(key.encode()) & ((1 << DIGEST_BITS) - 1)

    def state_dict(self) -> dict:
        return {"bits": self.bits, "scale": self.scale, "version": self.version, "numel": self.numel,
                "codec": self.codec, "transport": self.transport}


class Codebook:
    """All layers' entries, keyed by parameter name, and a version that every payload carries.

    ``version`` changes only when the decision changes (a reallocation); ranks whose versions
    differ are stopped by the payload check at the next step.
    """

    def __init__(self) -> None:
        self.layers: dict[str, LayerCode] = {}
        self.version = 0

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __getitem__(self, name: str) -> LayerCode:
        return self.layers[name]

    def add(self, code: LayerCode) -> LayerCode:
        self.layers[code.name] = code
        return code

    def __iter__(self):
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def digest(self, name: str, size: int) -> int:
        """The digest of layer ``name`` under this codebook's version."""
        return self.layers[name].digest(size, self.version)

    def state_dict(self) -> dict:
        return {"version": self.version, "layers": {name: code.state_dict() for name, code in self.layers.items()}}
