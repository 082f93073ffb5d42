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
    sim = hvd_gradq.SimulatedWorkers(opt, model.named_parameters(), workers=4, codec="shared_scale", bits=2)
    for x, y in batches:
        sim.zero_grad()
        for xr, yr in zip(x.chunk(4), y.chunk(4)):   # worker r's micro-batch
            sim.backward(F.cross_entropy(model(xr), yr))
        sim.step()                                     # mean over workers of the decoded gradients

Differences from a real job, by construction: the workers share one model, so layers with running
statistics (BatchNorm) update them once per micro-batch, and dropout draws different masks per
worker from one generator (a real job seeded alike draws the same masks on every rank). One
process: no Horovod, no MPI.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from hvd_gradq.alloc import Allocator, Trigger
from hvd_gradq.exchange import state as checkpoint
from hvd_gradq.exchange.collectives import SimulatedWorld
from hvd_gradq.exchange.engine import GradientExchange
from hvd_gradq.exchange.reallocation import LocalChannel, Reallocator
from hvd_gradq.plan.cost_model import LinkModel
from hvd_gradq.settings import CODING_KEYWORDS, Coding, check_reallocation
from hvd_gradq.wire.header import AVERAGE


class SimulatedWorkers:
    """``workers`` data-parallel workers in one process, each with its own ``GradientExchange``.

    Takes the coding arguments of ``hvd_gradq.DistributedOptimizer`` (``codec``, ``bits``,
    ``ratio``, ``bucket_size``, ``transport``, ``link``, ``min_elements``, ``error_feedback``,
    ``seed``, ``allocator``, ``trigger``, ``refit_levels``, ``level_groups``, ``rotation``, ``rounding``,
    ``block_scales``); ``codec=None`` averages the float32 gradients exactly
    (the uncompressed baseline). The aggregate is the mean over workers (``op=hvd.Average``).

    Per step: ``zero_grad()``, then ``backward(loss)`` once per worker, in rank order (worker r's
    loss on its micro-batch), then ``step()`` (or ``synchronize()`` to edit the gradients before
    ``step()``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, torch.Tensor]],
                 workers: int, *, coding: Coding | None = None, allocator: Allocator | None = None,
                 trigger: Trigger | None = None, codec: str | None = "rotated", bits: int | Mapping[str, int] = 4,
                 ratio: float | None = None, rank: int | Mapping[str, int] = 4, factors: str = "float32",
                 bucket_size: int = 1024,
                 transport: str | Mapping[str, str] = "auto",
                 link: LinkModel | None = None, min_elements: int = 1024, error_feedback: bool | str = "auto",
                 seed: int = 0, refit_levels: int | None = None, level_groups="layer", rotation: int = 4096,
                 rounding: str = "nearest",
                 block_scales: str = "this_step") -> None:
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
        if coding is None and codec is None:
            if allocator is not None or trigger is not None:
                raise ValueError("codec=None sends float32: there are no bits to allocate")
            self.coding = None
            self.exchanges = []
        else:
            given = locals()  # the coding keywords have the names of Coding's fields
            self.coding = Coding.of(coding, **{key: given[key] for key in CODING_KEYWORDS})
            trigger = check_reallocation(self.coding, allocator, trigger)
            self.exchanges = [GradientExchange(self._named, coding=self.coding, collectives=self.world.rank(r),
                                               op=AVERAGE, label="hvd_gradq.SimulatedWorkers")
                              for r in range(workers)]
        #: the reallocation step of a job's rank 0, applied to every simulated rank
        self.reallocation = Reallocator(allocator, trigger, LocalChannel(), is_root=True)
        self.steps = 0
        self._rank = 0  # the worker whose backward runs next
        self._pending: list[dict[torch.Tensor, object]] = [{} for _ in range(workers)]
        self._synchronized = False
        self._in_backward = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook) for _, p in self._named]
        self._names = {p: n for n, p in self._named}

    @property
    def codec(self) -> str | None:
        return None if self.coding is None else self.coding.codec

    @property
    def allocator(self) -> Allocator | None:
        return self.reallocation.allocator

    @property
    def trigger(self) -> Trigger | None:
        return self.reallocation.trigger

    @property
    def allocation_events(self) -> list:
        """Every codebook switch: step, version, summary, cost (as ``DistributedOptimizer``)."""
        return self.reallocation.events

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
        if self.codec is None:
            for _, p in self._named:
                total = self._pending[0][p].clone()
                for r in range(1, self.workers):
                    total += self._pending[r][p]
                p.grad = (total / self.workers).view(p.shape).to(p.dtype)
        else:
            for r in range(self.workers):  # all first phases are in: start every second phase
                self.exchanges[r].agree()
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
        if self.exchanges:
            self.reallocation.after_step(self.steps, self.exchanges, dict(self._named),
                                         {n: p.grad for n, p in self._named if p.grad is not None},
                                         float(self.optimizer.param_groups[0]["lr"]))
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
        return self.reallocation.overhead(self.codebook.version if self.codebook is not None else 0)

    # ---- checkpoint --------------------------------------------------------------------------------
    def _config(self) -> dict:
        if not self.exchanges:
            return {"codec": None}
        return checkpoint.coding_config(self.exchanges[0], self.reallocation)

    def compression_state_dict(self) -> dict:
        """Every simulated rank's compression state in the bundle format of ``DistributedOptimizer``
        (residuals, codebook, dither streams, coder state), with the trigger's and the allocator's."""
        if self._rank:
            raise RuntimeError("compression_state_dict() in the middle of a step; call it after step()")
        per_rank = [checkpoint.rank_state(self.steps, ex, self.reallocation) for ex in self.exchanges] \
            or [{"step": self.steps} for _ in range(self.workers)]
        return checkpoint.bundle(per_rank, layers={n: p.numel() for n, p in self._named}, config=self._config())

    def load_compression_state_dict(self, state: dict, reset: bool = False) -> None:
        """Resume from ``compression_state_dict()`` (same number of workers, model and settings, or
        ``StateMismatchError`` naming what differs; ``reset=True`` starts the compression afresh)."""
        parts = checkpoint.parts_to_resume(state, owner="hvd_gradq.SimulatedWorkers", size=self.workers,
                                           ranks=range(self.workers), layers={n: p.numel() for n, p in self._named},
                                           config=self._config(), reset=reset)
        if parts is None:
            for ex in self.exchanges:
                ex.reset_state()
            self.reallocation.reset()
            return
        for ex, part in zip(self.exchanges, parts):
            checkpoint.load_engine_state(ex, part["exchange"])
        self.steps = parts[0]["step"]
        if self.exchanges:
            self.reallocation.load_state_dict(parts[0])

    def close(self) -> None:
        """Remove the gradient hooks (the model trains normally afterwards)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
