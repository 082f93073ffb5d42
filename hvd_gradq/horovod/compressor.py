"""``hvd_gradq.Compressor``: every feature of the library through Horovod's own optimizer,
``hvd.DistributedOptimizer(opt, named_parameters=..., compression=comp, op=...)``.

Horovod calls ``compress(grad)`` from its gradient hook and ``decompress(reduced, ctx)`` in
``synchronize()``; in between it allreduces what ``compress`` returned, under its own op. The
compressor hands each gradient to the exchange engine (``exchange.engine``, the one the drop-in
optimizer and the simulation run), which codes it and starts the layer's own collectives, and
gives Horovod:

* the layer's payload itself when it is one summable allreduce and Horovod sums (``op=hvd.Sum``:
  the lanes of shared-scale codes, rotated codes with last step's block scales, float32 layers);
* otherwise a placeholder: the summed header (``wire.header``, 8 words), so that Horovod's own
  allreduce still checks, at every step and on every rank alike, that the op is the one the
  compressor was built for, how many ranks reduced it and that they share the layer's codebook.
  The layer itself travels in the compressor's named collectives (gathered codes, two-phase,
  low-rank P and Q, this step's block statistics then the lanes, JointSQ's sparse codes); a
  0-bit layer sends nothing else.

The step boundary: a step's first ``compress`` opens it (after a change of the workers, the
engine is rebuilt there, as in the drop-in); its first ``decompress`` compares the ranks'
codebooks (a new engine's first step) and starts every dependent round still pending, in codebook
order, so each rank starts them at the same point whatever order Horovod hands layers over;
each ``decompress`` then returns its layer's aggregate; the last one closes the step: the
trigger sees the aggregated per-layer norms, rank 0 allocates and broadcasts the codebook
(``exchange.reallocation``), and every rank switches before the next step.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import replace
from typing import NamedTuple

import torch

from hvd_gradq import checks
from hvd_gradq.alloc import Allocator, Trigger
from hvd_gradq.exchange.engine import GradientExchange
from hvd_gradq.exchange.exchanges import Exchange
from hvd_gradq.exchange.reallocation import Reallocator
from hvd_gradq.exchange.timings import StepClock
from hvd_gradq.horovod.arguments import named_list
from hvd_gradq.horovod.channel import HorovodChannel
from hvd_gradq.horovod.collectives import HorovodCollectives, measure_link
from hvd_gradq.horovod.gradient_names import GradientNames
from hvd_gradq.horovod.report import CompressionReport, PayloadInfo
from hvd_gradq.horovod.resync import CompressionResync
from hvd_gradq.plan.cost_model import ALLREDUCE, FLOAT32, NONE, LinkModel
from hvd_gradq.settings import CODING_KEYWORDS, Coding, check_reallocation
from hvd_gradq.wire.header import (
    AVERAGE,
    SUM,
    CodebookMismatchError,
    ReductionMismatchError,
    header_words,
    read_header,
)

try:
    import horovod.torch as hvd
    from horovod.torch.compression import Compressor as _HorovodCompressor
except ImportError as exc:  # pragma: no cover - exercised only without Horovod
    raise ImportError(
        "hvd_gradq needs Horovod with PyTorch support. Run `bash launch/setup.sh` from the hvd_gradq "
        "checkout: it builds Horovod 0.28.1 against torch 2.13.0."
    ) from exc

#: the allocator metrics that take a step size (the LAD paper's eta)
_LR_METRICS = ("lad", "lad_first_order")


def op_name(op) -> str:
    """``wire.SUM`` / ``wire.AVERAGE`` for Horovod's op (None: Average, Horovod's default)."""
    if op is None or op == hvd.Average:
        return AVERAGE
    if op == hvd.Sum:
        return SUM
    raise ValueError(
        f"op must be hvd.Average (the DistributedOptimizer default) or hvd.Sum, got {op!r}: Adasum (and "
        "Min/Max/Product) do not combine coded gradients. Pass the same op to the compressor and to "
        "hvd.DistributedOptimizer; for Adasum use hvd.DistributedOptimizer(op=hvd.Adasum) without compression."
    )


class _Ticket(NamedTuple):
    """The ``ctx`` of one ``compress`` (it never leaves the rank)."""

    name: str
    carried: bool  # Horovod's allreduce carries the layer's payload (else a placeholder)
    packed: bool  # the layer is coded this step (not float32, not skipped)


class Compressor(CompressionResync, CompressionReport, _HorovodCompressor):
    """Per-layer coding through the stock ``hvd.DistributedOptimizer``: every codec, transport and
    bit width of the library, 0-bit layers, and the rank-0 allocator.

    Usage (pass the same ``op`` and ``process_set`` to both)::

        comp = hvd_gradq.Compressor(model.named_parameters(), codec="rotated", bits={"fc.*": 2})
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=comp)
        ...
        print(comp.transport_summary())         # layers per transport, bytes vs float32

    Args:
        named_parameters: the model's ``named_parameters()`` (or ``parameters()``): Horovod hands
            ``compress`` a bare gradient, and the compressor finds its layer among them. Layers
            that do not require grad now are not coded (as Horovod registers no hook for them).
        op: ``hvd.Average`` (default, as in ``hvd.DistributedOptimizer``) or ``hvd.Sum``; a
            different op in the optimizer raises on every rank at the first step.
        process_set: the Horovod process set the optimizer reduces over (default: all ranks).
        coding: a ``hvd_gradq.Coding``, or its settings as keywords (``codec``, ``bits``, ``ratio``,
            ``rank``, ``factors``, ``bucket_size``, ``transport``, ``link``, ``min_elements``,
            ``error_feedback``, ``seed``, ``refit_levels``, ``level_groups``, ``rotation``,
            ``rounding``, ``block_scales``), meaning what they mean for ``hvd_gradq.DistributedOptimizer``.
        allocator, trigger: rank 0 re-decides the bits of every coded layer when the trigger
            (default: similarity, tau 0.95, k_min 20) fires on the aggregated per-layer gradient
            norms, and broadcasts the codebook (mpi4py under ``horovodrun --mpi``, else Horovod's
            ``broadcast_object``); every rank switches at the same step.
        lr: the step size of the LAD metrics when the ``Allocator`` has no ``lr`` of its own: a
            number, a function returning one, or the optimizer (its first group's current
            ``lr``, so a scheduler is followed).
        label: the name error messages give (the drop-in passes its own).

    What is communicated per layer and step: see the module's docs; ``layer_plans()`` lists each
    layer's bits, transport, predicted and measured bytes, ``transport_summary()`` gives one line,
    ``step_timings()`` where each step's time went (on the stock path the wrapped optimizer's update
    counts as ``compute``, and ``wait`` includes the time Horovod blocks between ``decompress``
    calls), ``allocation_events`` every codebook switch. Checkpoints: ``compression_state_dict()``
    / ``load_compression_state_dict()``; Horovod elastic: ``hvd.elastic.TorchState(...,
    compressor=comp)``; after ``hvd.join()``: ``sync_codebook(root_rank=...)``.
    """

    #: what error messages tell the user to build identically on every rank
    label = "hvd_gradq.Compressor"

    def __init__(self, named_parameters: Iterable[tuple[str, torch.Tensor]], *, op=None, process_set=None,
                 coding: Coding | None = None, allocator: Allocator | None = None, trigger: Trigger | None = None,
                 lr: float | Callable[[], float] | torch.optim.Optimizer | None = None,
                 codec: str = "rotated", bits: int | Mapping[str, int] | Callable[[str], int] = 4,
                 ratio: float | None = None, rank: int | Mapping[str, int] | Callable[[str], int] = 4,
                 factors: str = "float32", bucket_size: int = 1024, transport: str | Mapping[str, str] = "auto",
                 link: LinkModel | str | None = None, min_elements: int = 1024, error_feedback: bool | str = "auto",
                 seed: int = 0, refit_levels: int | None = None, level_groups="layer", rotation: int = 4096,
                 rounding: str = "nearest", block_scales: str = "this_step", label: str | None = None) -> None:
        if label is not None:
            self.label = label
        if isinstance(named_parameters, torch.optim.Optimizer):
            raise TypeError(f"{self.label} takes named_parameters=model.named_parameters(), not the optimizer; pass "
                            "the compressor to hvd.DistributedOptimizer(opt, compression=comp)")
        self._params = named_list(named_parameters, self.label)
        self.op = op_name(op)
        self.process_set = hvd.global_process_set if process_set is None else process_set
        if not isinstance(self.process_set, hvd.ProcessSet):
            raise ValueError(f"process_set must be a horovod.torch ProcessSet, got {process_set!r}")
        given = locals()  # the coding keywords have the names of Coding's fields
        coding = Coding.of(coding, **{key: given[key] for key in CODING_KEYWORDS})
        trigger = check_reallocation(coding, allocator, trigger)
        self._lr = self._learning_rate(lr, allocator)
        if not hvd.is_initialized():
            raise ValueError(f"{self.label}: call hvd.init() before building the compressor (it plans every layer "
                             "for the number of ranks)")
        included = self.process_set.included()
        if coding.link == "measure":
            coding = replace(coding, link=measure_link(self.process_set) if included else LinkModel())
        self.coding = coding
        trainable = [(n, p) for n, p in self._params if p.requires_grad]
        if not trainable:
            raise ValueError(f"{self.label}: no parameter of named_parameters requires grad")

        def make_exchange() -> GradientExchange:  # again after an elastic reset, for the new process set
            return GradientExchange(trainable, coding=coding, collectives=HorovodCollectives(self.process_set),
                                    op=self.op, label=self.label)

        self._make_exchange = make_exchange
        #: the engine: plan, codebook, coders and residuals of this rank (None outside the process set)
        self.gradient_exchange = make_exchange() if included else None  # settings errors surface here
        #: the reallocation step after every exchange (refit, trigger, allocate, apply)
        self.reallocation = Reallocator(allocator, trigger, HorovodChannel(self.process_set) if included else None,
                                        is_root=included and self.process_set.rank() == 0)
        self._step = 0
        self._by_name = dict(self._params)
        self._trainable = dict(trainable)
        self._names = GradientNames(self._params, self.label)
        # the step in progress: exchanges launched, aggregates returned, whether the dependent rounds started
        self._launched: dict[str, Exchange] = {}
        self._done: dict[str, torch.Tensor] = {}
        self._finishing = False
        self._clock = StepClock()
        #: step timings close at the step's last decompress (False: the optimizer closes them after
        #: its update, ``close_after_update``)
        self.closes_steps = True
        self._last_exit = 0.0  # end of the latest compress/decompress call
        #: per layer, what it handed to the collectives in its latest step
        self.payloads: dict[str, PayloadInfo] = {}

    def _learning_rate(self, lr, allocator: Allocator | None) -> Callable[[], float]:
        if lr is None:
            if allocator is not None and allocator.metric in _LR_METRICS and allocator.lr is None:
                raise ValueError(f"{self.label}: the allocator's metric {allocator.metric!r} needs the step size: pass "
                                 "lr= (a number, or the optimizer: lr=opt) to the compressor, or Allocator(lr=...)")
            return lambda: 0.0
        if isinstance(lr, torch.optim.Optimizer):
            return lambda: float(lr.param_groups[0]["lr"])
        if callable(lr):
            return lambda: float(lr())
        checks.number(lr, "lr", positive=True)
        return lambda: float(lr)

    # ---- Horovod's Compressor interface ---------------------------------------------------------
    def compress(self, tensor: torch.Tensor):
        with self._clock.inside():
            payload, ticket = self._compress(tensor)
        self._last_exit = time.perf_counter()
        return payload, ticket

    def _compress(self, tensor: torch.Tensor):
        if tensor is None:
            raise ValueError(
                f"{self.label} was handed no gradient: hvd.DistributedOptimizer(groups=...) does not give zeros to "
                "a parameter without a gradient (unused in this step). Leave groups unset, or use every parameter.")
        if tensor.is_sparse:  # Horovod's grouped path (groups=) hands sparse gradients over as they are
            raise ValueError(
                f"{self.label} compresses dense gradients only; this parameter has a sparse gradient (e.g. "
                "nn.Embedding(sparse=True)) and hvd.DistributedOptimizer(groups=...) does not densify it. Leave "
                "groups unset (sparse gradients then work with sparse_as_dense=True or False), or build the layer "
                "with sparse=False."
            )
        name = self._names.name_of(tensor)
        engine = self.gradient_exchange
        if engine is None:
            raise ValueError(
                f"{self.label}: this rank is not in the compressor's process_set, but the optimizer reduces over a "
                "process set it is in. Pass the same process_set= to the compressor and to hvd.DistributedOptimizer.")
        if name not in engine.plans:
            raise ValueError(
                f"{self.label}: parameter {name!r} did not require grad when the compressor was built, so it has no "
                "plan. Build the compressor after setting requires_grad, right before hvd.DistributedOptimizer.")
        if self._finishing:
            raise RuntimeError(
                f"{self.label}: gradient of {name!r} handed over after this step's first decompress(), before every "
                "layer of the step was decompressed (a step that raised?). Build a new optimizer and compressor, or "
                "restore the elastic state.")
        if name in self._launched:
            raise RuntimeError(f"{self.label}: gradient of {name!r} handed over twice in one step")
        if not self._launched and (self.process_set.size(), self.process_set.rank()) != (engine.size, engine.rank):
            self.elastic_resync()  # a step's first gradient after the set of workers changed (elastic)
            engine = self.gradient_exchange
        frozen = not self._by_name[name].requires_grad
        plan = engine.plans[name]
        # coded this step: not a float32 layer, nor a lane layer's calibration step, nor a frozen one
        packed = not frozen and plan.transport != NONE and (
            engine.codebook[name].packed if plan.transport in (ALLREDUCE, FLOAT32) else True)
        ex = engine.launch(name, tensor, frozen=frozen, carry=self.op == SUM)
        self._launched[name] = ex
        # The placeholder's digest is the codebook as launched, taken before any round advances:
        # a layer whose first round (this step's statistics) completes in the loop below changes
        # its scales, and whether it completes there depends on timing, not on the rank.
        handed = (ex.payload, _Ticket(name, True, packed)) if ex.carried else \
            (self._placeholder(name), _Ticket(name, False, packed))
        for other in self._launched.values():  # finished first rounds start their second now: overlap
            if other.waiting:
                with suppress(Exception):  # an error is kept by the exchange and raised at its decompress
                    other.advance_if_ready()
        return handed

    def _placeholder(self, name: str) -> torch.Tensor:
        """The summed header Horovod reduces in place of a layer that travels by our collectives."""
        engine = self.gradient_exchange
        return header_words(rank=engine.rank, size=engine.size, digest=engine.codebook.digest(name, engine.size),
                            nonfinite=False, stat=0.0, container=torch.int64 if self.op == SUM else torch.float64)

    def decompress(self, payload: torch.Tensor, ctx):
        if ctx is None:
            # Horovod's own sparse path (a sparse gradient, sparse_as_dense=False): it allgathered the
            # values and indices exactly, without calling compress; there is nothing to decode
            return payload
        start = time.perf_counter()
        if self._launched and self._last_exit:  # Horovod blocked on its handle since our last call
            gap = start - self._last_exit
            self._clock.own += gap
            self.gradient_exchange.timer.add("wait", gap)
        try:
            with self._clock.inside():
                out = self._decompress(payload, ctx)
        finally:
            self._last_exit = time.perf_counter()
        return out

    def _decompress(self, payload: torch.Tensor, ticket: _Ticket) -> torch.Tensor:
        name = ticket.name
        engine = self.gradient_exchange
        try:
            if not self._finishing:  # first the ranks' codebooks (named differences), then the rounds
                self._start_dependent_rounds()
            if not ticket.carried:  # op, ranks and the codebook digest, from Horovod's reduction
                read_header(payload, size=engine.size, op=self.op, layer=name, compressor=self.label)
            ex = self._launched[name]
            if ex.carried:
                ex.deliver(payload)
            extra = 0 if ticket.carried else payload.numel() * payload.element_size()
            out = engine.finish(name, ex, extra)
        except (ReductionMismatchError, CodebookMismatchError) as e:
            # Every rank reaches this verdict from the same reduced words, but a fast rank must not
            # exit (shutting Horovod down) while a slow one is still submitting this step's
            # gradients: meet in a barrier first. Not when ranks have joined (hvd.join()): they take
            # no part in a barrier.
            self._clear_step()
            if e.ranks in (None, engine.size):
                engine.collectives.barrier()
            raise
        self.payloads[name] = PayloadInfo(payload.dtype, ex.payload_bytes + extra, engine.plans[name].numel,
                                          ticket.packed)
        p = self._by_name[name]
        shaped = out.view(p.shape).to(p.dtype)
        self._done[name] = shaped
        if len(self._done) == len(self._launched):
            self._end_step()
        return shaped

    def _start_dependent_rounds(self) -> None:
        """At the step's first decompress: every rank has launched every layer of the step.
        Compare the codebooks (a new engine's first step), let the step's low-rank bucket go
        without the layers Horovod reduced itself, and start every second round still pending,
        in codebook order."""
        self._finishing = True
        engine = self.gradient_exchange
        try:  # before any wait: ranks whose codebooks differ may be running different collectives
            engine.agree()
        except CodebookMismatchError:
            self._launched.clear()  # their exchanges may never complete: none is waited for
            raise
        missing = [n for n in engine.plans if n not in self._launched]
        if missing:
            engine.excuse(missing)
        for name in engine.plans:
            ex = self._launched.get(name)
            if ex is not None and ex.waiting:
                with suppress(Exception):  # an error is kept by the exchange and raised at its decompress
                    ex.advance()

    def _end_step(self) -> None:
        engine = self.gradient_exchange
        step, self._step = self._step, self._step + 1
        grads = dict(self._done)
        self._clear_step()
        with self._clock.phase("allocation"):
            self.reallocation.after_step(step, [engine], self._trainable, grads, self._lr())
        if self.closes_steps:
            self._clock.close(engine)

    def _clear_step(self) -> None:
        self._launched.clear()
        self._done.clear()
        self._names.clear()
        self._finishing = False

    def _in_step(self) -> bool:
        return bool(self._launched)

    def close_after_update(self, seconds: float) -> None:
        """The optimizer's update took ``seconds``: close the step's timings now (the drop-in, which
        sets ``closes_steps = False``; Horovod's optimizer does not tell its compressor)."""
        self._clock.phases["update"] += seconds
        if self.gradient_exchange is not None:
            self._clock.close(self.gradient_exchange)
