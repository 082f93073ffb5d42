"""Frames: the header of payloads that are gathered rather than summed.

Allgather and alltoall deliver every rank's bytes unchanged, so each frame carries its header
verbatim: four int32 words [magic | flags, codebook version, layer digest, body bytes] followed
by the codec's byte stream. Every rank sends the same header to every receiver, so all receivers
see the same set of headers and reach the same verdict.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hvd_gradq.wire.header import CodebookMismatchError

FRAME_HEADER_BYTES = 16
_FRAME_MAGIC = 0x47510000  # "GQ" in the high half; flags in the low half
_FLAG_NONFINITE = 1


@dataclass(frozen=True)
class FrameHeader:
    version: int  # codebook version of the sender
    digest: int  # the sender's codebook digest of this layer
    nonfinite: bool  # the sender's input had NaN/Inf
    body_bytes: int


def frame(body: torch.Tensor, *, version: int, digest: int, nonfinite: bool) -> torch.Tensor:
    """``body`` (uint8) behind a frame header, as one uint8 tensor."""
    if body.dtype != torch.uint8 or body.dim() != 1:
        raise ValueError(f"a frame body is a 1-D uint8 tensor, got {body.dtype}{tuple(body.shape)}")
    words = torch.tensor(
        [_FRAME_MAGIC | (_FLAG_NONFINITE if nonfinite else 0), version, digest, body.numel()], dtype=torch.int32
    )
    return torch.cat([words.view(torch.uint8), body])


def parse_frames(buf: torch.Tensor, count: int, *, layer: str) -> list[tuple[FrameHeader, torch.Tensor]]:
    """Split ``count`` consecutive frames out of ``buf`` (uint8); raise CodebookMismatchError if the
    bytes are not ``count`` well-formed frames."""
    out, offset = [], 0
    n = buf.numel()
    for i in range(count):
        if offset + FRAME_HEADER_BYTES > n:
            raise CodebookMismatchError(
                f"layer {layer!r}: received {n} bytes, too few for {count} frames (frame {i} is cut short); "
                "ranks did not exchange the same layers"
            )
        words = buf[offset:offset + FRAME_HEADER_BYTES].clone().view(torch.int32)
        magic, version, digest, body = (int(v) for v in words)
        if magic & 0xFFFF0000 != _FRAME_MAGIC or body < 0 or offset + FRAME_HEADER_BYTES + body > n:
            raise CodebookMismatchError(
                f"layer {layer!r}: frame {i} of {count} is not an hvd_gradq frame; ranks exchanged different "
                "things under this layer's name (different codebooks or transports)"
            )
        start = offset + FRAME_HEADER_BYTES
        out.append((FrameHeader(version, digest, bool(magic & _FLAG_NONFINITE), body), buf[start:start + body]))
        offset = start + body
    if offset != n:
        raise CodebookMismatchError(f"layer {layer!r}: {n - offset} bytes follow the last of {count} frames")
    return out


def check_frames(headers: list[FrameHeader], *, layer: str, what: str) -> bool:
    """Check that all senders used the same codebook version and layer digest; return True if any
    sender's input was non-finite. ``headers[i]`` came from rank i."""
    versions = [h.version for h in headers]
    if len(set(versions)) > 1:
        raise CodebookMismatchError(
            f"layer {layer!r}: ranks are at different codebook versions {versions} (index = rank). Every "
            f"rank must apply each new codebook at the same step; restore the same compression state on "
            f"every rank. ({what})"
        )
    digests = [h.digest for h in headers]
    if len(set(digests)) > 1:
        raise CodebookMismatchError(
            f"layer {layer!r}: ranks coded this layer with different codebooks (bits, codec, levels, "
            f"transport, op or number of ranks differ; digests {digests}, index = rank). Build "
            f"{what} with the same arguments on every rank."
        )
    return any(h.nonfinite for h in headers)
