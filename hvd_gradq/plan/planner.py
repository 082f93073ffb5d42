"""The planner: from a layer's requested codec and bit width to its plan (the codec that codes it
on the wire, the transport, the predicted cost) and its codebook entry.

Every transport a codec can use is priced with the cost model from sizes the codecs and the wire
coders compute without coding anything: the lane payload for ``allreduce`` (summable shared-scale
codes only), one frame per rank for ``allgather``, one frame per chunk and rank for
``two_phase``. ``transport="auto"`` takes the cheapest; every rank prices the same figures
(two-phase at its slowest rank), so every rank chooses the same. Pure: no Horovod.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hvd_gradq.bits import rotation as rot
from hvd_gradq.bits.lanes import lane_layout
from hvd_gradq.codebook import FLOAT_BITS, LOWRANK, ROTATED, SHARED_SCALE, SUMMABLE, LayerCode
from hvd_gradq.codecs import LEVEL_CODECS, Codec, make_codec
from hvd_gradq.codecs.lowrank import factor_bytes, factored_shape
from hvd_gradq.plan import cost_model
from hvd_gradq.plan.cost_model import (
    ALLGATHER,
    ALLREDUCE,
    FLOAT32,
    NONE,
    TRANSPORTS,
    TWO_PHASE,
    LinkModel,
    TransportCost,
)
from hvd_gradq.wire.gather_coder import chunk_frame_bytes, frame_bytes
from hvd_gradq.wire.header import SUM, header_len
from hvd_gradq.wire.lane_coder import THIS_STEP, lane_payload_bytes, stats_bytes

#: the sparsifiers, which take a compression ratio instead of bits
RATIO_CODECS = ("jointsq", "topk")
#: every codec the optimizer takes: the summable lanes (rotated, shared-scale), the level codecs,
#: the sparsifiers, the low-rank factors
CODECS = (*SUMMABLE, *sorted(LEVEL_CODECS), *RATIO_CODECS, LOWRANK)
#: what a shared-scale layer is coded with when it is gathered instead of summed: evenly spaced
#: levels, with a scale per bucket of the sender's own (a rank's codes need not be summable); a
#: rotated layer gathered travels as the rotated code with each rank's own block scales
GATHERED_SHARED_SCALE = "qsgdinf"


@dataclass
class LayerPlan:
    """One layer's decision and its predicted cost (``costs``: every transport that was priced).

    ``codec`` is what was asked for, ``wire_codec`` what codes the layer on the wire (they differ
    when a shared-scale layer is gathered: then it travels as ``qsgdinf``)."""

    name: str
    numel: int
    bits: int
    codec: str
    transport: str
    predicted: TransportCost
    costs: dict[str, TransportCost]
    payload_bytes: int = 0  # measured at the collectives, latest step
    wire_codec: str = ""
    #: the codec object of a gathered layer (None for lanes, float32 and 0-bit layers)
    gather: Codec | None = field(default=None, repr=False, compare=False)
    rank: int = 0  # of a low-rank layer: its factors' rank

    def __str__(self) -> str:
        if self.rank:
            return (f"{self.name}: {self.numel} el, {self.codec} rank {self.rank} via {self.transport}, "
                    f"{self.payload_bytes} B (predicted {self.predicted.payload_bytes} B)")
        how = self.wire_codec if self.wire_codec == self.codec else f"{self.codec} gathered as {self.wire_codec}"
        return (f"{self.name}: {self.numel} el, {how}@{self.bits}b via {self.transport}, "
                f"{self.payload_bytes} B (predicted {self.predicted.payload_bytes} B)")


class Planner:
    """Plans the layers of one rank of a process set of ``size`` ranks."""

    def __init__(self, *, codec: str, ratio: float | None, bucket_size: int, min_elements: int, size: int,
                 rank: int, link: LinkModel, rotation: int = 4096, rounding: str = "nearest", seed: int = 0,
                 block_scales: str = "this_step", factors: str = "float32") -> None:
        self.codec, self.ratio, self.bucket_size, self.min_elements = codec, ratio, bucket_size, min_elements
        self.factors = factors
        self.rotation, self.rounding, self.seed = rotation, rounding, seed
        self.this_step = block_scales == "this_step"
        self.size, self.rank, self.link = size, rank, link
        self._codecs: dict[int, Codec] = {}
        #: the low-rank codec's planner for the layers it does not suit (vectors, small matrices)
        self.fallback = Planner(codec=ROTATED, ratio=None, bucket_size=bucket_size, min_elements=min_elements,
                                size=size, rank=rank, link=link, rotation=rotation, rounding=rounding, seed=seed,
                                block_scales=block_scales) if codec == LOWRANK else None

    def gather_codec(self, bits: int) -> Codec:
        """The per-rank codec of a gathered layer at ``bits`` (one object per width; codecs that
        fit levels get their own per layer from ``new_gather_codec``)."""
        codec = self._codecs.get(bits)
        if codec is None:
            codec = self._codecs[bits] = self.new_gather_codec(bits)
        return codec

    def new_gather_codec(self, bits: int) -> Codec:
        if self.fallback is not None:
            return self.fallback.new_gather_codec(bits)
        if self.codec in RATIO_CODECS:
            return make_codec(self.codec, ratio=self.ratio)
        if self.codec == ROTATED:  # gathered, each rank's rotated code has its own block scales and key
            return make_codec(ROTATED, bits, rotation=self.rotation, rounding=self.rounding)
        name = GATHERED_SHARED_SCALE if self.codec == SHARED_SCALE else self.codec
        return make_codec(name, bits, bucket_size=self.bucket_size)

    def costs(self, numel: int, bits: int) -> dict[str, TransportCost]:
        """Every transport open to the codec at ``bits``, priced for this rank."""
        codec = self.gather_codec(bits)
        n = self.size
        chunks = chunk_frame_bytes(codec, numel, n)
        per_rank = [cost_model.two_phase_cost(chunks, chunks, r, self.link) for r in range(n)]
        mine = per_rank[self.rank]
        slowest = max(c.seconds for c in per_rank)  # the choice must be the same on every rank
        costs = {
            ALLGATHER: cost_model.allgather_cost(frame_bytes(codec, numel), n, self.link),
            TWO_PHASE: TransportCost(TWO_PHASE, mine.payload_bytes, mine.sent_bytes, mine.received_bytes,
                                     mine.steps, slowest),
        }
        if self.codec in SUMMABLE:
            block = rot.block_for(numel, self.rotation) if self.codec == ROTATED else 0
            this_step = bool(block) and self.this_step
            costs[ALLREDUCE] = cost_model.allreduce_cost(lane_payload_bytes(numel, bits, n, SUM, block, this_step),
                                                         n, self.link)
            if this_step:  # the block statistics go first, in their own allreduce
                costs[ALLREDUCE] = cost_model.then(cost_model.allreduce_cost(stats_bytes(numel, block), n, self.link),
                                                   costs[ALLREDUCE])
        return costs

    def choose(self, name: str, costs: dict[str, TransportCost], forced: str) -> str:
        if forced == "auto":
            return cost_model.cheapest([costs[t] for t in TRANSPORTS if t in costs]).transport
        if forced not in costs:
            raise ValueError(
                f"layer {name!r}: transport {forced!r} needs summable codes (codec={ROTATED!r} or "
                f"{SHARED_SCALE!r}); codec "
                f"{self.codec!r} can use {sorted(costs)}"
            )
        return forced

    def lowrank_cost(self, rows: int, cols: int, rank: int) -> TransportCost:
        """P with the summed header (float32), then Q (float32, or float16 with ``factors``)."""
        p, q = factor_bytes(rows, cols, rank, self.factors)
        return cost_model.lowrank_cost(4 * header_len(torch.float32, self.size) + p, q, self.size, self.link)

    def plan(self, name: str, numel: int, bits: int, forced: str, shape=None,
             rank: int = 0) -> tuple[LayerPlan, LayerCode]:
        """The layer's plan and its codebook entry. ``forced``: "auto" or a transport; ``shape``
        and ``rank``: the parameter's shape and the low-rank codec's rank for it."""
        n = self.size
        ms = None if shape is None or numel < self.min_elements else factored_shape(shape, rank)
        if ms is None and self.fallback is not None:
            return self.fallback.plan(name, numel, bits, forced)
        if ms is not None:  # codec="lowrank", or a rank the allocator chose under another codec
            cost = self.lowrank_cost(*ms, rank)
            code = LayerCode(name, numel, FLOAT_BITS, None, codec=LOWRANK, transport=LOWRANK, rank=rank,
                             codec_key=f"q={rot.key_for(self.seed, name):x}"  # the first Q's key
                                       + (",f16" if self.factors == "float16" else ""))
            return LayerPlan(name, numel, FLOAT_BITS, LOWRANK, LOWRANK, cost, {LOWRANK: cost}, wire_codec=LOWRANK,
                             rank=rank), code
        if numel < self.min_elements:  # tiny layers: exact float32 allreduce (header included)
            cost = cost_model.allreduce_cost(lane_payload_bytes(numel, None, n), n, self.link, FLOAT32)
            code = LayerCode(name, numel, FLOAT_BITS, None, codec="float32", transport=FLOAT32)
            return LayerPlan(name, numel, FLOAT_BITS, "float32", FLOAT32, cost, {FLOAT32: cost},
                             wire_codec="float32"), code
        if bits == 0:
            cost = cost_model.none_cost()
            code = LayerCode(name, numel, 0, None, codec=self.codec, transport=NONE)
            return LayerPlan(name, numel, 0, self.codec, NONE, cost, {NONE: cost}, wire_codec=self.codec), code
        costs = self.costs(numel, bits)
        choice = self.choose(name, costs, forced)
        if choice == ALLREDUCE:
            code = LayerCode(name, numel, bits, lane_layout(bits, n, torch.int64), codec=self.codec,
                             transport=ALLREDUCE)
            if self.codec == ROTATED:
                code.rotation, code.rotation_key = rot.block_for(numel, self.rotation), rot.key_for(self.seed, name)
                code.rounding = self.rounding
                code.codec_key = THIS_STEP if self.this_step else ""
            return LayerPlan(name, numel, bits, self.codec, ALLREDUCE, costs[choice], costs,
                             wire_codec=self.codec), code
        gather = self.new_gather_codec(bits)  # its own object: adaptive codecs fit levels per layer
        if self.codec in RATIO_CODECS:
            key = f"ratio={self.ratio}"
        elif self.codec == ROTATED:
            key = f"rotation={self.rotation};rounding={self.rounding}"
        else:
            key = f"bucket={self.bucket_size}"
        code = LayerCode(name, numel, bits, None, codec=gather.name, transport=choice, codec_key=key)
        return LayerPlan(name, numel, bits, self.codec, choice, costs[choice], costs, wire_codec=gather.name,
                         gather=gather), code

    def wire_bits(self, numel: int, bits: int, forced: str) -> float:
        """Bits handed to the collectives per step for a layer coded at ``bits`` (what the
        allocator's ``rate="wire"`` prices)."""
        if bits == 0:
            return 0.0
        if self.fallback is not None:
            return self.fallback.wire_bits(numel, bits, forced)
        costs = self.costs(numel, bits)
        cost = costs[forced] if forced in costs else cost_model.cheapest([costs[t] for t in TRANSPORTS
                                                                            if t in costs])
        return 8.0 * cost.payload_bytes
