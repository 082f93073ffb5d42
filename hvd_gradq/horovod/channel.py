"""The object channel: rank 0's decisions to every rank (the trigger's verdict each step, a new
codebook, fitted levels), and every rank's state to every rank (checkpoints).

The codebook goes over MPI with mpi4py when Horovod runs on the MPI controller over the world
communicator (``horovodrun --mpi``); under the Gloo controller, or for a process set other than
the global one, it goes with Horovod's ``broadcast_object``. The per-step verdict is one small
Horovod allreduce, so that every rank enters (or skips) the codebook broadcast at the same step
by construction, and every rank learns from it whether all ranks are at the same step. Both are
blocking; a failing rank makes them raise, not hang (Horovod shuts down, MPI aborts the job).
"""
from __future__ import annotations

import io

import horovod.torch as hvd
import torch

_channel: dict = {}


def _world_comm(process_set):
    """mpi4py's COMM_WORLD when it is the communicator Horovod runs on, else None. Decided once
    per process set and remembered: after the last step a peer's exit can make Horovod finalize
    MPI under this rank, and a late MPI query (even ``Get_size``) would then crash it."""
    key = id(process_set)  # elastic runs on Gloo: no mpi4py channel to re-decide after a reset
    if key not in _channel:
        _channel[key] = _find_world_comm(process_set)
    return _channel[key]


def _find_world_comm(process_set):
    if process_set is not hvd.global_process_set and process_set != hvd.global_process_set:
        return None
    if not hvd.mpi_enabled():
        return None
    try:
        from mpi4py import MPI
    except ImportError:  # pragma: no cover - mpi4py is a dependency; stay usable without it
        return None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != hvd.size() or comm.Get_rank() != hvd.rank():
        return None  # Horovod was initialised on another communicator
    return comm


def channel_name(process_set) -> str:
    """Which channel ``broadcast_object`` uses: "mpi4py" or "horovod"."""
    return "mpi4py" if _world_comm(process_set) is not None else "horovod"


def root_rank(process_set) -> int:
    """Global rank of the process set's first member (its rank 0)."""
    ranks = process_set.ranks
    return 0 if not ranks else min(ranks)


def share_decision(fire: bool, step: int, process_set) -> bool:
    """Rank 0's verdict to every rank of ``process_set``, with every rank's step as a cross-check.

    One summed int64 allreduce: [fire and step on the root, 0 elsewhere; 1, step, step**2 on
    every rank]. The steps agree iff k * sum(step**2) == sum(step)**2 (k ranks contributed;
    equality in Cauchy-Schwarz), and every rank reads that from the same sum, so a rank that
    stepped more or fewer times stops every rank at the same step. (A broadcast would tell only
    the ranks that differ from the root, and the root would run on into a step the others never
    join.) Ranks that called ``hvd.join()`` add zeros: they are not counted."""
    root = process_set.rank() == 0
    t = torch.tensor([int(fire) if root else 0, step if root else 0, int(root), 1, step, step * step],
                     dtype=torch.int64)
    fired, root_step, root_in, k, total, squares = hvd.allreduce(
        t, op=hvd.Sum, name="hvd_gradq.trigger", process_set=process_set).tolist()
    if k * squares != total * total:
        there = f"{root_step} on the root" if root_in else "the root has joined"
        raise RuntimeError(
            f"ranks are at different steps ({step} here, {there}, {total / k:g} on average over {k} ranks): "
            "every rank must call optimizer.step() (or synchronize()) the same number of times"
        )
    return bool(fired) and bool(root_in)


def broadcast_object(payload, process_set, root: int | None = None):
    """The ``payload`` (a picklable dict) of global rank ``root`` (default: the process set's first
    member, its rank 0) to every rank of ``process_set``."""
    root = root_rank(process_set) if root is None else root
    comm = _world_comm(process_set)
    if comm is not None:  # the world communicator: its ranks are Horovod's global ranks
        return comm.bcast(payload, root=root)
    return hvd.broadcast_object(payload, root_rank=root, process_set=process_set, name="hvd_gradq.codebook")


def gather_objects(obj, process_set, name: str = "hvd_gradq.state") -> list:
    """Every rank's ``obj`` (picklable; tensors kept), in rank order, on every rank of
    ``process_set`` (for checkpoints: each rank holds its own residuals). Two Horovod allgathers:
    the sizes, then the serialised bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    raw = bytearray(buf.getvalue())  # kept alive: the tensor below borrows its memory
    data = torch.frombuffer(raw, dtype=torch.uint8)
    sizes = hvd.allgather(torch.tensor([data.numel()], dtype=torch.int64), name=f"{name}.sizes",
                          process_set=process_set).tolist()
    blob = hvd.allgather(data, name=f"{name}.bytes", process_set=process_set).numpy().tobytes()
    del data, raw
    out, at = [], 0
    for n in sizes:
        out.append(torch.load(io.BytesIO(blob[at:at + n]), weights_only=False))
        at += n
    return out


class HorovodChannel:
    """The ``exchange.reallocation.Channel`` of one process set: decisions by Horovod broadcast,
    payloads over mpi4py or Horovod (decided once, see ``_world_comm``)."""

    def __init__(self, process_set) -> None:
        self.process_set = process_set

    @property
    def name(self) -> str:
        # asked at the first allocation, not at construction: importing mpi4py initialises MPI in
        # this process, which changes how a rank that fails early takes the job down
        return channel_name(self.process_set)

    def decide(self, fire: bool, step: int) -> bool:
        return share_decision(fire, step, self.process_set)

    def share(self, payload):
        return broadcast_object(payload, self.process_set)

    def gather(self, obj, name: str = "hvd_gradq.gather") -> list:
        return gather_objects(obj, self.process_set, name=name)

    def ranks(self) -> tuple[int, int]:
        return self.process_set.rank(), self.process_set.size()
