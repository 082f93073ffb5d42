"""The summed header: what every rank adds so that all ranks can check, from the reduced payload
alone, that the reduction was the one the codec needs, how many ranks contributed, and that every
rank used the same codebook.

Every payload starts with these words (in the payload's own dtype), summed by the allreduce:

  0  count      1 on every rank          -> k after Sum (k = ranks that contributed), k/N after Average
  1  is_root    1 on rank 0, else 0
  2  nonfinite  1 if the local input had NaN/Inf, else 0
  3  tag        T = N(N+1)/2 on rank 0, r on rank r >= 1
  4  -tag       the negated tag
  5.. digest    per chunk c of the layer's 20-bit codebook digest: c and c*c. All contributing ranks
                hold the same chunk iff k * sum(c*c) == sum(c)**2 (equality in Cauchy-Schwarz).
  -1 stat       a statistic for the next shared scale (its meaning is the codec's)

Ranks that called ``hvd.join()`` contribute zeros (Horovod's rule for allreduce under join), so
k < N is a join, and Horovod's Average still divides by N. The tag pair tells a genuine sum over
some k ranks from every other reduction: after a sum, tag + (-tag) is 0 and the tag is is_root * T
plus a sum of k - is_root distinct ranks >= 1; Min and Max pick the two words from different
ranks, Product and the integer truncation of Average (op=hvd.Average on an int64 payload; Horovod
issue #2054) leave a tag no sum of ranks can give. At N = 1 every op is the identity, and the
header only tells that the payload came back unchanged.

Every check reads only the reduced words, which are identical on all contributing ranks, so they
reach the same verdict at the same step: a mismatch raises on all of them instead of hanging some.
Pure tensor code: the caller passes rank and size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hvd_gradq.codebook import DIGEST_BITS

SUM = "sum"
AVERAGE = "average"

# bits whose integer sums a container reproduces exactly, also after Average's multiply by 1/N
_EXACT_BITS = {torch.float32: 22, torch.float64: 48, torch.int64: 62}


class ReductionMismatchError(RuntimeError):
    """The allreduce did not apply the reduction op the compressor was built for."""

    #: how many ranks contributed to the payload that showed it (None: not known)
    ranks: int | None = None


class CodebookMismatchError(RuntimeError):
    """Ranks compressed a layer with different codebooks (bits, scale, layout or version)."""

    #: how many ranks contributed to the payload that showed it (None: not known)
    ranks: int | None = None


def _digest_chunk_bits(container: torch.dtype, size: int) -> int:
    # N * (2**c - 1)**2 must stay exact in the container
    c = (_EXACT_BITS[container] - math.ceil(math.log2(size + 1))) // 2
    return max(1, min(DIGEST_BITS, c))


def _digest_chunks(digest: int, container: torch.dtype, size: int) -> list[int]:
    c = _digest_chunk_bits(container, size)
    mask = (1 << c) - 1
    return [(digest >> s) & mask for s in range(0, DIGEST_BITS, c)]


_FIXED_WORDS = 5  # count, is_root, nonfinite, tag, -tag


def header_len(container: torch.dtype, size: int) -> int:
    """Number of header words for this container and world size."""
    return _FIXED_WORDS + 1 + 2 * len(_digest_chunks(0, container, size))


def _root_tag(size: int) -> int:
    # larger than any sum of distinct ranks 1..N-1 (N(N-1)/2), and than N - 1 after Average's /N
    return size * (size + 1) // 2


def header_words(
    *, rank: int, size: int, digest: int, nonfinite: bool, stat: float, container: torch.dtype
) -> torch.Tensor:
    """This rank's header words, as a 1-D tensor of ``container`` dtype."""
    tag = _root_tag(size) if rank == 0 else rank
    words: list[float] = [1, 1 if rank == 0 else 0, 1 if nonfinite else 0, tag, -tag]
    for c in _digest_chunks(digest, container, size):
        words += [c, c * c]
    words.append(stat)
    return torch.tensor(words, dtype=container)


@dataclass(frozen=True)
class ReducedHeader:
    multiplier: int  # turns the reduced words into sums: 1 after Sum, N after Average
    ranks: int  # ranks that contributed (N, or fewer when some called hvd.join())
    nonfinite: bool  # some contributing rank had NaN/Inf in its input
    stat_sum: float  # sum over the contributing ranks of the per-rank statistic


def _as_int(v: float) -> int | None:
    r = round(v)
    return r if abs(v - r) <= 0.25 + 1e-6 * abs(v) else None


def contributors(words: list[float], size: int, multiplier: int) -> int | None:
    """How many ranks a genuine sum (times ``multiplier``) of ``header`` words came from, or None
    if the words are not such a sum (another op, a truncated average, scaling)."""
    count, root, tag, neg = (_as_int(w * multiplier) for w in words[:2] + words[3:5])
    if None in (count, root, tag, neg) or not 1 <= count <= size or root not in (0, 1) or tag + neg != 0:
        return None
    m = count - root  # contributing ranks other than rank 0; their tags are distinct values in 1..N-1
    rest = tag - root * _root_tag(size)
    if not 0 <= m <= size - 1 or not m * (m + 1) // 2 <= rest <= m * (2 * size - 1 - m) // 2:
        return None
    return count


def read_header(
    reduced: torch.Tensor, *, size: int, op: str, layer: str, compressor: str
) -> ReducedHeader:
    """Check the reduced header words of one layer; raise the same error on every rank if wrong."""
    h = reduced.to(torch.float64).tolist()
    m = 1 if op == SUM else size
    ranks = contributors(h, size, m)
    if ranks is None:
        other_m = size if op == SUM else 1
        seen_ranks = contributors(h, size, other_m) if size > 1 else None
        seen = None if seen_ranks is None else (AVERAGE if op == SUM else SUM)
        what = {SUM: "summed", AVERAGE: "averaged"}.get(
            seen, "reduced by another op (for an integer payload, op=hvd.Average truncates it; or "
            "Min/Max/Product/Adasum, or pre/postscale factors)"
        )
        want, other = ("Sum", "Average") if op == SUM else ("Average", "Sum")
        err = ReductionMismatchError(
            f"layer {layer!r}: {compressor} was built with op=hvd.{want}, but Horovod's allreduce "
            f"{what} its payload across {size} ranks. Pass the same op to both: "
            f"hvd.DistributedOptimizer(..., op=hvd.{want}) with {compressor}(..., op=hvd.{want}), "
            f"or op=hvd.{other} in both places."
        )
        err.ranks = seen_ranks
        raise err
    ints = [round(v * m) for v in h[_FIXED_WORDS:-1]]
    for s1, s2 in zip(ints[0::2], ints[1::2]):
        if ranks * s2 != s1 * s1:
            err = CodebookMismatchError(
                f"layer {layer!r}: ranks compressed this layer with different codebooks "
                f"(bits, scale, layout or version differ between ranks). Construct {compressor} "
                "with the same arguments on every rank and restore the same compression state "
                "on every rank; after hvd.join(), call sync_codebook(root_rank=<the rank hvd.join() "
                "returned>) on every rank before the next step."
            )
            err.ranks = ranks
            raise err
    return ReducedHeader(multiplier=m, ranks=ranks, nonfinite=round(h[2] * m) > 0, stat_sum=h[-1] * m)
