"""The collectives the exchanges run on, behind one small protocol: Horovod's asynchronous
allreduce / allgather / alltoall on one process set in a job (``horovod.collectives``), or the
in-process world below for N ranks held in one process (``simulate``), so that both run the very
same exchanges on the very same bytes.

``SimulatedWorld`` delivers what N ranks submit, byte for byte as Horovod would: the sum of the
lane words (in rank order), the concatenation for allgather, the split routing of alltoall.
"""
from __future__ import annotations

from typing import Protocol

import torch

from hvd_gradq import checks


class Collectives(Protocol):
    """What an exchange needs of the ranks it runs on (``size`` ranks, this one ``rank``)."""

    def size(self) -> int: ...

    def rank(self) -> int: ...

    def allreduce_sum_async(self, tensor: torch.Tensor, name: str):
        """The sum over the ranks, written into ``tensor`` itself (in place, as Horovod's
        ``allreduce_async_``): a caller that still needs its own values must hand over a copy."""

    def allgather_async(self, tensor: torch.Tensor, name: str): ...

    def alltoall_async(self, tensor: torch.Tensor, splits: list[int], name: str):
        """A handle whose ``synchronize`` gives (received tensor, received splits)."""

    def synchronize(self, handle): ...

    def poll(self, handle) -> bool: ...

    def barrier(self) -> None: ...


class _Collective:
    """One named collective of one step: what each rank submitted, and who has read the result."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind, self.name = kind, name
        self.inputs: dict[int, tuple[torch.Tensor, list[int] | None]] = {}
        self.read: set[int] = set()
        self.total: torch.Tensor | None = None  # an allreduce's sum, formed at the first read


class SimulatedWorld:
    """The collectives of ``size`` ranks held in one process. A result can be read once every rank
    has submitted; the entry is dropped when every rank has read it, so names repeat per step."""

    def __init__(self, size: int) -> None:
        checks.integer(size, "the number of simulated workers", low=1)
        self.size = size
        self._ops: dict[str, _Collective] = {}

    def rank(self, r: int) -> SimulatedRank:
        return SimulatedRank(self, r)

    def submit(self, kind: str, name: str, rank: int, tensor: torch.Tensor, splits: list[int] | None = None):
        op = self._ops.setdefault(name, _Collective(kind, name))
        if op.kind != kind:  # as Horovod: ranks calling different collectives under one name is an error
            raise RuntimeError(f"collective {name!r}: rank {rank} called {kind}, another rank {op.kind}")
        if rank in op.inputs:
            raise RuntimeError(f"collective {name!r}: rank {rank} submitted twice before every rank had read it")
        op.inputs[rank] = (tensor, splits)
        return name, rank

    def ready(self, handle) -> bool:
        return len(self._ops[handle[0]].inputs) == self.size

    def result(self, handle):
        name, rank = handle
        op = self._ops[name]
        if len(op.inputs) != self.size:
            missing = sorted(set(range(self.size)) - set(op.inputs))
            raise RuntimeError(f"collective {name!r}: rank {rank} reads it before ranks {missing} submitted; in a "
                               "simulation every worker must run its backward before the step")
        if op.kind == "allreduce":  # summed in rank order, into each rank's own tensor (in place, as Horovod)
            if op.total is None:
                op.total = op.inputs[0][0].clone()
                for r in range(1, self.size):
                    op.total += op.inputs[r][0]
            out = op.inputs[rank][0].copy_(op.total)
        elif op.kind == "allgather":
            out = torch.cat([op.inputs[r][0] for r in range(self.size)])
        else:  # alltoall: rank j receives piece j of every rank's tensor, in rank order
            pieces = [torch.split(t, s) for t, s in (op.inputs[r] for r in range(self.size))]
            got = [pieces[i][rank] for i in range(self.size)]
            out = (torch.cat(got), torch.tensor([g.numel() for g in got], dtype=torch.int32))
        op.read.add(rank)
        if len(op.read) == self.size:
            del self._ops[name]
        return out

    def pending(self) -> list[str]:
        return sorted(self._ops)


class SimulatedRank:
    """Rank ``r`` of a ``SimulatedWorld``: the ``Collectives`` of one simulated rank."""

    process_set = None

    def __init__(self, world: SimulatedWorld, rank: int) -> None:
        if not 0 <= rank < world.size:
            raise ValueError(f"rank must be in [0, {world.size}), got {rank}")
        self.world, self._rank = world, rank

    def size(self) -> int:
        return self.world.size

    def rank(self) -> int:
        return self._rank

    def allreduce_sum_async(self, tensor: torch.Tensor, name: str):
        return self.world.submit("allreduce", name, self._rank, tensor)

    def allgather_async(self, tensor: torch.Tensor, name: str):
        return self.world.submit("allgather", name, self._rank, tensor)

    def alltoall_async(self, tensor: torch.Tensor, splits: list[int], name: str):
        return self.world.submit("alltoall", name, self._rank, tensor, list(splits))

    def synchronize(self, handle):
        return self.world.result(handle)

    def poll(self, handle) -> bool:
        return self.world.ready(handle)

    def barrier(self) -> None:
        """Every simulated rank is in this process: nothing to wait for."""
