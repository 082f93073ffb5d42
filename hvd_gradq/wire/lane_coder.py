"""The lane protocol of one rank: summable payloads for an allreduce.

Per layer and step, ``encode`` quantizes g + residual against the layer's shared scale (the
codebook's), packs the codes into lanes (int64 words for a Sum, exact integers in float64 words
for an Average) behind the summed header (``wire.header``), and stages the new residual;
``decode`` checks the reduced header, commits or keeps the residual, decodes the mean over the
contributing ranks and sets the next shared scale from the header's statistic (the mean over
ranks of max|g + r| / scale). A layer's first step, and any layer below ``min_elements``, goes as
float32 with the same header.

Rotated lanes (codec ``rotated``, ``codecs.rotated``): g + r is rotated with the layer's shared
rotation, each rotation block quantized against its shared clip scale, and the payload carries,
after the packed codes, one statistic word per block (its energy relative to the layer's
reference RMS), summed like the codes; the sums set every block's next scale, identically on
every rank. The residual is kept in the gradient's own domain.

Rotated lanes with this step's scales (``codec_key == THIS_STEP``, the drop-in's default):
``prepare`` rotates and returns the block statistics for a first, small allreduce (a count, a
non-finite flag and one word per block); ``encode_prepared`` takes their sum, sets every block's
scale from this step's energies (the same on every rank) and codes; the payload then carries no
statistics. A row-sparse layer's blocks change between batches, which last step's scales miss.

Pure tensor code: rank and size are the coder's, the collectives are the caller's
(``horovod.compressor`` for the stock path, the exchange engine for the drop-in).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from hvd_gradq.bits import rotation
from hvd_gradq.bits.dither import DitherSource
from hvd_gradq.bits.lanes import lane_layout, pack_lanes, words_to_int64
from hvd_gradq.codebook import FLOAT_BITS, ROTATED, Codebook, LayerCode
from hvd_gradq.codecs import ErrorFeedback
from hvd_gradq.codecs import rotated as rot
from hvd_gradq.codecs.shared_scale import abs_max, dequantize_lanes, quantize_to_lanes
from hvd_gradq.wire.header import AVERAGE, SUM, header_len, header_words, read_header

#: fixed-point unit of the per-rank scale statistic in packed payloads (max|x| / scale)
_STAT_ONE = 1 << 16
_STAT_CAP = 1 << 30
#: the codec key of rotated lanes whose block scales come from this step's summed statistics
THIS_STEP = "scales=this_step"


def container_of(op: str) -> torch.dtype:
    """The word type of packed lanes: int64 for a Sum, exact integers in float64 for an Average
    (Horovod's Average truncates integers)."""
    return torch.int64 if op == SUM else torch.float64


def stats_bytes(numel: int, block: int) -> int:
    """Bytes of the first allreduce of rotated lanes with this step's scales."""
    return (2 + rotation.padded(numel, block) // block) * 8


def lane_payload_bytes(numel: int, bits: int | None, size: int, op: str = SUM, block: int = 0,
                       this_step: bool = False) -> int:
    """Bytes of one rank's payload for a layer of ``numel`` elements: packed ``bits``-bit lanes
    over ``size`` ranks, or float32 when ``bits`` is None (header included). ``block``: the
    rotation block of rotated lanes (0: not rotated); ``this_step``: their scales come from the
    first allreduce (``stats_bytes``, not included), so the payload carries no statistics."""
    if bits is None:
        return (header_len(torch.float32, size) + numel) * 4
    container = container_of(op)
    layout = lane_layout(bits, size, container)
    if not block:
        return header_len(container, size) * layout.word_bytes + layout.nbytes(numel)
    m = rotation.padded(numel, block)
    stat_words = 0 if this_step else m // block
    return (header_len(container, size) + stat_words) * layout.word_bytes + layout.nbytes(m)


@dataclass(frozen=True)
class LaneContext:
    """What ``decode`` needs of its ``encode`` (it never leaves the rank)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    packed: bool
    track: bool  # error feedback for this layer this step
    err: torch.Tensor | None = None  # rotated lanes: the coding error in the rotated domain
    key: int = 0  # rotated lanes: the rotation key of this step
    this_step: bool = False  # rotated lanes coded with this step's scales (no statistics in the payload)


@dataclass
class Prepared:
    """A rotated layer between its statistics and its codes (``prepare`` -> ``encode_prepared``)."""

    code: LayerCode
    y: torch.Tensor  # the rotated g + r
    nonfinite: bool
    track: bool
    key: int
    shape: torch.Size
    dtype: torch.dtype


class LaneCoder:
    """One rank's lane coding of every layer that goes by allreduce.

    Args:
        bits: the width of a layer the codebook has no entry for yet (the stock path; the
            drop-in's plan makes every entry itself).
        op: ``wire.SUM`` or ``wire.AVERAGE``: what the allreduce does to the words.
        min_elements: such layers below this size go as float32.
        seed: of the dither streams, one per layer and rank, drawn from (seed, rank, layer name).
        rank, size: this rank and the number of ranks (lane widths hold the sum over ``size``).
        codebook: the shared decision (the drop-in passes its own, holding every layer).
        residuals: where the lanes keep what clipping and rounding dropped.
        label: what error messages tell the user to construct identically on every rank.
        rotation: the largest rotation block of the layers the coder makes entries for (the
            rotated lanes); 0: the unrotated shared-scale lanes.
        rounding: of the rotated lanes the coder makes entries for: "nearest" or "stochastic".
    """

    def __init__(self, *, bits: int, op: str, min_elements: int, seed: int, rank: int, size: int,
                 codebook: Codebook, residuals: ErrorFeedback, label: str, rotation: int = 0,
                 rounding: str = rot.NEAREST) -> None:
        if op not in (SUM, AVERAGE):
            raise ValueError(f"op must be {SUM!r} or {AVERAGE!r}, got {op!r}")
        self.bits, self.op, self.min_elements, self.seed = bits, op, min_elements, seed
        self.rank, self.size = rank, size
        self.codebook = codebook
        self.residuals = residuals
        self.label = label
        self.rotation, self.rounding = rotation, rounding
        #: per layer: its dither stream, drawn from (seed, rank, layer name), so what a layer draws
        #: does not depend on the order Horovod hands the layers over (grouped allreduces, fusion)
        self._rngs: dict[str, DitherSource] = {}
        # per layer, reused every step (no allocation on the hot path): the rotated g + r, the
        # coding error in the rotated domain
        self._rotated: dict[str, torch.Tensor] = {}
        self._errors: dict[str, torch.Tensor] = {}

    @staticmethod
    def _scratch(buffers: dict[str, torch.Tensor], code: LayerCode) -> torch.Tensor:
        """Layer ``code``'s float32 buffer of its padded rotated length in ``buffers``."""
        m = rotation.padded(code.numel, code.rotation)
        buf = buffers.get(code.name)
        if buf is None or buf.numel() != m:
            buf = buffers[code.name] = torch.empty(m, dtype=torch.float32)
        return buf

    def restart(self, rank: int, size: int) -> None:
        """A fresh codebook for a new number of ranks: lanes laid out anew, every scale
        recalibrated by one float32 step; residuals and the dither streams stay."""
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
        if not self.rotation:
            return self.codebook.add(LayerCode(name, numel, self.bits, layout))
        return self.codebook.add(LayerCode(
            name, numel, self.bits, layout, codec=ROTATED, rotation=rotation.block_for(numel, self.rotation),
            rotation_key=rotation.key_for(self.seed, name), rounding=self.rounding))

    def prepare(self, name: str, tensor: torch.Tensor, *, frozen: bool = False) -> tuple[torch.Tensor, Prepared] | None:
        """The first phase of a rotated layer coded with this step's scales: this rank's
        statistics (int64: 1, the non-finite flag, each block's energy ratio) for an allreduce
        (Sum), and what ``encode_prepared`` needs; None when the layer goes in one phase (other
        codes, a float32 calibration step, a frozen layer)."""
        code = self.code_of(name, tensor.numel())
        if not (code.rotation and code.codec_key == THIS_STEP and code.packed and not frozen):
            return None
        g = tensor.detach().reshape(-1).to(torch.float32)
        r = self.residuals.buffer(name, g)
        key = rotation.step_key(code.rotation_key, code.version)
        y, energy = rotation.rotate_energy(g, key, code.rotation, r, out=self._scratch(self._rotated, code))
        nonfinite = not math.isfinite(float(energy.sum()))
        blocks = torch.zeros_like(energy, dtype=torch.int64) if nonfinite else \
            rot.block_stats(energy, code.scale, code.rotation, self.size)
        stats = torch.cat([torch.tensor([1, int(nonfinite)], dtype=torch.int64), blocks])
        return stats, Prepared(code, y, nonfinite, True, key, tensor.shape, tensor.dtype)

    def encode_prepared(self, prep: Prepared, summed: torch.Tensor) -> tuple[torch.Tensor, LaneContext]:
        """The payload of a prepared layer, given the sum over ranks of the statistics: every
        block's clip from this step's mean energy (identical on every rank), then the codes."""
        code = prep.code
        summed = words_to_int64(summed)
        k, any_nonfinite = int(summed[0]), int(summed[1]) > 0
        nxt = None if any_nonfinite or k < 1 else rot.rms_from_stats(summed[2:], code.scale, k)
        if nxt is not None:
            code.scale, code.block_rms = nxt
        container = code.layout.container
        err = None
        if any_nonfinite:  # every rank will decode NaN; residuals stay
            words = pack_lanes(torch.zeros(prep.y.numel(), dtype=torch.int64), code.layout)
        else:
            scales = rot.clip_scales(code.block_rms, code.bits)
            rng = self._rng(code.name) if code.rounding == rot.STOCHASTIC else None
            staged = self.residuals.staging(code.name, prep.y[:code.numel])
            fused = rot.encode_lanes(prep.y, scales, code.bits, code.layout, key=prep.key, block=code.rotation,
                                     rotated=True, rng=rng, resid_out=staged)
            if fused is not None:  # the residual is staged already
                words = fused[0]
            else:
                err = self._scratch(self._errors, code)
                words = rot.quantize_blocks(prep.y, scales, code.bits, code.layout, rng=rng, err_out=err)
        head = header_words(rank=self.rank, size=self.size, digest=self.codebook.digest(code.name, self.size),
                            nonfinite=prep.nonfinite, stat=0.0, container=container)
        ctx = LaneContext(code.name, prep.shape, prep.dtype, True, not any_nonfinite, err, prep.key, True)
        return torch.cat([head, words.to(container)]), ctx

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
        if code.rotation:
            return self._encode_rotated(code, g, r, tensor, frozen, track)
        amax = abs_max(g, r)  # max |g + r|, NaN/inf if any element is: one pass, no temporary
        nonfinite = not math.isfinite(amax)
        packed = code.packed and not frozen
        if packed:
            container = code.layout.container
            if nonfinite:  # every rank will decode NaN; keep the residual of the last finite step
                body, stat = pack_lanes(torch.zeros_like(g, dtype=torch.int64), code.layout), 0
            else:
                stat = min(round(amax / code.scale * _STAT_ONE), _STAT_CAP)
                body = quantize_to_lanes(g, code.scale, code.bits, code.layout, self._rng(name), residual=r,
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
            if ctx.err is not None:  # back from the rotated domain
                like = ctx.err[:code.numel]
                rotation.unrotate_(ctx.err, ctx.key, code.rotation, code.numel,
                                   out=self.residuals.staging(ctx.name, like))
            self.residuals.commit(ctx.name, zero=not ctx.packed)
        k = head.ranks  # the ranks that contributed: all, or those that have not called hvd.join()
        if code.rotation:
            out = self._decode_rotated(code, reduced[hlen:], head.multiplier, k, head.stat_sum, ctx)
            factor = k if self.op == SUM else k / size
            return (out if factor == 1 else out.mul_(factor)).view(ctx.shape).to(ctx.dtype)
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

    def _encode_rotated(self, code: LayerCode, g: torch.Tensor, r: torch.Tensor | None, tensor: torch.Tensor,
                        frozen: bool, track: bool) -> tuple[torch.Tensor, LaneContext]:
        block, key = code.rotation, rotation.step_key(code.rotation_key, code.version)
        packed = code.packed and not frozen
        rng = self._rng(code.name) if code.rounding == rot.STOCHASTIC else None
        fused = None
        if packed:  # scales known (last step's): rotate, quantize and keep the error in one pass per block
            staged = self.residuals.staging(code.name, g) if track else None
            fused = rot.encode_lanes(g, rot.clip_scales(code.block_rms, code.bits), code.bits, code.layout, key=key,
                                     block=block, addend=r, rng=rng, energy=True, resid_out=staged)
        if fused is not None:
            words, energy = fused
        else:
            y, energy = rotation.rotate_energy(g, key, block, r, out=self._scratch(self._rotated, code))
        total = float(energy.sum())
        nonfinite = not math.isfinite(total)
        err = None
        if packed:
            container = code.layout.container
            blocks = energy.numel()
            if nonfinite:  # every rank will decode NaN; keep the residual of the last finite step
                words = pack_lanes(torch.zeros(blocks * block, dtype=torch.int64), code.layout)
                stats = torch.zeros(blocks, dtype=torch.int64)
            else:
                stats = rot.block_stats(energy, code.scale, block, self.size)
                if fused is None:
                    err = self._scratch(self._errors, code) if track else None
                    words = rot.quantize_blocks(y, rot.clip_scales(code.block_rms, code.bits), code.bits,
                                                code.layout, rng=rng, err_out=err)
            body = torch.cat([words.to(container), stats.to(container)])
            stat = 0.0
        else:  # float32 until the reference RMS is calibrated; frozen layers
            container = torch.float32
            body = g if r is None else g + r
            stat = math.sqrt(total / y.numel()) if (code.bits != FLOAT_BITS and not nonfinite and not frozen) else 0.0
        head = header_words(rank=self.rank, size=self.size, digest=self.codebook.digest(code.name, self.size),
                            nonfinite=nonfinite, stat=stat, container=container)
        ctx = LaneContext(code.name, tensor.shape, tensor.dtype, packed, track, err, key)
        return torch.cat([head, body.to(container)]), ctx

    def _decode_rotated(self, code: LayerCode, body: torch.Tensor, multiplier: int, k: int, stat_sum: float,
                        ctx: LaneContext) -> torch.Tensor:
        """The mean over the ``k`` contributing ranks (flat float32), and the next scales."""
        block = code.rotation
        m = rotation.padded(code.numel, block)
        if not ctx.packed:
            out = body * (multiplier / k)
            if code.bits != FLOAT_BITS:
                ref = stat_sum / k
                code.scale = ref if ref > 0 else None
                code.block_rms = (torch.full((m // block,), ref, dtype=torch.float32) if ref > 0 else None)
            return out
        nwords = code.layout.words(m)
        scales = rot.clip_scales(code.block_rms, code.bits)
        out = rot.decode_lanes(body[:nwords], code.numel, scales, code.bits, code.layout, k, multiplier, key=ctx.key,
                               block=block)
        if out is None:
            mean = rot.dequantize_blocks(body[:nwords], m, scales, code.bits, code.layout, k, multiplier)
            out = rotation.unrotate_(mean, ctx.key, block, code.numel)
        if not ctx.this_step:  # the scales of the next step, from this step's statistics
            nxt = rot.rms_from_stats(words_to_int64(body[nwords:], multiplier), code.scale, k)
            code.scale, code.block_rms = (None, None) if nxt is None else nxt
        return out

    def _rng(self, name: str) -> DitherSource:
        rng = self._rngs.get(name)
        if rng is None:
            rng = self._rngs[name] = DitherSource([self.seed, self.rank, zlib.crc32(name.encode())])
        return rng

    def state_dict(self) -> dict:
        return {"rngs": {name: rng.state_dict() for name, rng in self._rngs.items()}}

    def load_state_dict(self, state: dict) -> None:
        """(A state saved before the streams were per layer, ``{"rng": ...}``, restarts them.)"""
        self._rngs.clear()
        for name, rng_state in state.get("rngs", {}).items():
            self._rng(name).load_state_dict(rng_state)
