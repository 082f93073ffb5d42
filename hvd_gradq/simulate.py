"""N data-parallel workers simulated in one process, coded exactly as in a Horovod job.

Training-quality studies need many runs, and on a small machine N real processes mostly measure
contention. As in the evaluation of the ALQ paper (Sec. 5: "we simulate data-parallel training
with N workers"), ``SimulatedWorkers`` splits every batch into N micro-batches, computes each one's
gradient on the same model, and hands rank r's gradients to rank r's ``GradientExchange`` - the
very class ``hvd_gradq.DistributedOptimizer`` runs on every rank of a job (codecs, error feedback,
frames, lanes, codebook, transports, the rank-0 allocator). Only the collectives differ:
``SimulatedWorld`` delivers what N ranks submit, byte for byte as Horovod would (sum of the lane
words, concatenation for allgather, the split routing of alltoall), so a simulated step gives the
aggregate of a real ``horovodrun -np N`` step from the same weights and data (tests/test_simulate.py
checks this against a real job).

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sim = hvd_gradq.SimulatedWorkers(opt, model.named_parameters(), workers=4, codec="uniform", bits=2)
    for x, y in batches:
        sim.zero_grad()
        for xr, yr in zip(x.chunk(4), y.chunk(4)):   # worker r's micro-batch
            sim.backward(F.cross_entropy(model(xr), yr))
        sim.step()                                     # mean over workers of the decoded gradients

Differences from a real job, by construction: the workers share one model, so layers with running
statistics (BatchNorm) update them once per micro-batch, and dropout draws different masks per
worker from one generator (a real job seeded alike draws the same masks on every rank). One
process: Horovod is imported for its constants, never initialised; no MPI.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import horovod.torch as hvd  # the op constant and the glue's imports; hvd.init() is never called
import torch

from hvd_gradq import checkpoint
from hvd_gradq.alloc import AllocationEvent, Allocator
from hvd_gradq.cost_model import LinkModel
from hvd_gradq.optimizer import (
    GradientExchange,
    allocation_overhead,
    apply_bits,
    check_coding,
    check_refit,
    coding_config,
    decide_bits,
    rank_state,
)
from hvd_gradq.trigger import Trigger


class _Collective:
    """One named collective of one step: what each rank submitted, and who has read the result."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind, self.name = kind, name
        self.inputs: dict[int, tuple[torch.Tensor, list[int] | None]] = {}
        self.read: set[int] = set()


class SimulatedWorld:
    """The collectives of ``size`` ranks held in one process. A result can be read once every rank
    has submitted; the entry is dropped when every rank has read it, so names repeat per step."""

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"the number of simulated workers must be an integer >= 1, got {size!r}")
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
        if op.kind == "allreduce":  # summed in rank order
            out = op.inputs[0][0].clone()
            for r in range(1, self.size):
                out += op.inputs[r][0]
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
    """Rank ``r`` of a ``SimulatedWorld``, with the methods of ``transport.HorovodCollectives``."""

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


class SimulatedWorkers:
    """``workers`` data-parallel workers in one process, each with its own ``GradientExchange``.

    Takes the coding arguments of ``hvd_gradq.DistributedOptimizer`` (``codec``, ``bits``,
    ``ratio``, ``bucket_size``, ``transport``, ``link``, ``min_elements``, ``error_feedback``,
    ``seed``, ``allocator``, ``trigger``, ``refit_levels``); ``codec=None`` averages the float32 gradients exactly
    (the uncompressed baseline). The aggregate is the mean over workers (``op=hvd.Average``).

    Per step: ``zero_grad()``, then ``backward(loss)`` once per worker, in rank order (worker r's
    loss on its micro-batch), then ``step()`` (or ``synchronize()`` to edit the gradients before
    ``step()``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, torch.Tensor]],
                 workers: int, *, codec: str | None = "qsgd", bits: int | Mapping[str, int] = 4,
                 ratio: float | None = None, bucket_size: int = 1024, transport: str | Mapping[str, str] = "auto",
                 link: LinkModel | None = None, min_elements: int = 1024, error_feedback: bool | str = "auto",
                 seed: int = 0, allocator: Allocator | None = None, trigger: Trigger | None = None,
                 refit_levels: int | None = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.world = SimulatedWorld(workers)
        named = list(named_parameters)
        if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in named):
            raise ValueError("named_parameters must be (name, parameter) pairs, e.g. model.named_parameters()")
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self._named = [(n, p) for n, p in named if id(p) in in_optimizer and p.requires_grad]
        if not self._named:
            raise ValueError("no trainable parameter of named_parameters is in the optimizer")
        if link is not None and not isinstance(link, LinkModel):
            raise ValueError(f"link must be a hvd_gradq.LinkModel or None (nothing to measure here), got {link!r}")
        self.optimizer = optimizer
        self.workers = workers
        self.codec = codec
        if codec is None:
            if allocator is not None or trigger is not None:
                raise ValueError("codec=None sends float32: there are no bits to allocate")
            self.trigger = None
            self.exchanges = []
        else:
            self.trigger = check_coding(codec=codec, ratio=ratio, error_feedback=error_feedback,
                                        bucket_size=bucket_size, min_elements=min_elements, allocator=allocator,
                                        trigger=trigger)
            refit_levels = check_refit(refit_levels, codec)
            self.exchanges = [
                GradientExchange(self._named, op=hvd.Average, collectives=self.world.rank(r), codec=codec, bits=bits,
                                 ratio=ratio, bucket_size=bucket_size, transport=transport,
                                 link=link if link is not None else LinkModel(), min_elements=min_elements,
                                 error_feedback=error_feedback, seed=seed, refit_levels=refit_levels)
                for r in range(workers)]
        self.allocator = allocator
        #: every codebook switch: step, version, summary, cost (as ``DistributedOptimizer``)
        self.allocation_events: list[AllocationEvent] = []
        self.steps = 0
        self._alloc_seconds = 0.0
        self._started: float | None = None
        self._rank = 0  # the worker whose backward runs next
        self._pending: list[dict[torch.Tensor, object]] = [{} for _ in range(workers)]
        self._synchronized = False
        self._in_backward = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook) for _, p in self._named]
        self._names = {p: n for n, p in self._named}

    # ---- one step ----------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        if self._rank:
            raise RuntimeError(f"zero_grad() after {self._rank} of {self.workers} workers' backward(): call step() "
                               "first")
        self.optimizer.zero_grad(set_to_none=True)

    def _hook(self, p: torch.Tensor) -> None:
        if self._in_backward:  # other backward passes on the model (e.g. an evaluation) are not a worker's
            self._launch(p, p.grad)

    def _launch(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        pending = self._pending[self._rank]
        if p in pending:
            raise RuntimeError(f"worker {self._rank}: gradient of {self._names[p]!r} computed twice in one step; "
                               "call backward() once per worker")
        if self.codec is None:
            pending[p] = grad.detach().to(torch.float32).clone()
        else:  # the exchange encodes (and copies) at launch, so the gradient may be cleared after
            pending[p] = self.exchanges[self._rank].launch(self._names[p], grad)

    def backward(self, loss: torch.Tensor) -> None:
        """Worker r's backward pass (r = 0, 1, ... in call order): its gradients go to its exchange."""
        if self._rank >= self.workers:
            raise RuntimeError(f"backward() ran more than workers={self.workers} times before step()")
        if self._synchronized:
            raise RuntimeError("backward() after synchronize(): call step() first")
        for _, p in self._named:
            p.grad = None
        self._in_backward = True
        try:
            loss.backward()
        finally:
            self._in_backward = False
        for _, p in self._named:  # layers this worker did not use: zeros, as a real rank sends
            if p not in self._pending[self._rank]:
                self._launch(p, torch.zeros_like(p))
            p.grad = None
        self._rank += 1

    def synchronize(self) -> None:
        """Exchange the workers' gradients; every parameter's ``.grad`` becomes the mean over workers."""
        if self._synchronized:
            return
        if self._rank != self.workers:
            raise RuntimeError(f"step() after {self._rank} of {self.workers} workers' backward(): every worker "
                               "must run backward() first")
        if self._started is None:
            self._started = time.perf_counter()
        if self.codec is None:
            for _, p in self._named:
                total = self._pending[0][p].clone()
                for r in range(1, self.workers):
                    total += self._pending[r][p]
                p.grad = (total / self.workers).view(p.shape).to(p.dtype)
        else:
            for r in range(self.workers):  # all first phases are in: start every second phase
                for ex in self._pending[r].values():
                    ex.advance()
            for _, p in self._named:
                name = self._names[p]
                outs = [self.exchanges[r].finish(name, self._pending[r][p]) for r in range(self.workers)]
                # NaN (a non-finite step, which every rank decodes as NaN) counts as equal to NaN
                if not all(torch.allclose(outs[0], o, rtol=0.0, atol=0.0, equal_nan=True) for o in outs[1:]):
                    raise RuntimeError(f"layer {name!r}: simulated ranks decoded different aggregates")
                p.grad = outs[0].view(p.shape).to(p.dtype)
        for pending in self._pending:
            pending.clear()
        if self.world.pending():  # every collective was read by every rank
            raise RuntimeError(f"collectives left unread: {self.world.pending()}")
        self._after_step()
        self._synchronized = True

    def step(self, closure=None):
        self.synchronize()
        self._synchronized = False
        self._rank = 0
        self.steps += 1
        return self.optimizer.step(closure)

    # ---- the wrapped optimizer's own state -------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def state_dict(self) -> dict:
        """The wrapped optimizer's ``state_dict()`` (the compression state: ``compression_state_dict``)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def _after_step(self) -> None:
        """As a job's rank 0: refit adaptive levels when due; the trigger sees the aggregated
        norms, and when it fires, allocate and switch every simulated rank to the new codebook
        (what a job broadcasts)."""
        if not self.exchanges:
            return
        ex = self.exchanges[0]
        by_name = dict(self._named)
        if ex.refit_due(self.steps):
            fitted = ex.fit_levels({n: p.grad for n, p in self._named})
            for e in self.exchanges:
                e.set_levels(fitted)
        if self.allocator is None:
            return
        start = time.perf_counter()
        names = ex.allocatable
        norms = [float(by_name[n].grad.detach().float().norm()) for n in names]
        if self.trigger.observe(self.steps, norms):
            payload = decide_bits(self.allocator, ex, {n: by_name[n] for n in names}, self.steps,
                                  float(self.optimizer.param_groups[0]["lr"]))
            for e in self.exchanges:
                apply_bits(payload, e, self.steps)
            seconds = time.perf_counter() - start
            self.allocation_events.append(AllocationEvent(self.steps, payload["version"], payload["summary"], seconds,
                                                          payload["forwards"], payload["backwards"],
                                                          dict(payload["bits"])))
        self._alloc_seconds += time.perf_counter() - start

    # ---- reporting ---------------------------------------------------------------------------------
    @property
    def codebook(self):
        return self.exchanges[0].codebook if self.exchanges else None

    def layer_plans(self) -> list:
        """Rank 0's ``LayerPlan`` per layer (bits, transport, predicted and measured payload bytes)."""
        return list(self.exchanges[0].plans.values()) if self.exchanges else []

    def payload_bytes(self) -> tuple[int, int]:
        """(bytes rank 0 handed to the collectives in the latest step, float32 bytes of the same layers)."""
        fp32 = sum(4 * p.numel() for _, p in self._named)
        if not self.exchanges:
            return fp32, fp32
        return sum(p.payload_bytes for p in self.layer_plans()), fp32

    @property
    def track_error(self) -> bool:
        """Measure every rank's coding error (``coding_variance``); two extra reductions per layer."""
        return bool(self.exchanges) and self.exchanges[0].track_error

    @track_error.setter
    def track_error(self, on: bool) -> None:
        for ex in self.exchanges:
            ex.track_error = on

    def coding_variance(self) -> float | None:
        """Normalised coding variance of the latest step over the gather-coded layers and all
        workers: sum ||Q(x) - x||^2 / sum ||x||^2 (None when not measured or nothing was coded)."""
        err = energy = 0.0
        for ex in self.exchanges:
            e, n = ex.coding_error()
            err, energy = err + e, energy + n
        return err / energy if energy > 0 else None

    def bits(self) -> dict[str, int]:
        """Bits per layer now (32 for float32 layers)."""
        if not self.exchanges:
            return {n: 32 for n, _ in self._named}
        return {p.name: p.bits for p in self.layer_plans()}

    def allocation_overhead(self) -> dict:
        return allocation_overhead(self.allocation_events, self._alloc_seconds, self._started,
                                   self.codebook.version if self.codebook is not None else 0)

    # ---- checkpoint --------------------------------------------------------------------------------
    def _config(self) -> dict:
        if not self.exchanges:
            return {"codec": None}
        return coding_config(self.exchanges[0], self.allocator, self.trigger)

    def compression_state_dict(self) -> dict:
        """Every simulated rank's compression state in the bundle format of ``DistributedOptimizer``
        (residuals, codebook, dither streams, coder state), with the trigger's and the allocator's."""
        if self._rank:
            raise RuntimeError("compression_state_dict() in the middle of a step; call it after step()")
        per_rank = [rank_state(self.steps, ex, self.trigger, self.allocator, self.allocation_events,
                               self._alloc_seconds) for ex in self.exchanges] \
            or [{"step": self.steps} for _ in range(self.workers)]
        layers = {n: p.numel() for n, p in self._named}
        return checkpoint.bundle(per_rank, layers=layers, config=self._config())

    def load_compression_state_dict(self, state: dict, reset: bool = False) -> None:
        """Resume from ``compression_state_dict()`` (same number of workers, model and settings, or
        ``StateMismatchError`` naming what differs; ``reset=True`` starts the compression afresh)."""
        if not isinstance(state, Mapping) or state.get("format") != checkpoint.FORMAT:
            raise TypeError("load_compression_state_dict() takes what compression_state_dict() returned (a dict with "
                            f"format {checkpoint.FORMAT!r}), got {type(state).__name__}")
        layers = {n: p.numel() for n, p in self._named}
        size = self.workers
        if reset and checkpoint.mismatches(state, size=size, layers=layers, config=self._config()):
            for ex in self.exchanges:
                ex.reset_state()
            if self.trigger is not None:
                self.trigger.reset()
                self.allocator.reset()
            return
        parts = [checkpoint.select(state, rank=r, size=size, layers=layers, config=self._config(),
                                   owner="hvd_gradq.SimulatedWorkers") for r in range(size)]
        for ex, part in zip(self.exchanges, parts):
            ex.load_state_dict(part["exchange"])
        self.steps = parts[0]["step"]
        if self.trigger is not None:
            self.trigger.load_state_dict(parts[0]["trigger"])
            self.allocator.load_state_dict(parts[0]["allocator"])
            self.allocation_events = [AllocationEvent(**e) for e in parts[0]["events"]]
            self._alloc_seconds = parts[0]["alloc_seconds"]

    def close(self) -> None:
        """Remove the gradient hooks (the model trains normally afterwards)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
