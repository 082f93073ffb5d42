"""The randomized Hadamard transform (RHT), blockwise: a random rotation that makes a vector's
coordinates near-Gaussian whatever the vector, so that one scale per block fits every element.

For a layer of n elements, padded with zeros to a multiple of ``block`` (a power of two):
    rotate(x)   = norm * H(D x)        unrotate(y) = D (norm * H(y)),      norm = 1/sqrt(block),
H the Walsh-Hadamard butterfly within each block and D a diagonal of random signs drawn from a
64-bit key (bit i % 64 of SplitMix64(key, i // 64); set = -1). H is symmetric with H H = block * I,
so both maps are orthonormal and each other's inverse; energy is kept within every block.

The map is linear: when every rank rotates with the same key, the sum of the ranks' rotated
vectors is the rotation of their sum, so rotated codes stay summable (lanes) and one inverse
rotation after the reduction gives the aggregate. The C kernel (``csrc/hadamard.c``) and the torch
path here run the same float32 operations in the same order, and give the same bits.
"""
from __future__ import annotations

import math
import zlib

import torch

from hvd_gradq.bits import native
from hvd_gradq.bits.dither import splitmix64

#: the largest rotation block (elements); blocks beyond it add butterfly stages for little gain
MAX_BLOCK = 1 << 16


def block_for(numel: int, largest: int) -> int:
    """The rotation block of a layer of ``numel`` elements: the power of two in 8..``largest``
    that minimises the padded length weighted by one statistic word per block,
    ``padded(numel, b) * (1 + 16 / b)`` (ties: the larger block)."""
    if largest < 8 or largest & (largest - 1):
        raise ValueError(f"the rotation block must be a power of two >= 8, got {largest}")
    if largest > MAX_BLOCK:
        raise ValueError(f"the rotation block must be a power of two <= {MAX_BLOCK}, got {largest}")
    best, best_cost = 8, None
    b = 8
    while b <= largest:
        cost = padded(max(numel, 1), b) * (b + 16) / b
        if best_cost is None or cost <= best_cost:
            best, best_cost = b, cost
        b *= 2
    return best


def key_for(seed: int, name: str) -> int:
    """The rotation key of layer ``name`` under ``seed`` (the same on every rank that shares them)."""
    word = splitmix64(seed % (1 << 64), torch.tensor([zlib.crc32(name.encode())], dtype=torch.int64))
    return int(word.item()) % (1 << 64)


def step_key(key: int, step: int) -> int:
    """The key of one reduction (``step``: the layer's reduction count, the same on every rank): a
    fresh rotation each step, so no coordinate stays large, and clipped, step after step."""
    return int(splitmix64(key % (1 << 64), torch.tensor([step], dtype=torch.int64)).item()) % (1 << 64)


def padded(numel: int, block: int) -> int:
    """Elements of the rotated vector: ``numel`` rounded up to whole blocks."""
    return -(-numel // block) * block


def block_norm(block: int) -> float:
    """1/sqrt(block) rounded to float32, the factor every transform applies after its butterflies."""
    return float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32))



def signs(key: int, n: int) -> torch.Tensor:
    """The ``n`` signs (float32, +1 or -1) of key ``key``."""
    words = splitmix64(key, torch.arange((n + 63) // 64, dtype=torch.int64))
    bits = (words.view(-1, 1) >> torch.arange(64, dtype=torch.int64)) & 1  # bit j of each word
    return (1.0 - 2.0 * bits.view(-1)[:n].to(torch.float32)).contiguous()


def _butterflies(y: torch.Tensor, block: int) -> torch.Tensor:
    blocks = y.view(-1, block)
    h = 1
    while h < block:
        v = blocks.view(blocks.shape[0], block // (2 * h), 2, h)
        a, c = v[:, :, 0, :], v[:, :, 1, :]
        blocks = torch.stack([a + c, a - c], dim=2).view(-1, block)
        h *= 2
    return blocks.reshape(-1).mul_(block_norm(block))


def _native_ok(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()


def rotate(x: torch.Tensor, key: int, block: int, addend: torch.Tensor | None = None) -> torch.Tensor:
    """The rotated copy of ``x`` (+ ``addend``, same numel) (any shape; flattened, float32,
    zero-padded to whole blocks)."""
    return rotate_energy(x, key, block, addend, energy=False)[0]


def rotate_energy(x: torch.Tensor, key: int, block: int, addend: torch.Tensor | None = None, *,
                  energy: bool = True, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rotate(x, key, block, addend)`` and, with ``energy``, each block's sum of squares
    (float64), taken by the C kernel in the same pass (its summation order differs from torch's
    by float64 rounding only). ``out``: a float32 buffer of the padded length to write into."""
    n = x.numel()
    m = padded(n, block)
    flat = x.detach().reshape(-1)
    add = None if addend is None else addend.detach().reshape(-1)
    if out is not None and (out.numel() != m or not _native_ok(out)):
        raise ValueError(f"out must be a contiguous float32 tensor of {m} elements")
    lib = native.load() if _native_ok(flat) and (add is None or _native_ok(add)) else None
    if lib is not None:
        y = torch.empty(m, dtype=torch.float32) if out is None else out
        e = torch.empty(m // block, dtype=torch.float64) if energy else None
        lib.hvdgq_rotate_into(flat.data_ptr(), None if add is None else add.data_ptr(), n, y.data_ptr(), m, block,
                              key % (1 << 64), block_norm(block), None if e is None else e.data_ptr())
        return y, e
    y = torch.zeros(m, dtype=torch.float32, device=x.device)
    y[:n] = flat if add is None else flat.to(torch.float32) + add.to(torch.float32)
    y.mul_(signs(key, y.numel()).to(y.device))
    y = _butterflies(y, block)
    if out is not None:
        y = out.copy_(y)
    return y, (y.view(-1, block).to(torch.float64).pow(2).sum(dim=1) if energy else None)


def unrotate(y: torch.Tensor, key: int, block: int, numel: int) -> torch.Tensor:
    """The first ``numel`` elements of the inverse rotation of ``y`` (flat, whole blocks)."""
    return unrotate_(y.detach().to(torch.float32).contiguous().clone(), key, block, numel)


def unrotate_(y: torch.Tensor, key: int, block: int, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``unrotate`` that overwrites ``y`` (flat contiguous float32, whole blocks) and writes the
    result into ``out`` (``numel`` float32 elements; None: a view of ``y``); returns it."""
    if y.numel() % block:
        raise ValueError(f"a rotated vector has whole blocks of {block}, got {y.numel()} elements")
    if out is not None and (out.numel() != numel or not _native_ok(out)):
        raise ValueError(f"out must be a contiguous float32 tensor of {numel} elements")
    lib = native.load() if _native_ok(y) else None
    if lib is not None:
        dst = y if out is None else out
        lib.hvdgq_unrotate_into(y.data_ptr(), y.numel(), block, key % (1 << 64), block_norm(block), dst.data_ptr(),
                                numel)
        return y[:numel] if out is None else out
    z = _butterflies(y, block).mul_(signs(key, y.numel()).to(y.device))[:numel]
    return z if out is None else out.copy_(z)
