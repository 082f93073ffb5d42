"""Top-k sparsification (Deep Gradient Compression, Lin et al., 2018): send the k entries of largest
|g| as float32 values with their int32 indices, 8 bytes per kept element; the rest decode to 0.

k is a pure function of the layer size n and the target ``ratio`` against float32: the largest
count whose payload 8k fits 4 n / ratio bytes (k = floor(floor(4 n / ratio) / 8), n / 40 at
ratio 20), but at least 1 for n >= 1, so a layer too small for the budget still sends its largest
entry (8 bytes, above the budget). A fixed k gives a static ``layout`` and an exact
``payload_bytes``: no header travels. Selection is deterministic (no dither); the kept indices go
on the wire in ascending order. NaN/Inf anywhere in the input make every decoded value NaN (the
values part is sent as NaN), so an AMP GradScaler still sees the overflow. Unsent entries are
dropped: use with ``ErrorFeedback``.
"""
from __future__ import annotations

import torch

from hvd_gradq import checks
from hvd_gradq.bits.dither import DitherSource
from hvd_gradq.codecs.base import Codec, Encoded, flat_float32

BYTES_PER_KEPT = 4 + 4  # float32 value + int32 index
_MAX_NUMEL = 2**31 - 1  # indices travel as int32


class TopKCodec(Codec):
    """DGC top-k of |g| at a target compression ``ratio`` against float32 (indices included)."""

    name = "topk"
    unbiased = False  # unsent entries decode to zero: error feedback keeps them

    def __init__(self, ratio: float) -> None:
        checks.number(ratio, "topk: ratio", above=1, hint=" (e.g. 20 or 1000)")
        # bits describes the width of what travels per kept element's value: float32 (nonzero, so
        # no check reads it as "sends nothing")
        super().__init__(bits=32)
        self.ratio = float(ratio)

    # ---- budget -------------------------------------------------------------------------------
    def target_bytes(self, numel: int) -> int:
        """The byte budget of a layer of ``numel`` elements: float32 size / ratio, rounded down."""
        return int(4 * numel / self.ratio)

    def keep_count(self, numel: int) -> int:
        """k: the most elements whose values and indices fit ``target_bytes``, at least 1 if numel >= 1."""
        checks.integer(numel, "topk: numel", 0, _MAX_NUMEL, hint=" (int32 indices)")
        if numel == 0:
            return 0
        return min(numel, max(1, self.target_bytes(numel) // BYTES_PER_KEPT))

    def layout(self, numel: int) -> list[tuple[str, torch.dtype, int]]:
        k = self.keep_count(numel)
        return [("values", torch.float32, k), ("indices", torch.int32, k)]

    # ---- encode / decode ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, rng: DitherSource | None = None) -> Encoded:
        """The k largest-magnitude entries of ``x``; ``rng`` is unused (the selection is deterministic)."""
        x = flat_float32(x)
        n = x.numel()
        k = self.keep_count(n)
        if not bool(torch.isfinite(x).all()):  # includes fp64 values beyond float32's range
            return Encoded(n, {"values": torch.full((k,), float("nan"), device=x.device),
                               "indices": torch.arange(k, dtype=torch.int32, device=x.device)})
        if k == n:
            idx = torch.arange(n, device=x.device)
        else:
            idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values  # ascending: a canonical stream
        return Encoded(n, {"values": x[idx].contiguous(), "indices": idx.to(torch.int32)})

    def decode(self, enc: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 (numel,): zeros with the kept values at their indices (into ``out`` if given)."""
        n = enc.numel
        values, indices = enc.parts["values"], enc.parts["indices"]
        if out is None:
            out = torch.zeros(n, dtype=torch.float32, device=values.device)
        elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != n:
            raise ValueError(f"out must be a contiguous float32 tensor of {n} elements")
        else:
            out.zero_()
        flat = out.view(-1)
        if not bool(torch.isfinite(values).all()):
            return flat.fill_(float("nan"))
        flat[indices.long()] = values.to(torch.float32)
        return flat
