"""The codec interface: ``encode`` a layer into named tensors, ``decode`` them back, and know the
exact payload size. Codecs are pure tensor math (no Horovod, no MPI).

An ``Encoded`` holds the parts that travel (e.g. per-bucket norms and packed codes) in the order
of ``Codec.layout(numel)``; ``to_bytes`` lays them out as one uint8 stream, the form allgather and
alltoall move, and ``payload_bytes`` is computed from the same layout, so the accounting is exact.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from hvd_gradq.bits.dither import DitherSource


@dataclass
class Encoded:
    """One rank's encoding of one layer of ``numel`` elements."""

    numel: int
    parts: dict[str, torch.Tensor]


def flat_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous 1-D float32 tensor (any shape, 0-d, non-contiguous, fp16/bf16/fp64)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"codecs encode floating-point tensors, got {x.dtype}")
    return x.detach().reshape(-1).to(torch.float32)


class Codec(ABC):
    """A lossy encoding of a float tensor at a fixed bit width."""

    #: registry name, e.g. "qsgd"
    name: str = ""
    #: E[decode(encode(x))] == x
    unbiased: bool = True

    def __init__(self, bits: int) -> None:
        self.bits = bits

    @abstractmethod
    def layout(self, numel: int) -> list[tuple[str, torch.dtype, int]]:
        """(part name, dtype, element count) of every part, in wire order, for ``numel`` inputs."""

    @abstractmethod
    def encode(self, x: torch.Tensor, rng: DitherSource) -> Encoded:
        """Encode ``x`` (any float dtype and shape)."""

    @abstractmethod
    def decode(self, enc: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 (numel,) values from ``enc`` (into ``out`` if given)."""

    # ---- shared machinery ---------------------------------------------------------------------
    def payload_bytes(self, numel: int) -> int:
        """Exact bytes of ``to_bytes(encode(x))`` for a layer of ``numel`` elements."""
        return sum(count * torch.empty((), dtype=dt).element_size() for _, dt, count in self.layout(numel))

    def to_bytes(self, enc: Encoded) -> torch.Tensor:
        """The parts of ``enc`` as one uint8 stream (wire order)."""
        chunks = []
        for key, dtype, count in self.layout(enc.numel):
            t = enc.parts[key]
            if t.dtype != dtype or t.numel() != count:
                raise ValueError(f"{self.name}: part {key!r} is {t.dtype}[{t.numel()}], layout says {dtype}[{count}]")
            chunks.append(t.contiguous().view(-1).view(torch.uint8))
        if not chunks:
            return torch.zeros(0, dtype=torch.uint8)
        return torch.cat(chunks)

    def from_bytes(self, stream: torch.Tensor, numel: int) -> Encoded:
        """Parse a uint8 stream made by ``to_bytes`` for a layer of ``numel`` elements."""
        if stream.dtype != torch.uint8 or stream.numel() != self.payload_bytes(numel):
            raise ValueError(
                f"{self.name}: expected {self.payload_bytes(numel)} uint8 bytes for {numel} elements, "
                f"got {stream.dtype}[{stream.numel()}]"
            )
        parts, offset = {}, 0
        for key, dtype, count in self.layout(numel):
            nbytes = count * torch.empty((), dtype=dtype).element_size()
            parts[key] = stream[offset:offset + nbytes].clone().view(dtype)
            offset += nbytes
        return Encoded(numel, parts)

    def encode_error(self, x: torch.Tensor, rng: DitherSource) -> tuple[Encoded, torch.Tensor]:
        """``encode(x)`` and its coding error ``x - decode(enc)`` (float32, flat): what error
        feedback keeps. Codecs that have the error at hand while coding override it."""
        enc = self.encode(x, rng)
        return enc, flat_float32(x) - self.decode(enc)

    def encode_compensated(self, g: torch.Tensor, addend: torch.Tensor, rng: DitherSource,
                           resid_out: torch.Tensor) -> tuple[Encoded | None, bool] | None:
        """``encode(g + addend)`` without materialising the sum, its coding error written into
        ``resid_out``: (encoded, True), or (None, False) when g + addend is not finite
        (``resid_out`` then unspecified). None (here): the codec has no such path, nothing was
        drawn from ``rng``; the caller adds and calls ``encode_error``."""
        return None

    def decode_into(self, enc: Encoded, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
        """Decode ``enc`` into ``out`` (contiguous float32, numel elements), or add it to ``out``."""
        if accumulate:
            return out.add_(self.decode(enc).view(out.shape))
        return self.decode(enc, out)

    def roundtrip(self, x: torch.Tensor, rng: DitherSource) -> torch.Tensor:
        """decode(encode(x)) in ``x``'s shape and dtype; integer tensors pass through untouched."""
        if not x.dtype.is_floating_point:
            return x
        return self.decode(self.encode(x, rng)).view(x.shape).to(x.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, bits={self.bits})"
