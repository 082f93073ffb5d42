"""Uniform stochastic b-bit quantization against a shared scale (QSGD family, max-norm scaled).

A value x in [-s, s] maps to one of 2**b evenly spaced levels
    level(k) = -s + k * delta,   delta = 2s / (2**b - 1),   k in {0, ..., 2**b - 1},
by stochastic rounding: k = floor((x + s) / delta + u) with u ~ U[0, 1). Then E[level(k)] = x
(unbiased) and |level(k) - x| < delta. Values outside [-s, s] are clipped first; the clipped
part is what error feedback carries to the next step.

Because every rank quantizes against the same scale s (from the shared codebook), codes are
summable: the mean over N ranks of the decoded values is  -s + delta * (sum of codes) / N.
"""
from __future__ import annotations

import torch

from hvd_gradq.bits import native
from hvd_gradq.bits.dither import DitherSource
from hvd_gradq.bits.lanes import LaneLayout, pack_lanes, unpack_lanes, words_to_int64


def step_size(scale: float, bits: int) -> float:
    """Spacing ``delta`` between adjacent levels for ``bits``-bit codes over [-scale, scale]."""
    return 2.0 * scale / ((1 << bits) - 1)


def _check(scale: float, bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if not (scale > 0.0 and scale < float("inf")):
        raise ValueError(f"scale must be positive and finite, got {scale}")


def quantize_stochastic(x: torch.Tensor, scale: float, bits: int, rng: DitherSource) -> torch.Tensor:
    """Codes (int64, same shape as ``x``) in ``0 .. 2**bits - 1`` for float ``x`` (torch path).

    ``scale`` must be positive and finite; ``bits`` in 1..8.
    """
    _check(scale, bits)
    top = (1 << bits) - 1
    t = (x.to(torch.float32).clamp(-scale, scale) + scale).mul_(top / (2.0 * scale))
    t.add_(rng.uniform(t.numel(), t.device).view(t.shape))
    # t + u can round up to top + 1 only through float error at the very top; clamp guards it
    return t.floor_().clamp_(0, top).to(torch.int64)


def dequantize(codes: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """Float32 levels for one rank's ``codes``."""
    return codes.to(torch.float32).mul_(step_size(scale, bits)).sub_(scale)


def dequantize_sum(code_sum: torch.Tensor, scale: float, bits: int, count: int) -> torch.Tensor:
    """Mean over ``count`` ranks of the levels, given the elementwise sum of their codes."""
    return code_sum.to(torch.float32).mul_(step_size(scale, bits) / count).sub_(scale)


def _native_ok(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())
               for t in tensors)


def abs_max(x: torch.Tensor, addend: torch.Tensor | None = None) -> float:
    """max |x + addend| over flat float32 tensors (NaN if any element is NaN, inf if infinite);
    0.0 for empty input. One pass without a temporary on CPU."""
    if x.numel() == 0:
        return 0.0
    lib = native.load() if _native_ok(x, addend) else None
    if lib is not None:
        return float(lib.hvdgq_abs_max(x.data_ptr(), None if addend is None else addend.data_ptr(), x.numel()))
    v = x if addend is None else x + addend
    if bool(torch.isnan(v).any()):
        return float("nan")
    return float(v.abs().max())


def quantize_to_lanes(
    x: torch.Tensor, scale: float, bits: int, layout: LaneLayout, rng: DitherSource,
    residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize v = x + residual (flat float32; v = x without ``residual``) and pack the codes into
    ``layout``'s words, in one pass on CPU.

    Error feedback: ``residual_out`` (float32, like ``x``; may be ``residual`` itself) receives
    ``v - level`` (at 1 bit only the clipping error ``v - clamp(v, -scale, scale)``: its rounding
    error feedback would be unstable). The C kernel and the torch path give identical words and
    residuals for the same ``rng`` state.
    """
    _check(scale, bits)
    if bits == 1 and residual_out is not None:
        # One bit: a level step is 2s, so feeding the rounding error back would let max|x + r|, and
        # with it the shared scale, grow geometrically (measured: 1e37 after 260 steps of a CNN).
        # Keep only what clipping to [-s, s] cut; the rounding itself is unbiased.
        v = x.to(torch.float32) if residual is None else x + residual
        words = quantize_to_lanes(x, scale, bits, layout, rng, residual=residual)
        torch.sub(v, v.clamp(-scale, scale), out=residual_out)
        return words
    n = x.numel()
    lib = native.load() if _native_ok(x, residual, residual_out) else None
    if lib is None:
        v = x.to(torch.float32) if residual is None else x + residual
        codes = quantize_stochastic(v, scale, bits, rng)
        if residual_out is not None:
            torch.sub(v, dequantize(codes, scale, bits), out=residual_out)
        return pack_lanes(codes, layout)
    top = (1 << bits) - 1
    words = torch.empty(layout.words(n), dtype=layout.container)

    def ptr(t: torch.Tensor | None):
        return None if t is None else t.data_ptr()

    lib.hvdgq_quantize_lanes(
        x.data_ptr(), n, scale, top / (2.0 * scale), step_size(scale, bits), bits, rng.key(),
        layout.lane_bits, layout.lanes_per_word, int(layout.container == torch.float64), words.data_ptr(),
        ptr(residual), ptr(residual_out),
    )
    return words


def dequantize_lanes(
    words: torch.Tensor, n: int, scale: float, bits: int, layout: LaneLayout, count: int, multiplier: int = 1
) -> torch.Tensor:
    """Mean over ``count`` ranks of the levels, from reduced lane ``words`` (float32 (n,)).

    ``multiplier`` turns the reduced words into sums (N after ``op=Average``). Float words that
    are not integers raise: the payload was not what ``quantize_to_lanes`` packed.
    """
    lib = native.load() if words.device.type == "cpu" and words.is_contiguous() else None
    if lib is None:
        return dequantize_sum(unpack_lanes(words_to_int64(words, multiplier), layout, n), scale, bits, count)
    out = torch.empty(n, dtype=torch.float32)
    status = lib.hvdgq_dequantize_lanes(
        words.data_ptr(), n, int(words.dtype == torch.float64), float(multiplier), layout.lane_bits,
        layout.lanes_per_word, step_size(scale, bits) / count, scale, out.data_ptr(),
    )
    if status != 0:
        raise ValueError("float lane words are not integers after reduction: the payload was altered")
    return out
