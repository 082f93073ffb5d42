"""Horovod collectives that move coded layers: lane allreduce, allgather, two-phase exchange.

Each ``Exchange`` is one layer's communication for one step. It is started from the gradient
hook (so it overlaps the rest of the backward pass), ``advance()`` moves a two-phase exchange to
its second collective, and ``result()`` waits and returns the layer's float32 sum over the ranks
of the process set. Bits are not touched here: the payloads come from ``compressor`` (lanes) and
``layer_coder`` (frames). Every exchange counts the bytes it hands to Horovod (``payload_bytes``),
the figure the cost model predicts.

The collectives themselves come from a ``Collectives`` object: ``HorovodCollectives`` (Horovod's
asynchronous allreduce / allgather / alltoall on one process set) in a real job, or
``hvd_gradq.simulate``'s in-process ranks for the single-process studies, so that both run the
very same exchanges on the very same bytes.

Collective names are ``hvd_gradq.<layer>`` for the first collective of every transport, so ranks
that disagree about a layer's transport meet under one name and Horovod reports the mismatch on
all of them instead of waiting forever.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import horovod.torch as hvd
import torch

from hvd_gradq.cost_model import LinkModel
from hvd_gradq.layer_coder import GatherCoder


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class HorovodCollectives:
    """Horovod's asynchronous collectives on one process set: what the exchanges below call.

    Another implementation (``hvd_gradq.simulate.SimulatedRank``) provides the same methods for N
    ranks held in one process."""

    def __init__(self, process_set=None) -> None:
        self.process_set = hvd.global_process_set if process_set is None else process_set

    def size(self) -> int:
        return self.process_set.size()

    def rank(self) -> int:
        return self.process_set.rank()

    def allreduce_sum_async(self, tensor: torch.Tensor, name: str):
        return hvd.allreduce_async_(tensor, name=name, op=hvd.Sum, process_set=self.process_set)

    def allgather_async(self, tensor: torch.Tensor, name: str):
        return hvd.allgather_async(tensor, name=name, process_set=self.process_set)

    def alltoall_async(self, tensor: torch.Tensor, splits: list[int], name: str):
        """Returns a handle whose ``synchronize`` gives (received tensor, received splits)."""
        return hvd.alltoall_async(tensor, splits=torch.tensor(splits, dtype=torch.int32), name=name,
                                  process_set=self.process_set)

    def synchronize(self, handle):
        return hvd.synchronize(handle)

    def poll(self, handle) -> bool:
        return hvd.poll(handle)

    def barrier(self) -> None:
        hvd.barrier(process_set=self.process_set)


class Exchange:
    """One layer's pending communication."""

    payload_bytes: int = 0
    transport: str = ""

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
    """An allreduce (op=Sum) of a summable payload; ``finish`` decodes the reduced payload."""

    transport = "allreduce"

    def __init__(self, layer: str, payload: torch.Tensor, finish: Callable[[torch.Tensor], torch.Tensor],
                 coll: HorovodCollectives, transport: str = "allreduce") -> None:
        self.transport = transport
        self.payload_bytes = _nbytes(payload)
        self._finish = finish
        self._coll = coll
        self._handle = coll.allreduce_sum_async(payload, f"hvd_gradq.{layer}")

    def result(self) -> torch.Tensor:
        return self._finish(self._coll.synchronize(self._handle))


class Allgather(Exchange):
    """Every rank's frame to every rank; each rank decodes all N frames and sums them."""

    transport = "allgather"

    def __init__(self, layer: str, coder: GatherCoder, grad: torch.Tensor, coll: HorovodCollectives) -> None:
        self._coder = coder
        self._coll = coll
        frame = coder.encode_layer(grad)
        self.payload_bytes = _nbytes(frame)
        self._handle = coll.allgather_async(frame, f"hvd_gradq.{layer}")

    def result(self) -> torch.Tensor:
        return self._coder.sum_frames(self._coll.synchronize(self._handle))


class TwoPhase(Exchange):
    """Alltoall of per-chunk frames; each rank sums and requantizes its chunk; allgather."""

    transport = "two_phase"

    def __init__(self, layer: str, coder: GatherCoder, grad: torch.Tensor, coll: HorovodCollectives) -> None:
        self._coder = coder
        self._layer = layer
        self._coll = coll
        stream, splits = coder.encode_chunks(grad)
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
            frame = self._coder.reduce_own_chunk(received)
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
        return self._coder.assemble(self._coll.synchronize(self._phase2))


class Skip(Exchange):
    """A 0-bit layer: nothing is sent; its sum is taken as zero."""

    transport = "none"

    def __init__(self, numel: int) -> None:
        self._numel = numel

    def result(self) -> torch.Tensor:
        return torch.zeros(self._numel, dtype=torch.float32)


def measure_link(process_set=None, *, small_bytes: int = 8, large_bytes: int = 4 << 20, repeats: int = 5) -> LinkModel:
    """Fit a ``LinkModel`` from timed allreduces over ``process_set`` (all ranks must call it).

    The latency is the median time of a tiny allreduce divided by its 2(N-1) ring steps; the
    bandwidth comes from a ``large_bytes`` allreduce after subtracting that latency. Every rank
    gets rank 0's figures, so all ranks choose the same transports.
    """
    ps = hvd.global_process_set if process_set is None else process_set
    n = ps.size()
    if n < 2:
        return LinkModel()

    def timed(nbytes: int) -> float:
        t = torch.zeros(max(1, nbytes // 4), dtype=torch.float32)
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            hvd.allreduce_(t, name=f"hvd_gradq.measure_link.{nbytes}.{i}", op=hvd.Sum, process_set=ps)
            times.append(time.perf_counter() - start)
        return sorted(times[1:])[len(times[1:]) // 2]

    steps = 2 * (n - 1)
    small, large = timed(small_bytes), timed(large_bytes)
    latency = small / steps
    moved = 2 * (n - 1) / n * large_bytes
    bandwidth = moved / max(large - steps * latency, 1e-9)
    figures = hvd.broadcast(torch.tensor([latency, bandwidth], dtype=torch.float64), root_rank=0,
                            name="hvd_gradq.measure_link.result", process_set=ps)
    return LinkModel(latency_s=float(figures[0]), bandwidth=float(figures[1]))
