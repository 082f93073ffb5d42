"""The payload header: what every rank adds so that all ranks can check, from the reduced payload
alone, that the reduction was the one the codec needs and that every rank used the same codebook.

Every payload starts with these words (in the payload's own dtype), summed by the allreduce:

  0  count      1 on every rank          -> N after Sum, 1 after Average
  1  is_root    1 on rank 0, else 0      -> 1 after Sum, 1/N after Average (tells Min/Max/Product apart)
  2  nonfinite  1 if the local input had NaN/Inf, else 0
  3.. digest    per chunk c of the layer's 20-bit codebook digest: c and c*c. All ranks hold the
                same chunk iff N * sum(c*c) == sum(c)**2 (equality in Cauchy-Schwarz).
  -1 stat       a statistic for the next shared scale (its meaning is the codec's)

Every check reads only the reduced words, which are identical on all ranks, so every rank reaches
the same verdict at the same step: a mismatch raises on all ranks instead of hanging some of them.
Pure tensor code: the caller passes rank and size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUM = "sum"
AVERAGE = "average"
DIGEST_BITS = 20

# bits whose integer sums a container reproduces exactly, also after Average's multiply by 1/N
_EXACT_BITS = {torch.float32: 22, torch.float64: 48, torch.int64: 62}


class ReductionMismatchError(RuntimeError):
    """The allreduce did not apply the reduction op the compressor was built for."""


class CodebookMismatchError(RuntimeError):
    """Ranks compressed a layer with different codebooks (bits, scale, layout or version)."""


def _digest_chunk_bits(container: torch.dtype, size: int) -> int:
    # N * (2**c - 1)**2 must stay exact in the container
    c = (_EXACT_BITS[container] - math.ceil(math.log2(size + 1))) // 2
    return max(1, min(DIGEST_BITS, c))


def _digest_chunks(digest: int, container: torch.dtype, size: int) -> list[int]:
    c = _digest_chunk_bits(container, size)
    mask = (1 << c) - 1
    return [(digest >> s) & mask for s in range(0, DIGEST_BITS, c)]


def header_len(container: torch.dtype, size: int) -> int:
    """Number of header words for this container and world size."""
    return 4 + 2 * len(_digest_chunks(0, container, size))


def header(
    *, rank: int, size: int, digest: int, nonfinite: bool, stat: float, container: torch.dtype
) -> torch.Tensor:
    """This rank's header words, as a 1-D tensor of ``container`` dtype."""
    words: list[float] = [1, 1 if rank == 0 else 0, 1 if nonfinite else 0]
    for c in _digest_chunks(digest, container, size):
        words += [c, c * c]
    words.append(stat)
    return torch.tensor(words, dtype=container)


@dataclass(frozen=True)
class ReducedHeader:
    multiplier: int  # turns the reduced words into sums: 1 after Sum, N after Average
    nonfinite: bool  # some rank had NaN/Inf in its input
    stat_sum: float  # sum over ranks of the per-rank statistic


def _observed_op(count: float, is_root: float, size: int) -> str | None:
    if math.isclose(count, size, rel_tol=1e-3) and math.isclose(is_root, 1.0, rel_tol=1e-3):
        return SUM
    if math.isclose(count, 1.0, rel_tol=1e-3) and math.isclose(is_root, 1.0 / size, rel_tol=1e-3):
        return AVERAGE
    return None


def read_header(
    reduced: torch.Tensor, *, size: int, op: str, layer: str, compressor: str
) -> ReducedHeader:
    """Check the reduced header words of one layer; raise the same error on every rank if wrong."""
    h = reduced.to(torch.float64).tolist()
    seen = _observed_op(h[0], h[1], size)
    if seen != op:
        what = {SUM: "summed", AVERAGE: "averaged"}.get(
            seen, "reduced by another op (for an integer payload, op=hvd.Average truncates it; or "
            "Min/Max/Product/Adasum, or pre/postscale factors)"
        )
        want, other = ("Sum", "Average") if op == SUM else ("Average", "Sum")
        raise ReductionMismatchError(
            f"layer {layer!r}: {compressor} was built with op=hvd.{want}, but Horovod's allreduce "
            f"{what} its payload across {size} ranks. Pass the same op to both: "
            f"hvd.DistributedOptimizer(..., op=hvd.{want}) with {compressor}(..., op=hvd.{want}), "
            f"or op=hvd.{other} in both places."
        )
    m = 1 if op == SUM else size
    ints = [round(v * m) for v in h[3:-1]]
    for s1, s2 in zip(ints[0::2], ints[1::2]):
        if size * s2 != s1 * s1:
            raise CodebookMismatchError(
                f"layer {layer!r}: ranks compressed this layer with different codebooks "
                f"(bits, scale, layout or version differ between ranks). Construct {compressor} "
                "with the same arguments on every rank and restore the same compression state "
                "on every rank."
            )
    return ReducedHeader(multiplier=m, nonfinite=round(h[2] * m) > 0, stat_sum=h[-1] * m)


# ---- frames: the header of payloads that are gathered rather than summed ---------------------------
#
# Allgather and alltoall deliver every rank's bytes unchanged, so each frame carries its header
# verbatim: four int32 words [magic | flags, codebook version, layer digest, body bytes] followed
# by the codec's byte stream. Every rank sends the same header to every receiver, so all receivers
# see the same set of headers and reach the same verdict.

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
