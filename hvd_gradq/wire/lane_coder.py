"""The shared-scale lane protocol of one rank: summable payloads for an allreduce.

Per layer and step, ``encode`` quantizes g + residual against the layer's shared scale (the
codebook's), packs the codes into lanes (int64 words for a Sum, exact integers in float64 words
for an Average) behind the summed header (``wire.header``), and stages the new residual;
``decode`` checks the reduced header, commits or keeps the residual, decodes the mean over the
contributing ranks and sets the next shared scale from the header's statistic (the mean over
ranks of max|g + r| / scale). A layer's first step, and any layer below ``min_elements``, goes as
float32 with the same header. Pure tensor code: rank and size are the coder's, the collectives
are the caller's (``horovod.compressor`` for the stock path, the exchange engine for the drop-in).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hvd_gradq.bits.dither import DitherSource
from hvd_gradq.bits.lanes import lane_layout, pack_lanes
from hvd_gradq.codebook import FLOAT_BITS, Codebook, LayerCode
from hvd_gradq.codecs import ErrorFeedback
from hvd_gradq.codecs.shared_scale import abs_max, dequantize_lanes, quantize_to_lanes
from hvd_gradq.wire.header import AVERAGE, SUM, header_len, header_words, read_header

#: fixed-point unit of the per-rank scale statistic in packed payloads (max|x| / scale)
_STAT_ONE = 1 << 16
_STAT_CAP = 1 << 30


def container_of(op: str) -> torch.dtype:
    """The word type of packed lanes: int64 for a Sum, exact integers in float64 for an Average
    (Horovod's Average truncates integers)."""
    return torch.int64 if op == SUM else torch.float64


def lane_payload_bytes(numel: int, bits: int | None, size: int, op: str = SUM) -> int:
    """Bytes of one rank's payload for a layer of ``numel`` elements: packed ``bits``-bit lanes
    over ``size`` ranks, or float32 when ``bits`` is None (header included)."""
    if bits is None:
        return (header_len(torch.float32, size) + numel) * 4
    container = container_of(op)
    layout = lane_layout(bits, size, container)
    return header_len(container, size) * layout.word_bytes + layout.nbytes(numel)


@dataclass(frozen=True)
class LaneContext:
    """What ``decode`` needs of its ``encode`` (it never leaves the rank)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    packed: bool
    track: bool  # error feedback for this layer this step


class LaneCoder:
    """One rank's lane coding of every layer that goes by allreduce.

    Args:
        bits: the width of a layer the codebook has no entry for yet (the stock path; the
            drop-in's plan makes every entry itself).
        op: ``wire.SUM`` or ``wire.AVERAGE``: what the allreduce does to the words.
        min_elements: such layers below this size go as float32.
        seed: of the dither stream, drawn per rank from (seed, rank).
        rank, size: this rank and the number of ranks (lane widths hold the sum over ``size``).
        codebook: the shared decision (the drop-in passes its own, holding every layer).
        residuals: where the lanes keep what clipping and rounding dropped.
        label: what error messages tell the user to construct identically on every rank.
    """

    def __init__(self, *, bits: int, op: str, min_elements: int, seed: int, rank: int, size: int,
                 codebook: Codebook, residuals: ErrorFeedback, label: str) -> None:
        if op not in (SUM, AVERAGE):
            raise ValueError(f"op must be {SUM!r} or {AVERAGE!r}, got {op!r}")
        self.bits, self.op, self.min_elements, self.seed = bits, op, min_elements, seed
        self.rank, self.size = rank, size
        self.codebook = codebook
        self.residuals = residuals
        self.label = label
        self.rng = DitherSource([seed, rank])

    def restart(self, rank: int, size: int) -> None:
        """A fresh codebook for a new number of ranks: lanes laid out anew, every scale
        recalibrated by one float32 step; residuals and the dither stream stay."""
        self.codebook.clear()
        self.rank, self.size = rank, size

    def code_of(self, name: str, numel: int) -> LayerCode:
        """The layer's codebook entry, made (float32 below ``min_elements``, else ``bits``-bit
        lanes) the first time the layer is seen."""
        if name in self.codebook:
            code = self.codebook[name]
            if code.numel != numel:
                raise ValueError(f"layer {name!r} changed size from {code.numel} to {numel} elements")
            return code
        if numel < self.min_elements:
            return self.codebook.add(LayerCode(name, numel, FLOAT_BITS, None, codec="float32", transport="float32"))
        layout = lane_layout(self.bits, self.size, container_of(self.op))
        return self.codebook.add(LayerCode(name, numel, self.bits, layout))

    def encode(self, name: str, tensor: torch.Tensor, *, frozen: bool = False) -> tuple[torch.Tensor, LaneContext]:
        """This rank's payload of layer ``name``. ``frozen``: the parameter does not require grad
        now (Horovod still sends zeros for it): it goes as exact float32 and its residual is
        neither added nor replaced, so a frozen layer stays where it is."""
        code = self.code_of(name, tensor.numel())
        quantized = code.bits != FLOAT_BITS
        g = tensor.detach().reshape(-1).to(torch.float32)  # a view when the gradient is flat float32
        # the codec quantizes g + r; the new residual is committed in decode, once the reduced
        # header says whether the step is finite on every rank
        track = quantized and not frozen
        r = self.residuals.buffer(name, g) if track else None
        amax = abs_max(g, r)  # max |g + r|, NaN/inf if any element is: one pass, no temporary
        nonfinite = not math.isfinite(amax)
        packed = code.packed and not frozen
        if packed:
            container = code.layout.container
            if nonfinite:  # every rank will decode NaN; keep the residual of the last finite step
                body, stat = pack_lanes(torch.zeros_like(g, dtype=torch.int64), code.layout), 0
            else:
                stat = min(round(amax / code.scale * _STAT_ONE), _STAT_CAP)
                body = quantize_to_lanes(g, code.scale, code.bits, code.layout, self.rng, residual=r,
                                         residual_out=self.residuals.staging(name, g) if track else None)
        else:  # float32: small layers always, quantized layers until a scale is calibrated
            container = torch.float32
            body = g if r is None else g + r
            stat = amax if (quantized and not nonfinite and not frozen) else 0.0
        head = header_words(rank=self.rank, size=self.size, digest=self.codebook.digest(name, self.size),
                            nonfinite=nonfinite, stat=stat, container=container)
        return torch.cat([head, body.to(container)]), LaneContext(name, tensor.shape, tensor.dtype, packed, track)

    def decode(self, reduced: torch.Tensor, ctx: LaneContext) -> torch.Tensor:
        """The layer's aggregate from the reduced payload: the sum over ranks for a Sum, that sum
        divided by N for an Average (also when ranks joined: they contribute nothing). Raises
        ``ReductionMismatchError`` / ``CodebookMismatchError`` from the reduced words alone, so
        every contributing rank raises the same at the same step."""
        size = self.size
        code = self.codebook[ctx.name]
        hlen = header_len(reduced.dtype, size)
        head = read_header(reduced[:hlen], size=size, op=self.op, layer=ctx.name, compressor=self.label)
        code.version += 1
        if head.nonfinite:  # some rank had NaN/Inf: every rank decodes NaN, residuals stay as they were
            return torch.full(ctx.shape, float("nan"), dtype=ctx.dtype, device=reduced.device)
        if ctx.track:  # packed: the staged residual; float32: sent exactly, nothing left
            self.residuals.commit(ctx.name, zero=not ctx.packed)
        k = head.ranks  # the ranks that contributed: all, or those that have not called hvd.join()
        if ctx.packed:
            out = dequantize_lanes(reduced[hlen:], code.numel, code.scale, code.bits, code.layout, k,
                                   head.multiplier)  # the mean over the contributing ranks
            factor = k if self.op == SUM else k / size
            if factor != 1:
                out.mul_(factor)
            ratio = head.stat_sum / (k * _STAT_ONE)
            code.scale = code.scale * ratio if ratio > 0 else None
        else:
            out = reduced[hlen:] * (head.multiplier / (size if self.op == AVERAGE else 1))
            if code.bits != FLOAT_BITS:
                mean_max = head.stat_sum / k
                code.scale = mean_max if mean_max > 0 else None
        return out.view(ctx.shape).to(ctx.dtype)

    def state_dict(self) -> dict:
        return {"rng": self.rng.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.load_state_dict(state["rng"])
