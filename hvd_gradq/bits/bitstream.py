"""Bit streams: ``bits``-bit codes <-> a uint8 stream exactly as long as the bits it carries (the
form allgather, alltoall and broadcast move; they accept uint8). Pure tensor code."""
from __future__ import annotations

import torch


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits occupy in a byte stream."""
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (n,) with values below ``2**bits`` into a uint8 stream of ``packed_nbytes(n, bits)``.

    Every group of 8 codes becomes ``bits`` bytes (code i at bit offset bits*i, little-endian), so
    the stream is exactly as long as the bits it carries, for every width 1..8.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n = codes.numel()
    if bits == 8:
        return codes.reshape(-1).to(torch.uint8)
    groups = -(-n // 8)
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=codes.device)
    padded[:n] = codes.reshape(-1)
    cols = padded.view(groups, 8)
    word = cols[:, 0].clone()
    for i in range(1, 8):  # 8 vectorised steps over all groups, not a loop over elements
        word |= cols[:, i] << (bits * i)
    out = torch.empty(groups, bits, dtype=torch.uint8, device=codes.device)
    for j in range(bits):
        out[:, j] = (word >> (8 * j)) & 0xFF
    return out.view(-1)[: packed_nbytes(n, bits)]


def unpack_bits(stream: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``n`` codes (uint8) from a uint8 ``stream``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if stream.numel() != packed_nbytes(n, bits):
        raise ValueError(f"a stream of {n} {bits}-bit codes has {packed_nbytes(n, bits)} bytes, got {stream.numel()}")
    if bits == 8:
        return stream.clone()
    groups = -(-n // 8)
    padded = torch.zeros(groups * bits, dtype=torch.int64, device=stream.device)
    padded[: stream.numel()] = stream
    rows = padded.view(groups, bits)
    word = rows[:, 0].clone()
    for j in range(1, bits):
        word |= rows[:, j] << (8 * j)
    mask = (1 << bits) - 1
    out = torch.empty(groups, 8, dtype=torch.uint8, device=stream.device)
    for i in range(8):
        out[:, i] = (word >> (bits * i)) & mask
    return out.view(-1)[:n]
