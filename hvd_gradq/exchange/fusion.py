"""The low-rank layers of a step in one bucket: every layer's P (with its summed header) in one
allreduce, then every layer's Q in one, as PowerSGD does per DDP bucket: two collectives per step
instead of two per layer, so a step pays the ring's latency twice, not 2 x layers times (which is
what dominates at N = 4 on a slow link: the factors are small).

The bucket's members are the layers planned low-rank, in plan order (the same on every rank); it
starts its first allreduce when the last of them joins, i.e. after the backward pass has produced
every low-rank gradient. Each member is an ``Exchange`` whose ``result()`` is its own decoded
aggregate; its ``payload_bytes`` are its own P and Q, as if it had travelled alone. The fused
collectives are named after the first member (``hvd_gradq.<layer>``). Ranks whose factors differ
in rank or dtype never get here: the engine's first step compares the codebooks (``agreement``).
"""
from __future__ import annotations

import torch

from hvd_gradq.exchange.collectives import Collectives
from hvd_gradq.exchange.exchanges import Decode, Exchange


class LowRankBucket:
    """One step's low-rank layers (``names``, plan order) sharing two allreduces."""

    def __init__(self, names: list[str], coll: Collectives) -> None:
        self.names = list(names)
        self._coll = coll
        self._members: dict[str, tuple[torch.Tensor, Decode, Decode]] = {}
        self._phase1 = self._phase2 = None
        self._sizes: list[int] = []
        self._second: dict[str, torch.Tensor] = {}
        self._decoded: set[str] = set()
        self.error: Exception | None = None

    def takes(self, name: str) -> bool:
        """Whether ``name`` can join this bucket (a member not yet in, and nothing failed)."""
        return self.error is None and name in self.names and name not in self._members

    @property
    def done(self) -> bool:
        return len(self._decoded) == len(self.names)

    @property
    def waiting(self) -> bool:
        """True while the fused Q allreduce is still to be started."""
        return self.error is None and self._phase2 is None

    def join(self, name: str, first: torch.Tensor, encode: Decode, decode: Decode) -> BucketMember:
        """Add a member's first payload; the last one to join starts the fused allreduce."""
        self._members[name] = (first, encode, decode)
        self.excuse(())
        return BucketMember(self, name, first.numel() * first.element_size())

    def excuse(self, names) -> None:
        """Layers that will not join this step on any rank (the stock path: Horovod reduced their
        sparse gradients itself); the fused allreduce starts if every other member is in."""
        self.names = [n for n in self.names if n not in set(names) or n in self._members]
        if self._phase1 is None and self._members and len(self._members) == len(self.names):
            payload = torch.cat([self._members[n][0] for n in self.names])
            self._phase1 = self._coll.allreduce_sum_async(payload, f"hvd_gradq.{self.names[0]}")

    def advance(self) -> None:
        """Wait for the fused P's, let every member make its Q, start the fused Q allreduce."""
        if self.error is not None:
            raise self.error
        if self._phase2 is not None:
            return
        if self._phase1 is None:
            missing = [n for n in self.names if n not in self._members]
            raise RuntimeError(f"the low-rank bucket was advanced before layers {missing} joined it (every rank "
                               "must launch every low-rank layer of the step first)")
        try:
            summed = self._coll.synchronize(self._phase1)
            firsts = [self._members[n][0].numel() for n in self.names]
            seconds = [self._members[n][1](part) for n, part in zip(self.names, torch.split(summed, firsts))]
        except Exception as e:  # kept: every member reports the same error
            self.error = e
            raise
        if len({s.dtype for s in seconds}) > 1:
            self.error = RuntimeError(f"low-rank bucket: the layers' Q differ in dtype ({[s.dtype for s in seconds]})")
            raise self.error
        self._sizes = [s.numel() for s in seconds]
        self._second_bytes = {n: s.numel() * s.element_size() for n, s in zip(self.names, seconds)}
        self._phase2 = self._coll.allreduce_sum_async(torch.cat(seconds), f"hvd_gradq.{self.names[0]}.phase2")

    def ready_to_advance(self) -> bool:
        return self.waiting and self._phase1 is not None and self._coll.poll(self._phase1)

    def result(self, name: str) -> tuple[torch.Tensor, int]:
        """Member ``name``'s decoded aggregate and the bytes of its Q."""
        self.advance()
        if not self._second:
            try:
                summed = self._coll.synchronize(self._phase2)
            except Exception as e:
                self.error = e
                raise
            self._second = dict(zip(self.names, torch.split(summed, self._sizes)))
        out = self._members[name][2](self._second[name])
        self._decoded.add(name)
        return out, self._second_bytes[name]


class BucketMember(Exchange):
    """One layer's share of a ``LowRankBucket``."""

    transport = "lowrank"

    def __init__(self, bucket: LowRankBucket, name: str, first_bytes: int) -> None:
        self._bucket, self._name = bucket, name
        self.payload_bytes = first_bytes

    def advance(self) -> None:
        self._bucket.advance()

    def advance_if_ready(self) -> None:
        if self._bucket.ready_to_advance():
            self._bucket.advance()

    @property
    def waiting(self) -> bool:
        return self._bucket.waiting

    def result(self) -> torch.Tensor:
        out, second_bytes = self._bucket.result(self._name)
        self.payload_bytes += second_bytes
        return out
