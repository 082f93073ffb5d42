"""One layer's communication for one step: lane allreduce, two dependent allreduces, allgather,
two-phase exchange, skip.

An exchange moves bytes only. The engine codes the gradient before it starts one (``payload``,
``frame``, ``stream``) and passes the decode steps as callbacks, which the exchange calls on the
bytes it received; the exchange never sees a gradient or a coder. It is started from the gradient
hook (so it overlaps the rest of the backward pass); ``advance()`` moves a two-phase exchange to
its second collective; ``result()`` waits and returns what the last callback made of the bytes.
``payload_bytes`` counts what was handed to the collectives, the figure the cost model predicts.

Collective names are ``hvd_gradq.<layer>`` (``.phase2`` for a second collective). Ranks that
disagree about a layer's transport would run different collectives (Horovod 0.28.1 does not
reject an allgather and an alltoall under one name): the engine's first step compares the ranks'
codebooks before anything waits (``agreement``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from hvd_gradq.exchange.collectives import Collectives

Decode = Callable[[torch.Tensor], torch.Tensor]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Exchange:
    """One layer's pending communication."""

    payload_bytes: int = 0
    transport: str = ""
    #: the caller sums this exchange's one payload itself (``LaneAllreduce``)
    carried: bool = False

    def advance(self) -> None:
        """Start the next phase if there is one (a no-op for one-collective transports)."""

    def advance_if_ready(self) -> None:
        """``advance()`` if that would not wait (called from later gradient hooks, for overlap)."""

    @property
    def waiting(self) -> bool:
        """True while a later phase is still to be started."""
        return False

    def result(self) -> torch.Tensor:
        raise NotImplementedError


class LaneAllreduce(Exchange):
    """An allreduce (op=Sum) of a summable payload; ``decode`` turns the reduced payload into the
    layer's aggregate.

    ``carried``: the caller runs the allreduce itself (the stock path hands ``payload`` to
    Horovod's optimizer, which sums it under its own name) and hands the sum to ``deliver``; the
    exchange then only decodes."""

    def __init__(self, layer: str, payload: torch.Tensor, decode: Decode, coll: Collectives,
                 transport: str = "allreduce", carried: bool = False) -> None:
        self.transport = transport
        self.payload_bytes = _nbytes(payload)
        self._decode = decode
        self._coll = coll
        self.carried = carried
        #: what the caller must sum (``carried`` only)
        self.payload = payload if carried else None
        self._handle = None if carried else coll.allreduce_sum_async(payload, f"hvd_gradq.{layer}")
        self._delivered: torch.Tensor | None = None

    def deliver(self, summed: torch.Tensor) -> None:
        """The sum over the ranks of a carried payload."""
        self._delivered = summed

    def result(self) -> torch.Tensor:
        if not self.carried:
            return self._decode(self._coll.synchronize(self._handle))
        if self._delivered is None:
            raise RuntimeError("a carried lane allreduce was read before its sum was delivered")
        return self._decode(self._delivered)


class TwoAllreduces(Exchange):
    """Two dependent allreduces (op=Sum): a first payload (the rotated lanes' block statistics),
    then the payload that ``encode`` makes from its sum (the lane codes); ``decode`` turns the
    second sum into the layer's aggregate. (Low-rank layers share theirs: ``fusion``.)"""

    transport = "allreduce"

    def __init__(self, layer: str, stats: torch.Tensor, encode: Decode, decode: Decode, coll: Collectives) -> None:
        self._layer = layer
        self._encode, self._decode = encode, decode
        self._coll = coll
        self.payload_bytes = _nbytes(stats)
        self._phase1 = coll.allreduce_sum_async(stats, f"hvd_gradq.{layer}")
        self._phase2 = None
        self._error: Exception | None = None

    def advance(self) -> None:
        if self._error is not None:
            raise self._error
        if self._phase2 is not None:
            return
        try:
            payload = self._encode(self._coll.synchronize(self._phase1))
        except Exception as e:  # kept: every later call reports the same error
            self._error = e
            raise
        self.payload_bytes += _nbytes(payload)
        self._phase2 = self._coll.allreduce_sum_async(payload, f"hvd_gradq.{self._layer}.phase2")

    def advance_if_ready(self) -> None:
        if self.waiting and self._coll.poll(self._phase1):
            self.advance()

    @property
    def waiting(self) -> bool:
        return self._phase2 is None and self._error is None

    def result(self) -> torch.Tensor:
        self.advance()
        return self._decode(self._coll.synchronize(self._phase2))


class Allgather(Exchange):
    """Every rank's frame to every rank; ``decode`` sums the N gathered frames."""

    transport = "allgather"

    def __init__(self, layer: str, frame: torch.Tensor, decode: Decode, coll: Collectives) -> None:
        self._decode = decode
        self._coll = coll
        self.payload_bytes = _nbytes(frame)
        self._handle = coll.allgather_async(frame, f"hvd_gradq.{layer}")

    def result(self) -> torch.Tensor:
        return self._decode(self._coll.synchronize(self._handle))


class TwoPhase(Exchange):
    """Alltoall of per-chunk frames (``splits[j]`` bytes of ``stream`` go to rank j); ``reduce``
    makes this rank's chunk frame from the frames received (sum, requantize); allgather of those;
    ``assemble`` decodes the whole layer from the gathered chunk frames."""

    transport = "two_phase"

    def __init__(self, layer: str, stream: torch.Tensor, splits: list[int], reduce: Decode, assemble: Decode,
                 coll: Collectives) -> None:
        self._layer = layer
        self._reduce, self._assemble = reduce, assemble
        self._coll = coll
        self.payload_bytes = _nbytes(stream)
        self._phase1 = coll.alltoall_async(stream, splits, f"hvd_gradq.{layer}")
        self._phase2 = None
        self._error: Exception | None = None

    def advance(self) -> None:
        if self._error is not None:
            raise self._error
        if self._phase2 is not None:
            return
        try:
            received, _splits = self._coll.synchronize(self._phase1)
            frame = self._reduce(received)
        except Exception as e:  # kept: every later call reports the same error
            self._error = e
            raise
        self.payload_bytes += _nbytes(frame)
        self._phase2 = self._coll.allgather_async(frame, f"hvd_gradq.{self._layer}.phase2")

    def advance_if_ready(self) -> None:
        if self.waiting and self._coll.poll(self._phase1):
            self.advance()

    @property
    def waiting(self) -> bool:
        return self._phase2 is None and self._error is None

    def result(self) -> torch.Tensor:
        self.advance()
        return self._assemble(self._coll.synchronize(self._phase2))


class Skip(Exchange):
    """A 0-bit layer: nothing is sent; its sum is taken as zero."""

    transport = "none"

    def __init__(self, numel: int) -> None:
        self._numel = numel

    def result(self) -> torch.Tensor:
        return torch.zeros(self._numel, dtype=torch.float32)
