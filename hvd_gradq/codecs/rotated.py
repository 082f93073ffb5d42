"""Rotated summable codes: b-bit levels per rotation block after a randomized Hadamard rotation.

After the rotation (``bits.rotation``) the coordinates of a block of B elements are close to
N(0, sigma_b^2), sigma_b^2 = ||block||^2 / B, whatever the gradient looked like (sparse rows, heavy
tails). Each block is then quantized onto 2**b evenly spaced levels over [-s_b, s_b] with the clip
scale s_b = CLIP[b] * sigma_b that minimises the mean squared error of a uniform quantizer for a
Gaussian (computed numerically; Max 1960 tabulates the same optimum step). The normalised MSE of
this code on Gaussian data is ``GAUSSIAN_NMSE[b]`` (0.119 / 0.037 / 0.0115 at 2 / 3 / 4 bits,
nearest rounding); with one scale per layer over the raw gradient it can be 10**3 times worse on
row-sparse layers.

Rounding is to the nearest level by default (biased; the clipping and rounding error goes to
error feedback), or stochastic (unbiased within the clip range) with the counter-based dither.

Summability: every rank uses the same rotation and the same clip scales for a block, so the sum
over ranks of the codes decodes to the mean of their levels, and one inverse rotation after the
reduction gives the mean gradient. The scales come from the previous step's block energies,
summed across ranks as fixed-point ratios to the layer's reference RMS (``block_stats`` /
``rms_from_stats``): integers, so every rank derives bitwise the same scales.

Gathered (allgather, two-phase), codes need not be summable: ``RotatedCodec`` is one rank's
self-contained rotated code, with its own rotation key (sent in the payload) and each block's own
exact clip scale (sent as float32), at exactly ``bits`` bits per element.
"""
from __future__ import annotations

import math

import torch

from hvd_gradq.bits import native
from hvd_gradq.bits import rotation as rotation_mod
from hvd_gradq.bits.bitstream import pack_bits, packed_nbytes, unpack_bits
from hvd_gradq.bits.dither import DitherSource
from hvd_gradq.bits.lanes import LaneLayout, pack_lanes, unpack_lanes, words_to_int64
from hvd_gradq.codecs.base import Codec, Encoded, flat_float32

#: the MSE-optimal clip scale (outermost level / sigma) of a uniform 2**b-level quantizer on N(0, 1)
CLIP = {1: 0.7979, 2: 1.4935, 3: 2.0511, 4: 2.5140, 5: 2.9162, 6: 3.2780, 7: 3.6111, 8: 3.9222}
#: its normalised MSE on N(0, 1) with nearest rounding
GAUSSIAN_NMSE = {1: 0.3634, 2: 0.1188, 3: 0.03744, 4: 0.01154, 5: 0.003495, 6: 0.001040, 7: 3.043e-4,
                 8: 8.77e-5}
#: fixed-point unit of a block's energy ratio in the summed statistics
STAT_ONE = 1 << 24
#: a block whose energy is below this fraction of the layer's mean gets this fraction's scale
SCALE_FLOOR = 2.0 ** -20
NEAREST, STOCHASTIC = "nearest", "stochastic"
ROUNDINGS = (NEAREST, STOCHASTIC)


def stat_cap(size: int) -> int:
    """The largest per-rank statistic: the sum over ``size`` ranks stays an exact integer in a
    float64 word (below 2**48 after Average's multiply by 1/N) and in an int64 word."""
    return min(1 << 40, (1 << 47) // max(1, size))


def block_energy(y: torch.Tensor, block: int) -> torch.Tensor:
    """Sum of squares of each block of the flat rotated vector ``y`` (float64)."""
    return y.view(-1, block).to(torch.float64).pow(2).sum(dim=1)


def block_stats(energy: torch.Tensor, ref: float, block: int, size: int) -> torch.Tensor:
    """This rank's statistics: each block's energy over ``block * ref**2``, in units of
    ``1 / STAT_ONE``, rounded and capped (int64)."""
    ratio = energy / (block * ref * ref) * STAT_ONE
    return ratio.round().clamp_(0, stat_cap(size)).to(torch.int64)


def rms_from_stats(stat_sum: torch.Tensor, ref: float, count: int) -> tuple[float, torch.Tensor] | None:
    """The next reference RMS and the RMS per block (float32) from the summed int64 statistics of
    ``count`` ranks (the mean over ranks of each block's energy); None when every block was zero
    on every rank. Integer inputs and elementwise float ops: every rank gets the same bits."""
    total = int(stat_sum.sum())
    if total <= 0:
        return None
    new_ref = ref * math.sqrt(total / (count * STAT_ONE * stat_sum.numel()))
    rms = stat_sum.to(torch.float64).div_(count * STAT_ONE).sqrt_().mul_(ref)
    return new_ref, rms.clamp_(min=new_ref * math.sqrt(SCALE_FLOOR)).to(torch.float32)


def clip_scales(rms: torch.Tensor, bits: int) -> torch.Tensor:
    """The clip scale of every block at ``bits`` from its RMS (float32)."""
    return (rms * CLIP[bits]).to(torch.float32)


def _per_block(scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = (1 << bits) - 1
    step = (scales * (2.0 / top)).to(torch.float32)
    return step, (1.0 / step).to(torch.float32)


def _native_ok(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())
               for t in tensors)


def quantize_blocks(y: torch.Tensor, scales: torch.Tensor, bits: int, layout: LaneLayout, *,
                    rng: DitherSource | None = None, err_out: torch.Tensor | None = None) -> torch.Tensor:
    """Codes of the flat rotated ``y`` (whole blocks of ``y.numel() // scales.numel()``), packed into
    ``layout``'s words. ``rng`` None: nearest rounding; else stochastic. ``err_out`` (float32, like
    ``y``) receives y - level. C kernel and torch path give the same words and errors."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n = y.numel()
    block = n // scales.numel()
    step, to_unit = _per_block(scales, bits)
    top = (1 << bits) - 1
    lib = native.load() if _native_ok(y, scales, err_out) else None
    if lib is None:
        s = scales.repeat_interleave(block)
        v = y.to(torch.float32)
        t = (torch.maximum(torch.minimum(v, s), -s) + s) * to_unit.repeat_interleave(block)
        t = t + (0.5 if rng is None else rng.uniform(n, y.device))
        codes = t.floor_().clamp_(0, top).to(torch.int64)
        if err_out is not None:
            torch.sub(v, codes.to(torch.float32) * step.repeat_interleave(block) - s, out=err_out)
        return pack_lanes(codes, layout)
    words = torch.empty(layout.words(n), dtype=layout.container)
    lib.hvdgq_quantize_blocks(
        y.data_ptr(), n, block, scales.data_ptr(), to_unit.data_ptr(), step.data_ptr(), bits,
        int(rng is None), 0 if rng is None else rng.key(), layout.lane_bits, layout.lanes_per_word,
        int(layout.container == torch.float64), words.data_ptr(), None if err_out is None else err_out.data_ptr(),
    )
    return words


def dequantize_blocks(words: torch.Tensor, n: int, scales: torch.Tensor, bits: int, layout: LaneLayout,
                      count: int, multiplier: int = 1) -> torch.Tensor:
    """Mean over ``count`` ranks of the levels of the ``n`` rotated elements, from reduced
    ``words`` (float32 (n,)). Float words that are not integers raise."""
    block = n // scales.numel()
    step, _ = _per_block(scales, bits)
    per_code = (step / count).to(torch.float32)
    lib = native.load() if words.device.type == "cpu" and words.is_contiguous() and _native_ok(scales) else None
    if lib is None:
        sums = unpack_lanes(words_to_int64(words, multiplier), layout, n)
        return sums.to(torch.float32) * per_code.repeat_interleave(block) - scales.repeat_interleave(block)
    out = torch.empty(n, dtype=torch.float32)
    status = lib.hvdgq_dequantize_blocks(
        words.data_ptr(), n, int(words.dtype == torch.float64), float(multiplier), layout.lane_bits,
        layout.lanes_per_word, block, per_code.data_ptr(), scales.data_ptr(), out.data_ptr(),
    )
    if status != 0:
        raise ValueError("float lane words are not integers after reduction: the payload was altered")
    return out


def encode_lanes(x: torch.Tensor, scales: torch.Tensor, bits: int, layout: LaneLayout, *, key: int, block: int,
                 addend: torch.Tensor | None = None, rotated: bool = False, rng: DitherSource | None = None,
                 energy: bool = False, resid_out: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Rotated lanes in one pass per block (C kernel): rotate ``x`` (+ ``addend``) with ``key``
    (``rotated``: ``x`` already holds the padded rotated values), quantize every block against
    ``scales`` as ``quantize_blocks``, pack into ``layout``'s words, and write the coding error,
    rotated back, into ``resid_out`` (float32, ``x``'s numel). Returns (words, block energies or
    None), the same words as ``quantize_blocks(rotate(x + addend))``; None without the kernels
    (the caller takes the unfused path)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = x.detach().reshape(-1)
    add = None if addend is None else addend.detach().reshape(-1)
    lib = native.load() if _native_ok(flat, add, resid_out, scales) else None
    if lib is None:
        return None
    n = flat.numel()
    m = n if rotated else rotation_mod.padded(n, block)
    if m != scales.numel() * block or (rotated and (energy or add is not None)):
        raise ValueError("encode_lanes: scales must hold one entry per block; a rotated input takes no addend")
    numel = n if resid_out is None else resid_out.numel()
    step, to_unit = _per_block(scales, bits)
    words = torch.empty(layout.words(m), dtype=layout.container)
    e = torch.empty(m // block, dtype=torch.float64) if energy else None
    status = lib.hvdgq_encode_rotated_lanes(
        flat.data_ptr(), None if add is None else add.data_ptr(), int(rotated), numel if rotated else n, m, block,
        key % (1 << 64), rotation_mod.block_norm(block), scales.data_ptr(), to_unit.data_ptr(), step.data_ptr(),
        bits, int(rng is None), 0 if rng is None else rng.key(), layout.lane_bits, layout.lanes_per_word,
        int(layout.container == torch.float64), words.data_ptr(), None if e is None else e.data_ptr(),
        None if resid_out is None else resid_out.data_ptr())
    if status != 0:
        raise MemoryError("encode_lanes: no memory for a block buffer")
    return words, e


def decode_lanes(words: torch.Tensor, numel: int, scales: torch.Tensor, bits: int, layout: LaneLayout, count: int,
                 multiplier: int, *, key: int, block: int) -> torch.Tensor | None:
    """``unrotate(dequantize_blocks(words, ...))[:numel]`` in one pass per block (C kernel); None
    without the kernels."""
    lib = native.load() if words.device.type == "cpu" and words.is_contiguous() and _native_ok(scales) else None
    if lib is None:
        return None
    m = scales.numel() * block
    step, _ = _per_block(scales, bits)
    per_code = (step / count).to(torch.float32)
    out = torch.empty(numel, dtype=torch.float32)
    status = lib.hvdgq_decode_rotated_lanes(
        words.data_ptr(), m, int(words.dtype == torch.float64), float(multiplier), layout.lane_bits,
        layout.lanes_per_word, block, per_code.data_ptr(), scales.data_ptr(), key % (1 << 64),
        rotation_mod.block_norm(block), out.data_ptr(), numel)
    if status == -1:
        raise ValueError("float lane words are not integers after reduction: the payload was altered")
    if status != 0:
        raise MemoryError("decode_lanes: no memory for a block buffer")
    return out


_BYTE_LANES = LaneLayout(torch.int64, 8, 8)  # one code per byte: the words read as uint8 are the codes


def quantize_blocks_bits(y: torch.Tensor, scales: torch.Tensor, bits: int, *, rng: DitherSource | None = None,
                         err_out: torch.Tensor | None = None) -> torch.Tensor:
    """``quantize_blocks`` with the codes written as a uint8 bit stream of ``bits`` bits per code
    (``bits.bitstream.pack_bits``'s format). C kernel and torch path give the same bytes."""
    n = y.numel()
    block = n // scales.numel()
    lib = native.load() if _native_ok(y, scales, err_out) else None
    if lib is None:
        words = quantize_blocks(y, scales, bits, _BYTE_LANES, rng=rng, err_out=err_out)
        return pack_bits(words.view(torch.uint8)[:n], bits)
    step, to_unit = _per_block(scales, bits)
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8)
    lib.hvdgq_quantize_blocks_bits(y.data_ptr(), n, block, scales.data_ptr(), to_unit.data_ptr(), step.data_ptr(),
                                   bits, int(rng is None), 0 if rng is None else rng.key(), out.data_ptr(),
                                   None if err_out is None else err_out.data_ptr())
    return out


# ---- the gathered form: one rank's self-contained rotated code ------------------------------------


class RotatedCodec(Codec):
    """The rotated code of one rank, for the transports that gather (allgather, two-phase).

    ``encode`` rotates the layer with a fresh key drawn from the rank's stream, quantizes every
    rotation block onto ``2**bits`` levels over [-s_b, s_b], s_b = CLIP[bits] * RMS of the block
    (its own, exact: no shared scale is needed when codes are not summed), and sends the key, the
    clip scale per block (float32) and the codes packed to ``bits`` bits per element; ``decode``
    dequantizes and rotates back. Nearest rounding is biased (the optimizer keeps error feedback
    for it); stochastic rounding is unbiased within the clip. A block of zeros sends scale 0 and
    decodes to exact zeros. Non-finite input decodes to NaN everywhere.

    Args:
        bits: 1..8 bits per element (0: nothing is sent, decodes to zeros).
        rotation: the largest rotation block; a layer of n elements uses ``block_for(n, rotation)``.
        rounding: "nearest" or "stochastic".
    """

    name = "rotated"

    def __init__(self, bits: int, *, rotation: int = 4096, rounding: str = NEAREST) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= 8:
            raise ValueError(f"rotated: bits must be in 0..8 (0 = not sent), got {bits!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rotated: rounding must be one of {ROUNDINGS}, got {rounding!r}")
        rotation_mod.block_for(8, rotation)  # validates the largest block
        super().__init__(bits)
        self.rotation, self.rounding = rotation, rounding
        self._scratch: torch.Tensor | None = None  # encode_compensated's rotated values, reused
        self.unbiased = rounding == STOCHASTIC

    def block(self, numel: int) -> int:
        """The rotation block of a vector of ``numel`` elements."""
        return rotation_mod.block_for(numel, self.rotation)

    def layout(self, numel: int) -> list[tuple[str, torch.dtype, int]]:
        if self.bits == 0:
            return []
        block = self.block(numel)
        m = rotation_mod.padded(numel, block)
        return [("key", torch.int64, 1), ("scales", torch.float32, m // block),
                ("codes", torch.uint8, packed_nbytes(m, self.bits))]

    def encode(self, x: torch.Tensor, rng: DitherSource) -> Encoded:
        return self._encode(x, rng, with_error=False)[0]

    def encode_error(self, x: torch.Tensor, rng: DitherSource) -> tuple[Encoded, torch.Tensor]:
        """``encode(x)`` and ``x - decode(enc)``, from the rounding error the quantizer leaves in
        the rotated domain and one inverse rotation (no decode of its own codes)."""
        return self._encode(x, rng, with_error=True)

    def _encode(self, x: torch.Tensor, rng: DitherSource, with_error: bool) -> tuple[Encoded, torch.Tensor | None]:
        x = flat_float32(x).contiguous()
        n = x.numel()
        if self.bits == 0:
            return Encoded(n, {}), (x.clone() if with_error else None)
        block = self.block(n)
        key = rng.key()
        y, energy = rotation_mod.rotate_energy(x, key, block)
        rms = energy.div_(block).sqrt_().to(torch.float32)
        word = torch.tensor([key - (1 << 64) if key >= 1 << 63 else key], dtype=torch.int64)
        if not bool(torch.isfinite(rms).all()):
            enc = Encoded(n, {"key": word, "scales": torch.full_like(rms, float("nan")),
                              "codes": torch.zeros(packed_nbytes(y.numel(), self.bits), dtype=torch.uint8)})
            return enc, (torch.full_like(x, float("nan")) if with_error else None)
        scales = clip_scales(rms, self.bits)
        # a zero block: any positive scale codes it; scale 0 on the wire decodes it to exact zeros
        zero = scales <= 0
        safe = torch.where(zero, torch.ones_like(scales), scales)
        err = torch.empty_like(y) if with_error else None
        codes = quantize_blocks_bits(y, safe, self.bits, rng=rng if self.unbiased else None, err_out=err)
        enc = Encoded(n, {"key": word, "scales": scales, "codes": codes})
        if err is None:
            return enc, None
        if bool(zero.any()):  # such a block decodes to exact zeros, as it was
            err.view(-1, block)[zero] = 0.0
        return enc, rotation_mod.unrotate_(err, key, block, n)

    def encode_compensated(self, g: torch.Tensor, addend: torch.Tensor, rng: DitherSource,
                           resid_out: torch.Tensor) -> tuple[Encoded | None, bool] | None:
        """``Codec.encode_compensated`` in two passes over memory (the rotation with the addend
        and the block energies into a buffer kept for the layer; then codes, bit stream and the
        error rotated back, per block). None without the C kernels or for other than contiguous
        float32 input (nothing drawn)."""
        flat = g.detach().reshape(-1)
        n = flat.numel()
        lib = native.load()
        if lib is None or self.bits == 0 or n == 0 or not _native_ok(flat, addend, resid_out):
            return None
        block = self.block(n)
        m = rotation_mod.padded(n, block)
        if self._scratch is None or self._scratch.numel() != m:
            self._scratch = torch.empty(m, dtype=torch.float32)
        key = rng.key()
        y, energy = rotation_mod.rotate_energy(flat, key, block, addend, out=self._scratch)
        rms = energy.div_(block).sqrt_().to(torch.float32)
        if not bool(torch.isfinite(rms).all()):
            return None, False
        scales = clip_scales(rms, self.bits)
        safe = torch.where(scales <= 0, torch.ones_like(scales), scales)
        step, to_unit = _per_block(safe, self.bits)
        codes = torch.empty(packed_nbytes(y.numel(), self.bits), dtype=torch.uint8)
        status = lib.hvdgq_encode_rotated_bits(
            y.data_ptr(), y.numel(), block, key, rotation_mod.block_norm(block), safe.data_ptr(), to_unit.data_ptr(),
            step.data_ptr(), scales.data_ptr(), self.bits, int(not self.unbiased),
            rng.key() if self.unbiased else 0, codes.data_ptr(), resid_out.data_ptr(), n)
        if status != 0:
            raise MemoryError("rotated: no memory for a block buffer")
        word = torch.tensor([key - (1 << 64) if key >= 1 << 63 else key], dtype=torch.int64)
        return Encoded(n, {"key": word, "scales": scales, "codes": codes}), True

    def decode_into(self, enc: Encoded, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
        return self.decode(enc, out, accumulate=accumulate)  # one pass per block, added by the kernel

    def decode(self, enc: Encoded, out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
        """The decoded layer, into ``out`` if given (added to it with ``accumulate``)."""
        n = enc.numel
        if self.bits == 0:
            if out is None:
                return torch.zeros(n)
            return out if accumulate else out.zero_()
        block = self.block(n)
        m = rotation_mod.padded(n, block)
        scales = enc.parts["scales"]
        step, _ = _per_block(scales, self.bits)
        key = int(enc.parts["key"].item()) % (1 << 64)
        codes = enc.parts["codes"]
        flat_out = out.view(-1) if out is not None and out.is_contiguous() else None
        lib = native.load() if _native_ok(scales, step, flat_out) and codes.is_contiguous() \
            and (out is None or flat_out is not None) else None
        if lib is not None:
            dst = torch.empty(n, dtype=torch.float32) if flat_out is None else flat_out
            lib.hvdgq_decode_rotated(codes.data_ptr(), m, block, scales.data_ptr(), step.data_ptr(), self.bits, key,
                                     rotation_mod.block_norm(block), dst.data_ptr(), n,
                                     int(accumulate and flat_out is not None))
            return dst if out is None else out
        levels = unpack_bits(codes, self.bits, m).view(-1, block).to(torch.float32)
        y = levels.mul_(step.view(-1, 1)).sub_(scales.view(-1, 1)).view(-1)
        x = rotation_mod.unrotate_(y, key, block, n)
        if out is None:
            return x
        return out.add_(x.view(out.shape)) if accumulate else out.copy_(x.view(out.shape))

    def __repr__(self) -> str:
        return f"RotatedCodec(bits={self.bits}, rotation={self.rotation}, rounding={self.rounding!r})"
