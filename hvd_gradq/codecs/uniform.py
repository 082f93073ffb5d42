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


def step_size(scale: float, bits: int) -> float:
    """Spacing ``delta`` between adjacent levels for ``bits``-bit codes over [-scale, scale]."""
    return 2.0 * scale / ((1 << bits) - 1)


def quantize_stochastic(
    x: torch.Tensor, scale: float, bits: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Codes (int64, same shape as ``x``) in ``0 .. 2**bits - 1`` for float ``x``.

    ``scale`` must be positive and finite; ``bits`` in 1..8.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if not (scale > 0.0 and scale < float("inf")):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    top = (1 << bits) - 1
    t = (x.to(torch.float32).clamp(-scale, scale) + scale).mul_(top / (2.0 * scale))
    t.add_(torch.rand(t.shape, generator=generator, device=t.device, dtype=t.dtype))
    # t + u can round up to top + 1 only through float error at the very top; clamp guards it
    return t.floor_().clamp_(0, top).to(torch.int64)


def dequantize(codes: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """Float32 levels for one rank's ``codes``."""
    return codes.to(torch.float32).mul_(step_size(scale, bits)).sub_(scale)


def dequantize_sum(code_sum: torch.Tensor, scale: float, bits: int, count: int) -> torch.Tensor:
    """Mean over ``count`` ranks of the levels, given the elementwise sum of their codes."""
    return code_sum.to(torch.float32).mul_(step_size(scale, bits) / count).sub_(scale)
