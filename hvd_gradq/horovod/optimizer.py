"""``hvd_gradq.DistributedOptimizer``: Horovod's own optimizer with a ``hvd_gradq.Compressor``,
plus what Horovod's does not do.

``hvd_gradq.DistributedOptimizer(opt, ..., codec=..., bits=...)`` is
``hvd.DistributedOptimizer(opt, ..., compression=hvd_gradq.Compressor(...))`` with these
differences, each a fix of something Horovod's optimizer gets wrong for a user of compression:

* ``hvd.broadcast_optimizer_state`` materialises the empty state of the ranks that did not load a
  checkpoint with a zero-gradient step of the wrapped optimizer; Horovod's lets that step move
  the parameters (weight decay), so those ranks diverge for good. Here it puts them back.
* Sparse gradients are coded like any layer, with or without ``sparse_as_dense``, and handed
  back sparse (Horovod's ``sparse_as_dense=False`` sends them uncompressed).
* A parameter that was frozen when the optimizer was built and trains later raises on every
  rank, naming the fix (Horovod applies each rank's own gradient to it, silently).
* ``step_timings()`` includes the wrapped optimizer's update.

Hooks, grouping, ``backward_passes_per_step`` and ``synchronize()`` are Horovod's; the coding,
the transports and the allocator are the compressor's (``horovod.compressor``).
"""
from __future__ import annotations

import abc
import time
import warnings
from collections.abc import Callable, Iterable, Mapping

import horovod.torch as hvd
import torch
from horovod.torch.optimizer import _DistributedOptimizer as _HorovodOptimizer

from hvd_gradq import checks
from hvd_gradq.alloc import Allocator, Trigger
from hvd_gradq.horovod.arguments import optimizer_named_parameters
from hvd_gradq.horovod.compressor import Compressor
from hvd_gradq.plan.cost_model import LinkModel
from hvd_gradq.settings import CODING_KEYWORDS, Coding

LABEL = "hvd_gradq.DistributedOptimizer"
#: what the optimizer hands on to its compressor (``opt.compressor``) unchanged
_DELEGATED = ("gradient_exchange", "reallocation", "allocator", "trigger", "allocation_events", "codebook",
              "layer_plans", "coding_variance", "allocation_overhead", "transport_summary", "step_timings",
              "compression_state_dict", "load_compression_state_dict", "reset_compression_state", "elastic_resync",
              "sync_codebook", "local_compression_state", "load_local_compression_state", "payloads", "wire_stats")


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


class _DropIn:
    """Methods put over Horovod's ``_DistributedOptimizer`` in the class ``DistributedOptimizer`` makes."""

    @property
    def compressor(self) -> Compressor:
        """The ``hvd_gradq.Compressor`` that codes this optimizer's gradients."""
        return self._compression

    def __getattr__(self, name: str):
        if name in _DELEGATED:
            return getattr(self._compression, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def track_error(self) -> bool:
        """Measure this rank's coding error of the gathered layers (``coding_variance``)."""
        return self._compression.track_error

    @track_error.setter
    def track_error(self, on: bool) -> None:
        self._compression.track_error = on

    def synchronize(self) -> None:
        _HorovodOptimizer.synchronize(self)
        late = [n for n, p in self._gq_untracked if p.requires_grad and p.grad is not None]
        if late:  # Horovod would apply each rank's own gradient to them, silently
            raise ValueError(
                f"parameters {late} have gradients but did not require grad when the DistributedOptimizer was "
                "built, so no exchange exists for them and each rank would apply its own gradient. Build the "
                "optimizer with requires_grad=True on every parameter that will train (one frozen later is "
                "exchanged as zeros), or build a new DistributedOptimizer after unfreezing.")

    def step(self, closure=None):
        # Horovod's step, whose update is the wrapped class's (below _materialising_step)
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
        start = time.perf_counter()
        try:
            return super(self._gq_update_class, self).step(closure)
        finally:
            if self._handles_seen():
                self._compression.close_after_update(time.perf_counter() - start)

    def _handles_seen(self) -> bool:
        """Whether this rank exchanges (hooks registered): a one-process job has no step timings."""
        return bool(self._grad_accs)


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
    and changes nothing, since the sum is formed after decoding; sparse gradients are densified and
    coded like any layer whatever ``sparse_as_dense`` says, and handed back sparse). Horovod's
    helpers work with it as with its own optimizer (``hvd.broadcast_optimizer_state`` materialises
    missing state without exchanging or moving parameters, ``hvd.elastic.TorchState`` keeps the
    compression state, after ``hvd.join()`` call ``sync_codebook``): see docs/HOROVOD_COMPAT.md.

    The coding: ``coding=hvd_gradq.Coding(...)``, or the same settings as keywords (``codec``,
    ``bits``, ``ratio``, ``rank``, ``factors``, ``bucket_size``, ``transport``, ``link``,
    ``min_elements``, ``error_feedback``, ``seed``, ``refit_levels``, ``level_groups``,
    ``rotation``, ``rounding``, ``block_scales``; see ``Coding`` for each). ``allocator``: a
    ``hvd_gradq.Allocator``: rank 0 re-decides the bits of every coded layer when ``trigger`` (a
    ``hvd_gradq.Trigger``; default: similarity, tau 0.95, k_min 20) fires and broadcasts the new
    codebook; every rank switches at the same step, and ``bits`` is only the start. The LAD
    metrics take this optimizer's current learning rate as their step size.

    The same as ``hvd.DistributedOptimizer(optimizer, compression=hvd_gradq.Compressor(...))``
    but for the fixes listed in ``hvd_gradq.horovod.optimizer``; ``opt.compressor`` is that
    compressor, and ``opt.layer_plans()``, ``opt.transport_summary()``, ``opt.codebook``,
    ``opt.step_timings()``, ``opt.compression_state_dict()``, ... are its. Every rank must
    construct it with the same arguments: any disagreement raises
    ``hvd_gradq.CodebookMismatchError`` on every rank at the first step.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(compression, Compressor):
        raise ValueError(
            "hvd_gradq.DistributedOptimizer makes its own hvd_gradq.Compressor: pass the compressor to Horovod's "
            "optimizer instead, hvd.DistributedOptimizer(opt, compression=comp), or give this one the settings "
            "(codec=, bits=, ...) and leave compression unset")
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
    if groups is not None and not (isinstance(groups, list) or (isinstance(groups, int)
                                                                and not isinstance(groups, bool) and groups >= 0)):
        raise ValueError("groups must be a positive integer or a list of lists of parameters (torch.Tensor)")
    if groups == 0:
        groups = None
    process_set = hvd.global_process_set if process_set is None else process_set
    named = optimizer_named_parameters(optimizer, named_parameters)
    given = locals()  # the coding keywords have the names of Coding's fields
    settings = {key: given[key] for key in CODING_KEYWORDS}
    base = optimizer.__class__
    # Between the wrapped class and Horovod's: the step Horovod's broadcast_optimizer_state takes when
    # it materialises the state of a rank whose state is empty (see _materialising_step)
    local = type(base.__name__, (base,), {"step": _materialising_step, "__module__": __name__})
    methods = {**_HorovodOptimizer.__dict__, **{k: v for k, v in _DropIn.__dict__.items()
                                                 if k not in ("__dict__", "__weakref__", "__doc__", "__module__",
                                                              "__qualname__")}}
    cls = type(base.__name__, (local,), {**methods, "_gq_update_class": local})
    GradqOptimizer.register(cls)
    opt = cls.__new__(cls)
    compressor = Compressor(named, op=op, process_set=process_set, coding=coding, allocator=allocator,
                            trigger=trigger, lr=opt, label=LABEL, **settings)
    opt._gq_untracked = [(n, p) for n, p in named if not p.requires_grad]
    compressor.closes_steps = False  # the optimizer closes each step's timings after its update
    # sparse_as_dense=True: sparse gradients are coded like any layer whatever the caller's sparse_as_dense
    opt.__init__(optimizer.param_groups, named, compressor, backward_passes_per_step, op, gradient_predivide_factor,
                 groups, True, process_set)
    return opt
