"""``hvd_gradq.DistributedOptimizer``: a drop-in for ``hvd.DistributedOptimizer`` whose layers
travel by lane allreduce, allgather or the two-phase exchange, chosen per layer by the cost
model, with one codebook on every rank.

The Horovod side only: gradient hooks, Horovod's optimizer API (``synchronize``,
``skip_synchronize``, ``step``, ``zero_grad``), the compression checkpoint and elastic resync. The
coding is the exchange engine's (``exchange.engine``), the bit reallocation the shared step of
``exchange.reallocation``. The optimizer class is created from the wrapped optimizer's class, as
Horovod does, so ``isinstance(opt, type(original))`` holds and the update rule is the original one.
"""
from __future__ import annotations

import abc
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager, suppress
from dataclasses import replace

import horovod.torch as hvd
import torch

from hvd_gradq import checks
from hvd_gradq.alloc import AllocationEvent, Allocator, Trigger
from hvd_gradq.codebook import Codebook
from hvd_gradq.exchange.engine import GradientExchange
from hvd_gradq.exchange.exchanges import Exchange
from hvd_gradq.exchange.reallocation import Reallocator
from hvd_gradq.exchange.timings import StepClock
from hvd_gradq.horovod.arguments import optimizer_named_parameters, parameter_groups
from hvd_gradq.horovod.channel import HorovodChannel
from hvd_gradq.horovod.collectives import HorovodCollectives, measure_link
from hvd_gradq.horovod.resync import LABEL, CompressionResync
from hvd_gradq.plan.cost_model import LinkModel
from hvd_gradq.plan.planner import LayerPlan
from hvd_gradq.settings import CODING_KEYWORDS, Coding, check_reallocation
from hvd_gradq.wire.header import AVERAGE, SUM, CodebookMismatchError, ReductionMismatchError


def _materialising_step(self, closure=None):
    """The wrapped optimizer's update with the parameters put back afterwards: only the optimizer
    state comes into being. ``hvd.broadcast_optimizer_state`` calls it (as
    ``super(type(opt), opt).step()``) on ranks whose state is empty, with zero gradients, before it
    broadcasts the root's state; it must not launch collectives (the other ranks do not step) nor
    move the parameters (a zero-gradient step still applies weight decay; Horovod's own optimizer
    lets it move them, so that ranks resumed from a checkpoint on rank 0 diverge)."""
    params = [p for g in self.param_groups for p in g["params"]]
    kept = [p.detach().clone() for p in params]
    out = super(type(self)._gq_update_class, self).step(closure)
    with torch.no_grad():
        for p, k in zip(params, kept):
            p.copy_(k)
    return out


class GradqOptimizer(abc.ABC):  # noqa: B024 - a marker: no abstract methods
    """``isinstance(opt, GradqOptimizer)`` holds for every optimizer ``DistributedOptimizer`` returns
    (their classes are made at run time from the wrapped optimizer's class)."""


class _GradqOptimizer(torch.optim.Optimizer):
    """Methods merged into the dynamically created optimizer class (see ``DistributedOptimizer``)."""

    def __init__(self, params, named: list[tuple[str, torch.Tensor]], make_exchange: Callable[[], GradientExchange],
                 backward_passes_per_step: int, groups, sparse_as_dense: bool, process_set,
                 reallocation: Reallocator) -> None:
        super(self.__class__, self).__init__(params)
        # hvd.broadcast_optimizer_state recognises Horovod's optimizer by its module and then
        # materialises empty state with super(type(opt), opt).step(), which bypasses the gradient
        # exchange; any other optimizer it steps in full, launching collectives on the ranks with
        # empty state only (a hang). Ours is recognised too, and that step is _materialising_step.
        self.__module__ = hvd.DistributedOptimizer.__module__
        self._gq_make_exchange = make_exchange
        self.gradient_exchange = make_exchange() if process_set.included() else None
        #: the reallocation step after every exchange (refit, trigger, allocate, apply)
        self.reallocation = reallocation
        self._gq_step = 0
        self.process_set = process_set
        self.backward_passes_per_step = backward_passes_per_step
        self.sparse_as_dense = sparse_as_dense  # accepted; sparse gradients are densified either way
        self._gq_names = {p: n for n, p in named}
        self._gq_by_name = {n: p for n, p in named}
        self._gq_params = [p for _, p in named if p.requires_grad]
        #: frozen when the optimizer was built: no exchange exists for them (as in Horovod)
        self._gq_untracked = [p for _, p in named if not p.requires_grad]
        self._gq_delay = dict.fromkeys(self._gq_params, backward_passes_per_step)
        self._gq_pending: dict[torch.Tensor, Exchange] = {}
        self._gq_waiting: list[Exchange] = []  # exchanges whose next phase is not started yet
        self._gq_groups = parameter_groups(groups, self._gq_params)
        self._gq_group_of = {p: g for g in (self._gq_groups or []) for p in g}
        self._gq_ready: dict[tuple, list[torch.Tensor]] = {}
        self._gq_hooks = []
        self._synchronized = False
        self._should_synchronize = True
        self._gq_clock = StepClock()  # step timings (exchange.timings)
        if process_set.included() and (hvd.size() > 1 or os.environ.get("HOROVOD_ELASTIC") == "1"):
            self._gq_hooks = [p.register_post_accumulate_grad_hook(self._gq_hook) for p in self._gq_params]

    @property
    def allocator(self) -> Allocator | None:
        return self.reallocation.allocator

    @property
    def trigger(self) -> Trigger | None:
        return self.reallocation.trigger

    @property
    def allocation_events(self) -> list[AllocationEvent]:
        """Every codebook switch: step, version, summary, cost."""
        return self.reallocation.events

    # ---- hooks ------------------------------------------------------------------------------------------
    def _gq_hook(self, p: torch.Tensor) -> None:
        with self._gq_clock.inside():
            self._gq_hook_body(p)

    def _gq_hook_body(self, p: torch.Tensor) -> None:
        if self._gq_delay[p] <= 0:
            raise AssertionError(  # Horovod's words
                "Gradients were computed more than backward_passes_per_step times before call to step(). "
                "Increase backward_passes_per_step to accumulate gradients locally."
            )
        self._gq_delay[p] -= 1
        if self._gq_delay[p] > 0:
            return
        group = self._gq_group_of.get(p)
        if group is None:
            self._gq_launch(p)
            return
        ready = self._gq_ready.setdefault(group, [])
        ready.append(p)
        if len(ready) == len(group):  # a group goes out together, in its own order
            for q in group:
                self._gq_launch(q)
            del self._gq_ready[group]

    def _gq_launch(self, p: torch.Tensor) -> None:
        if p in self._gq_pending:
            return
        if not self._gq_pending:  # a step's first exchange: has the set of workers changed (elastic)?
            ex = self.gradient_exchange
            if ex is not None and (self.process_set.size(), self.process_set.rank()) != (ex.size, ex.rank):
                self.elastic_resync()
        grad = p.grad
        if grad is None:  # unused on this rank, maybe not on others: contribute zeros
            grad = p.grad = torch.zeros_like(p)
        if grad.is_sparse:  # coded like any layer (the plan is per layer and every rank runs it)
            grad = grad.to_dense()
        ex = self._gq_pending[p] = self.gradient_exchange.launch(self._gq_names[p], grad, frozen=not p.requires_grad)
        # move finished first phases on now, so that second phases overlap the rest of the backward
        for w in self._gq_waiting:
            with suppress(Exception):  # an error is kept by the exchange and raised in synchronize
                w.advance_if_ready()
        self._gq_waiting = [w for w in self._gq_waiting if w.waiting]
        if ex.waiting:
            self._gq_waiting.append(ex)

    # ---- Horovod's optimizer API ---------------------------------------------------------------------------
    def synchronize(self) -> None:
        if not self.process_set.included() or not self._gq_hooks:
            self._synchronized = True
            return
        with self._gq_clock.inside():
            self._gq_synchronize()

    def _gq_synchronize(self) -> None:
        for p in self._gq_params:  # layers whose hook did not fire (yet): every rank sends every layer
            self._gq_launch(p)
        errors: list[BaseException] = []
        try:  # before any wait: ranks whose codebooks differ may be running different collectives
            self.gradient_exchange.agree()
        except CodebookMismatchError as e:
            errors.append(e)
            self._gq_pending.clear()  # their exchanges may never complete: none is waited for
        for ex in self._gq_pending.values():
            try:
                ex.advance()
            except Exception as e:  # keep draining so that no collective is left behind
                errors.append(e)
        for p, ex in self._gq_pending.items():
            try:
                out = self.gradient_exchange.finish(self._gq_names[p], ex)
            except Exception as e:
                errors.append(e)
                continue
            if p.grad.is_sparse:  # handed back sparse, as it came (e.g. for torch.optim.SparseAdam)
                p.grad.zero_().add_(out.view(p.shape).to(p.grad.dtype).to_sparse(p.grad.sparse_dim()))
            else:
                p.grad.copy_(out.view(p.grad.shape))
        self._gq_clear()
        late = [self._gq_names[p] for p in self._gq_untracked if p.requires_grad and p.grad is not None]
        if late and not errors:  # Horovod would apply each rank's own gradient to them, silently
            errors.append(ValueError(
                f"parameters {late} have gradients but did not require grad when the DistributedOptimizer was "
                "built, so no exchange exists for them and each rank would apply its own gradient. Build the "
                "optimizer with requires_grad=True on every parameter that will train (one frozen later is "
                "exchanged as zeros), or build a new DistributedOptimizer after unfreezing."))
        if errors:
            err = errors[0]
            if isinstance(err, (CodebookMismatchError, ReductionMismatchError)) \
                    and err.ranks in (None, self.gradient_exchange.size):
                # every rank reached this verdict from the same bytes; meet before raising so that
                # no rank shuts Horovod down under another that is still in a collective
                with suppress(Exception):
                    hvd.barrier(process_set=self.process_set)
            raise err
        step, self._gq_step = self._gq_step, self._gq_step + 1
        with self._gq_clock.phase("allocation"):
            self.reallocation.after_step(step, [self.gradient_exchange], self._gq_by_name,
                                         float(self.param_groups[0]["lr"]))
        self._synchronized = True

    @contextmanager
    def skip_synchronize(self):
        """``synchronize()`` yourself (e.g. to clip gradients), then step inside this context."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn(  # Horovod's words, which users and tests look for
                    "optimizer.step() called without optimizer.skip_synchronize() context after "
                    "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
                    "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in your "
                    "code.", stacklevel=2
                )
            self.synchronize()
        self._synchronized = False
        with self._gq_clock.phase("update"):
            out = super(self._gq_update_class, self).step(closure)
        if self.gradient_exchange is not None and self._gq_hooks:
            self._gq_clock.close(self.gradient_exchange)
        return out

    def step_timings(self, last: int | None = None) -> list[dict]:
        """This rank's steps, oldest first (``last``: the latest ones): seconds of ``compute``
        (everything outside the optimizer: forward, backward, user code), ``encode``, ``decode``,
        ``wait`` (blocked in collectives), ``allocation``, ``update``, ``other``; their sum
        ``step`` (end of one step to the end of the next; the first from its first gradient hook)
        and ``bytes`` handed to the collectives. Empty in a one-process job."""
        ex = self.gradient_exchange
        records = [] if ex is None else list(ex.timer.history)
        return records if last is None else records[-last:]

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._gq_pending:
            raise AssertionError(  # Horovod's words
                "optimizer.zero_grad() was called after loss.backward() but before optimizer.step() or "
                "optimizer.synchronize(). This is prohibited as it can cause a race condition."
            )
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)

    def _gq_clear(self) -> None:
        self._gq_pending.clear()
        self._gq_waiting.clear()
        self._gq_ready.clear()
        for p in self._gq_delay:
            self._gq_delay[p] = self.backward_passes_per_step

    def load_state_dict(self, *args, **kwargs):
        self._gq_clear()
        self._synchronized = False
        self._should_synchronize = True
        return super(self.__class__, self).load_state_dict(*args, **kwargs)

    def set_backward_passes_per_step(self, passes: int) -> None:
        self.backward_passes_per_step = checks.integer(passes, "backward_passes_per_step", low=1)
        for p in self._gq_delay:
            self._gq_delay[p] = passes

    # ---- reporting ---------------------------------------------------------------------------------------
    @property
    def codebook(self) -> Codebook:
        return self.gradient_exchange.codebook

    def layer_plans(self) -> list[LayerPlan]:
        """Per layer: bits, codec, chosen transport, predicted and measured payload bytes."""
        return list(self.gradient_exchange.plans.values())

    @property
    def track_error(self) -> bool:
        """Measure this rank's coding error of the gathered layers (``coding_variance``)."""
        return self.gradient_exchange is not None and self.gradient_exchange.track_error

    @track_error.setter
    def track_error(self, on: bool) -> None:
        self.gradient_exchange.track_error = on

    def coding_variance(self) -> float | None:
        """This rank's normalised coding variance of the latest step over the gathered layers,
        sum ||Q(x) - x||^2 / sum ||x||^2 (None when not measured or nothing was gathered)."""
        err, energy = self.gradient_exchange.coding_error()
        return err / energy if energy > 0 else None

    def allocation_overhead(self) -> dict:
        """Time spent deciding bits (trigger broadcasts, allocations, codebook broadcasts), the
        number of allocations and forward passes, and that time as a fraction of training time."""
        ex = self.gradient_exchange
        return self.reallocation.overhead(ex.codebook.version if ex else 0)

    def transport_summary(self) -> str:
        """One line: layers per transport and payload bytes of the latest step vs float32."""
        line = self.gradient_exchange.summary()
        if self.allocator is not None:
            o = self.allocation_overhead()
            line += (f"; codebook v{o['version']}, {o['allocations']} allocations, {o['seconds']:.2f} s deciding "
                     f"({100 * o['fraction']:.1f}% of training)")
        return line


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
    compression=None,
    backward_passes_per_step: int = 1,
    op=None,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups=None,
    sparse_as_dense: bool = False,
    process_set=None,
    *,
    coding: Coding | None = None,
    allocator: Allocator | None = None,
    trigger: Trigger | None = None,
    codec: str = "rotated",
    bits: int | Mapping[str, int] | Callable[[str], int] = 4,
    ratio: float | None = None,
    rank: int | Mapping[str, int] | Callable[[str], int] = 4,
    factors: str = "float32",
    bucket_size: int = 1024,
    transport: str | Mapping[str, str] = "auto",
    link: LinkModel | str | None = None,
    min_elements: int = 1024,
    error_feedback: bool | str = "auto",
    seed: int = 0,
    refit_levels: int | None = None,
    level_groups="layer",
    rotation: int = 4096,
    rounding: str = "nearest",
    block_scales: str = "this_step",
):
    """Wrap ``optimizer`` like ``hvd.DistributedOptimizer``, exchanging coded gradients.

    The positional arguments are Horovod's and mean what they mean there (``op``: the sum or the
    mean over the process set's ranks; ``gradient_predivide_factor`` is accepted for compatibility
    and changes nothing, since the sum is formed in float32 after decoding; sparse gradients are
    densified and coded like any layer whatever ``sparse_as_dense`` says, and handed back sparse).
    Horovod's helpers work with it as with its own optimizer (``hvd.broadcast_optimizer_state``
    materialises missing state without exchanging or moving parameters, ``hvd.elastic.TorchState``
    keeps the compression state, after ``hvd.join()`` call ``sync_codebook``): see
    docs/HOROVOD_COMPAT.md.

    The coding: ``coding=hvd_gradq.Coding(...)``, or the same settings as keywords (``codec``,
    ``bits``, ``ratio``, ``rank``, ``factors``, ``bucket_size``, ``transport``, ``link``, ``min_elements``,
    ``error_feedback``, ``seed``, ``refit_levels``, ``level_groups``, ``rotation``, ``rounding``, ``block_scales``;
    see ``Coding`` for each). ``allocator``: a
    ``hvd_gradq.Allocator``: rank 0 re-decides the bits of every coded layer when ``trigger`` (a
    ``hvd_gradq.Trigger``; default: similarity, tau 0.95, k_min 20) fires and broadcasts the new
    codebook (over MPI with mpi4py under ``horovodrun --mpi``, else Horovod's
    ``broadcast_object``); every rank switches at the same step, and ``bits`` is only the start.

    ``opt.layer_plans()`` lists each layer's bits, transport, predicted and measured payload bytes;
    ``opt.transport_summary()`` gives one line for a progress report; ``opt.codebook`` is the shared
    versioned codebook. Every rank must construct it with the same arguments: any disagreement
    raises ``hvd_gradq.CodebookMismatchError`` on every rank at the first step.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if compression is not None and compression is not hvd.Compression.none:
        raise ValueError(
            "hvd_gradq.DistributedOptimizer codes gradients itself: choose the coding with codec=/bits=/ratio= "
            "and leave compression unset. (To use a Horovod Compressor, use hvd.DistributedOptimizer.)"
        )
    if op is None:
        op = hvd.Average
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError(
            f"op must be hvd.Average or hvd.Sum, got {op!r}: Adasum (and Min/Max/Product) do not combine "
            "with coded gradients; use hvd.DistributedOptimizer(op=hvd.Adasum) without compression for Adasum"
        )
    if gradient_predivide_factor != 1.0 and op != hvd.Average:
        raise ValueError("gradient_predivide_factor needs op=hvd.Average (as in hvd.DistributedOptimizer)")
    checks.number(gradient_predivide_factor, "gradient_predivide_factor", positive=True)
    checks.integer(backward_passes_per_step, "backward_passes_per_step", low=1)
    if num_groups:
        warnings.warn("num_groups is deprecated (as in Horovod); pass groups=", DeprecationWarning, stacklevel=2)
        groups = num_groups if groups is None else groups
    given = locals()  # the coding keywords have the names of Coding's fields
    coding = Coding.of(coding, **{key: given[key] for key in CODING_KEYWORDS})
    trigger = check_reallocation(coding, allocator, trigger)
    process_set = hvd.global_process_set if process_set is None else process_set
    if not isinstance(process_set, hvd.ProcessSet):
        raise ValueError(f"process_set must be a horovod.torch ProcessSet, got {process_set!r}")
    named = optimizer_named_parameters(optimizer, named_parameters)
    if coding.link == "measure":
        coding = replace(coding, link=measure_link(process_set) if process_set.included() else LinkModel())
    trainable = [(n, p) for n, p in named if p.requires_grad]

    def make_exchange() -> GradientExchange:  # again after an elastic reset, for the new process set
        return GradientExchange(trainable, coding=coding, collectives=HorovodCollectives(process_set),
                                op=SUM if op == hvd.Sum else AVERAGE, label=LABEL)

    exchange = make_exchange() if process_set.included() else None  # settings errors surface here
    channel = HorovodChannel(process_set) if process_set.included() else None
    reallocation = Reallocator(allocator, trigger, channel, is_root=process_set.included() and process_set.rank() == 0)
    base = optimizer.__class__
    # Between the wrapped class and ours: the step Horovod's broadcast_optimizer_state takes when it
    # materialises the state of a rank whose state is empty (see _materialising_step)
    local = type(base.__name__, (base,), {"step": _materialising_step, "__module__": __name__})
    cls = type(base.__name__, (CompressionResync, local), {**_GradqOptimizer.__dict__, "_gq_update_class": local})
    GradqOptimizer.register(cls)
    from hvd_gradq.horovod import elastic  # noqa: F401 - hvd.elastic.TorchState then keeps the compression state
    made = iter([exchange])
    return cls(optimizer.param_groups, named, lambda: next(made, None) or make_exchange(), backward_passes_per_step,
               groups, sparse_as_dense, process_set, reallocation)
