"""The codebook: the per-layer coding decision that every rank must share exactly.

A layer's entry says how its gradient is coded this step (bit width, lane layout, shared scale,
codec and its shared parameters, transport) and carries a version that advances with every
reduction. Its digest travels in every payload header (``wire``), so ranks that disagree are
caught at the step where they diverge.

``Codebook.state_dict()`` is the one serialisation of it: checkpoints, the root's codebook that
a rebuilt or re-joined rank adopts (elastic, ``hvd.join()``), and the stock compressor's state
all use it. The lane layout is not in it: it follows from the bits and the number of ranks.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from hvd_gradq.bits.lanes import LaneLayout

#: bits of the per-layer digest in every payload header
DIGEST_BITS = 20
#: bit width that means "sent as float32" (layers below ``min_elements``)
FLOAT_BITS = 32
#: the codec name of the summable lane codes with one scale per layer shared by every rank
SHARED_SCALE = "shared_scale"
#: the codec name of the rotated summable lane codes (``codecs.rotated``: a randomized Hadamard
#: rotation, then one shared scale per rotation block)
ROTATED = "rotated"
#: the codecs whose codes are summable in an allreduce
SUMMABLE = (ROTATED, SHARED_SCALE)
#: the codec name of the low-rank factors of matrix gradients (``codecs.lowrank``, PowerSGD)
LOWRANK = "lowrank"


@dataclass
class LayerCode:
    """How one layer is coded. ``scale`` is None until a float32 step has calibrated it."""

    name: str
    numel: int
    bits: int  # 0..8, or FLOAT_BITS for a layer always sent as float32
    layout: LaneLayout | None  # lane layout of the packed codes; None unless summed in lanes
    scale: float | None = None  # shared clipping scale of the lane quantizer
    version: int = 0  # number of reductions this entry has gone through
    codec: str = SHARED_SCALE  # codec name (``codecs.make_codec``) of the coded values
    transport: str = "allreduce"  # how the layer crosses the ranks (``plan.cost_model``)
    codec_key: str = ""  # the codec's shared parameters (e.g. fitted levels), as text
    rotation: int = 0  # rotation block (elements) of a rotated code; 0: not rotated
    rotation_key: int = 0  # the 64-bit key of the rotation's signs (the same on every rank)
    rounding: str = "nearest"  # of the rotated lanes: "nearest" or "stochastic"
    block_rms: torch.Tensor | None = None  # rotated lanes: float32 RMS per rotation block (scales)
    rank: int = 0  # of a low-rank layer: the factors' rank (its bits are then FLOAT_BITS)

    @property
    def packed(self) -> bool:
        """True when this step sends packed lane codes, False when it sends float32."""
        return self.bits != FLOAT_BITS and self.scale is not None

    def digest(self, size: int, codebook_version: int = 0) -> int:
        """20-bit digest of everything ranks must agree on for this layer, with N and the
        codebook's version."""
        scale = "none" if self.scale is None else float(self.scale).hex()
        layout = None if self.layout is None else (str(self.layout.container), self.layout.lane_bits)
        key = (f"{self.name}|{self.numel}|{self.bits}|{layout}|{scale}|{self.version}|{size}|{self.codec}|"
               f"{self.transport}|{self.codec_key}|{codebook_version}")
        if self.rank:
            key += f"|rank={self.rank}"
        if self.rotation:
            rms = 0 if self.block_rms is None else zlib.crc32(self.block_rms.numpy().tobytes())
            key += f"|rot={self.rotation}:{self.rotation_key:x}:{self.rounding}:{rms:x}"
        return zlib.crc32(key.encode()) & ((1 << DIGEST_BITS) - 1)

    def state_dict(self) -> dict:
        return {"numel": self.numel, "bits": self.bits, "scale": self.scale, "version": self.version,
                "codec": self.codec, "transport": self.transport, "codec_key": self.codec_key,
                "rotation": self.rotation, "rotation_key": self.rotation_key, "rounding": self.rounding,
                "block_rms": None if self.block_rms is None else self.block_rms.clone(), "rank": self.rank}

    def follow(self, state: Mapping) -> None:
        """Take the values that evolve while training (scale, reduction count, codec parameters)
        from another rank's or a saved ``state_dict()`` of this layer."""
        self.scale, self.version, self.codec_key = state["scale"], state["version"], state["codec_key"]
        rms = state.get("block_rms")
        self.block_rms = None if rms is None else rms.clone()


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

    def __iter__(self) -> Iterator[LayerCode]:
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def clear(self) -> None:
        self.layers.clear()

    def digest(self, name: str, size: int) -> int:
        """The digest of layer ``name`` under this codebook's version."""
        return self.layers[name].digest(size, self.version)

    def state_dict(self) -> dict:
        """``{"version": v, "layers": {name: {numel, bits, scale, version, codec, transport,
        codec_key, rotation, rotation_key, rounding, block_rms}}}``: picklable, the form every
        owner saves, broadcasts and adopts."""
        return {"version": self.version, "layers": {name: code.state_dict() for name, code in self.layers.items()}}
