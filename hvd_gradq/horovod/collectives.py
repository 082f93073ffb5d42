"""Horovod's collectives for the exchange engine, and a measured link model.

``HorovodCollectives`` is the ``exchange.collectives.Collectives`` of one Horovod process set;
``measure_link`` times allreduces on it and fits the cost model's latency and bandwidth.
"""
from __future__ import annotations

import time

import horovod.torch as hvd
import torch

from hvd_gradq.plan.cost_model import LinkModel


class HorovodCollectives:
    """Horovod's asynchronous collectives on one process set (``exchange.collectives.Collectives``)."""

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
