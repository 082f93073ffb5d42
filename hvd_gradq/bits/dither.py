"""The random source for stochastic rounding.

Stochastic rounding needs one uniform draw per element, which makes the generator the most
expensive part of a naive quantizer (``torch.rand`` on one CPU thread: ~0.13 GB/s of float32
output here). We use a counter-based generator instead: for each call, one 64-bit key is drawn
from numpy's SFC64 stream (seeded per rank from (seed, rank), so ranks draw independent noise),
and element i takes 16 bits of SplitMix64(key + (i // 4 + 1) * golden) (the 64-bit finaliser of
Steele, Lea & Flood, 2014, whose outputs pass TestU01 BigCrush; 4 elements per 64-bit output).
Counter-based means the C kernels compute the dither inline, element by element, with no buffer
and no extra pass, and the torch path (``counter_uniform``) reproduces it bit for bit.

16-bit dither: u = (k + 1/2) / 2**16 with k uniform in 0..65535, so P(round up) = p is realised
up to 2**-17: a bias of at most 2**-17 of one level step per element, far below the rounding
noise itself (a standard deviation up to 1/2 step). Tensors on other devices use torch's
generator.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DITHER_BITS = 16
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(v: int) -> int:
    """A 64-bit pattern as the int64 torch stores it."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64(key: int, counters: torch.Tensor) -> torch.Tensor:
    """SplitMix64 outputs (int64 bit patterns) for ``counters`` (int64) under ``key``."""
    z = counters.add(1).mul_(_signed(_GOLDEN)).add_(_signed(key % (1 << 64)))  # wraps mod 2**64
    z = (z ^ _shr(z, 30)).mul_(_signed(_MIX1))
    z = (z ^ _shr(z, 27)).mul_(_signed(_MIX2))
    return z ^ _shr(z, 31)


def counter_uniform(key: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``n`` float32 dithers in (0, 1) that the C kernels draw for ``key`` (torch path)."""
    words = splitmix64(key, torch.arange((n + 3) // 4, dtype=torch.int64, device=device))
    parts = torch.stack([_shr(words, 16 * j) & 0xFFFF for j in range(4)], dim=1).view(-1)[:n]
    return parts.to(torch.float32).add_(0.5).mul_(1.0 / 65536.0)


class DitherSource:
    """Uniform dither in (0, 1) at 16-bit resolution, reproducible from ``seed``."""

    def __init__(self, seed: int | Sequence[int] = 0) -> None:
        self._seed = seed
        self._np = np.random.Generator(np.random.SFC64(np.random.SeedSequence(seed)))
        self._torch: dict[torch.device, torch.Generator] = {}

    def key(self) -> int:
        """A fresh 64-bit key for one call's counter-based dither (advances the stream)."""
        return int(self._np.bit_generator.random_raw())

    def uniform(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``n`` float32 draws in (0, 1): on CPU, ``counter_uniform(self.key(), n)``."""
        device = torch.device(device)
        if device.type != "cpu":
            gen = self._torch.get(device)
            if gen is None:
                gen = torch.Generator(device=device)
                gen.manual_seed(int(np.random.SeedSequence(self._seed).generate_state(1)[0]))
                self._torch[device] = gen
            return torch.rand(n, generator=gen, device=device)
        return counter_uniform(self.key(), n)

    def state_dict(self) -> dict:
        return {"seed": self._seed, "numpy": self._np.bit_generator.state,
                "torch": {str(d): g.get_state() for d, g in self._torch.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._seed = state["seed"]
        self._np.bit_generator.state = state["numpy"]
        self._torch = {}
        for dev, st in state["torch"].items():
            g = torch.Generator(device=dev)
            g.set_state(st)
            self._torch[torch.device(dev)] = g
