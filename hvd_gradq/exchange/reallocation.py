"""The reallocation step after every exchange, one for the job and the simulation.

In order: the root refits the adaptive levels when due and shares them; the root's trigger sees
the aggregated per-layer gradient norms and its verdict is shared with the step as a cross-check;
when it fires, the root allocates (with the exact LAD metric, every rank evaluates a part of the
table: ``decide_bits_spread``) and shares the new codebook, which every rank applies before the
next step; the allocation is recorded as an ``AllocationEvent``. What "share" means is the
``Channel``'s: Horovod broadcasts in a job (``horovod.channel``), nothing at all in the
simulation, where every rank's engine is in this process (``LocalChannel``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Protocol

import torch

from hvd_gradq.alloc import AllocationEvent, Allocator, Trigger
from hvd_gradq.alloc.allocator import Evaluation
from hvd_gradq.exchange.engine import GradientExchange

_log = logging.getLogger("hvd_gradq")


class Channel(Protocol):
    """How the root's decisions reach every rank."""

    #: what carries them, for the log ("mpi4py", "horovod", "in-process")
    name: str

    def decide(self, fire: bool, step: int) -> bool:
        """The root's verdict at ``step`` on every rank."""

    def share(self, payload):
        """The root's picklable ``payload`` on every rank."""

    def gather(self, obj, name: str = "hvd_gradq.gather") -> list:
        """Every rank's picklable ``obj``, in rank order, on every rank (``name``: the collective's)."""

    def ranks(self) -> tuple[int, int]:
        """(this process's rank, the number of ranks) among those the channel joins."""


class LocalChannel:
    """Every rank in this process: the root's decisions are everyone's already."""

    name = "in-process"

    def decide(self, fire: bool, step: int) -> bool:
        return fire

    def share(self, payload):
        return payload

    def gather(self, obj, name: str = "hvd_gradq.gather") -> list:
        return [obj]

    def ranks(self) -> tuple[int, int]:
        return 0, 1


def decide_bits(allocator: Allocator, exchange: GradientExchange, params: Mapping[str, torch.Tensor], step: int,
                lr: float, current: Mapping[str, int] | None = None) -> dict:
    """The root's allocation at ``step`` as the payload every rank applies with ``apply_bits``:
    the new codebook version and bits per layer, or the error (so that no rank waits for a
    decision that will not come). ``current``: the layers' options now (``Allocator.hysteresis``)."""
    try:
        alloc, cost = allocator.allocate(dict(params), exchange.quantizer(seed=step), lr=lr,
                                         wire_bits=exchange.wire_bits, factor_bits=exchange.factor_bits,
                                         current=current)
    except Exception as e:  # every rank must leave the broadcast: send the error instead
        return _error(e)
    return _payload(exchange, step, alloc, cost)


def _payload(exchange: GradientExchange, step: int, alloc, counts: Mapping) -> dict:
    """The codebook every rank applies (``apply_bits``) from the root's allocation."""
    return {"version": exchange.codebook.version + 1, "step": step, "bits": alloc.bits, "ranks": alloc.ranks,
            "summary": alloc.summary(), "forwards": counts["forwards"], "backwards": counts["backwards"]}


def _error(e: Exception) -> dict:
    return {"error": f"{type(e).__name__}: {e}"}


def _compact(obj):
    """``obj`` with every tensor copied to storage of its own: a batch sliced from a dataset is a
    view whose pickle would carry the whole dataset (measured: a 64-image batch of Fashion-MNIST
    pickled to the 188 MB training set and took 1-1.5 s to gather)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_compact(o) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_compact(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _compact(v) for k, v in obj.items()}
    return obj


def decide_bits_spread(allocator: Allocator, exchange: GradientExchange, params: Mapping[str, torch.Tensor],
                       step: int, lr: float, channel: Channel, current: Mapping[str, int] | None = None) -> dict | None:
    """``decide_bits`` with the exact LAD table split over the ranks (``Allocator.spread``); every
    rank calls it. Two gathers, the same on every rank whatever fails: the root's probe batches (or
    its error), then every rank's part of the table (or its error); then the root solves.
    Returns the root's payload on the root, None elsewhere (``share`` it)."""
    rank, size = channel.ranks()
    is_root = rank == 0
    batches = None
    if is_root:
        try:
            batches = {"batches": _compact(allocator.probe.get_batches())}
        except Exception as e:
            batches = _error(e)
    batches = channel.gather(batches, "hvd_gradq.lad.batches")[0]
    part = batches
    if "error" not in batches:
        try:
            part = allocator.evaluate(dict(params), exchange.quantizer(seed=step), lr=lr,
                                      batches=batches["batches"], part=(rank, size))
        except Exception as e:
            part = _error(e)
    parts = channel.gather(part, "hvd_gradq.lad.table")
    if not is_root:
        return None
    failed = [(r, p["error"]) for r, p in enumerate(parts) if isinstance(p, dict)]
    if failed:
        return {"error": "; ".join(f"rank {r}: {msg}" for r, msg in failed[:3])}
    try:
        ev = Evaluation.merge(parts)
        alloc = allocator.decide(ev, dict(params), exchange.wire_bits, exchange.factor_bits, current)
    except Exception as e:
        return _error(e)
    return _payload(exchange, step, alloc, ev.counts)


def apply_bits(payload: dict, exchange: GradientExchange, step: int) -> None:
    """Switch ``exchange`` to the codebook in the root's ``decide_bits`` payload (raises its error)."""
    if "error" in payload:
        raise RuntimeError(f"bit allocation on rank 0 failed at step {step}: {payload['error']}")
    exchange.replan(payload["bits"], payload["version"], payload.get("ranks"))


class Reallocator:
    """Refit, trigger, allocate, apply, record: the step after every exchange.

    ``is_root``: this process holds the root (rank 0 of the process set, or the simulation)."""

    def __init__(self, allocator: Allocator | None, trigger: Trigger | None, channel: Channel, *,
                 is_root: bool) -> None:
        self.allocator, self.trigger, self.channel, self.is_root = allocator, trigger, channel, is_root
        #: every codebook switch: step, version, summary, cost
        self.events: list[AllocationEvent] = []
        self.seconds = 0.0  # deciding bits: trigger verdicts, allocations, codebook shares
        self.started: float | None = None

    def after_step(self, step: int, exchanges: Sequence[GradientExchange], params: Mapping[str, torch.Tensor],
                   grads: Mapping[str, torch.Tensor], lr: float) -> AllocationEvent | None:
        """After the exchange of ``step``: ``exchanges[0]`` is the root's engine (the others, in a
        simulation, the other ranks'); ``params`` the parameters by name, ``grads`` the
        aggregated gradients by name (layers missing from it count as zero)."""
        root = exchanges[0]
        if self.started is None:
            self.started = time.perf_counter()
        if root.refit_due(step):  # every rank knows when: only the levels travel
            fitted = root.fit_levels(grads) if self.is_root else None
            fitted = self.channel.share(fitted)
            for ex in exchanges:
                ex.set_levels(fitted)
        if self.allocator is None:
            return None
        start = time.perf_counter()
        names = root.allocatable
        fire = False
        if self.is_root:
            norms = [float(grads[n].detach().float().norm()) if grads.get(n) is not None else 0.0 for n in names]
            fire = self.trigger.observe(step, norms)
        fire = self.channel.decide(fire, step)
        if not fire:
            self.seconds += time.perf_counter() - start
            return None
        via = self.channel.name  # asked before the share: after it, a finished peer may end MPI
        layers = {n: params[n] for n in names}
        codes = {n: (root.plans[n].bits, root.plans[n].rank) for n in names}
        current = {n: -r if r else b for n, (b, r) in codes.items()} if self.events else None
        if self.allocator.spreads and self.channel.ranks()[1] > 1:
            payload = decide_bits_spread(self.allocator, root, layers, step, lr, self.channel, current)
        else:
            payload = decide_bits(self.allocator, root, layers, step, lr, current) if self.is_root else None
        payload = self.channel.share(payload)
        for ex in exchanges:
            apply_bits(payload, ex, step)
        moved = [(codes[n], (root.plans[n].bits, root.plans[n].rank)) for n in names]
        seconds = time.perf_counter() - start
        self.seconds += seconds
        event = AllocationEvent(step, payload["version"], payload["summary"], seconds, payload["forwards"],
                                payload["backwards"], dict(payload["bits"]), dict(payload.get("ranks", {})),
                                changed=sum(a != b for a, b in moved),
                                rank_changes=sum(a[1] != b[1] for a, b in moved))
        self.events.append(event)
        if self.is_root:
            _log.info("step %d: codebook v%d (%s) in %.3f s, %d forward passes, via %s", step, event.version,
                      event.summary, seconds, event.forwards, via)
        return event

    def overhead(self, version: int) -> dict:
        """Allocations, seconds deciding bits, forward passes, and that time as a fraction of the
        wall clock since the first step."""
        wall = time.perf_counter() - self.started if self.started is not None else 0.0
        return {"allocations": len(self.events), "seconds": self.seconds,
                "forwards": sum(e.forwards for e in self.events),
                "fraction": self.seconds / wall if wall > 0 else 0.0, "version": version}

    @property
    def config(self) -> dict:
        return {"allocator": None if self.allocator is None else repr(self.allocator),
                "trigger": None if self.trigger is None else repr(self.trigger)}

    def state_dict(self) -> dict:
        return {"trigger": None if self.trigger is None else self.trigger.state_dict(),
                "allocator": None if self.allocator is None else self.allocator.state_dict(),
                "events": [asdict(e) for e in self.events], "alloc_seconds": self.seconds}

    def load_state_dict(self, state: Mapping) -> None:
        if self.trigger is not None:
            self.trigger.load_state_dict(state["trigger"])
            self.allocator.load_state_dict(state["allocator"])
        self.events = [AllocationEvent(**e) for e in state["events"]]
        self.seconds = state["alloc_seconds"]

    def reset(self) -> None:
        """Forget the trigger's anchor and the allocator's schedule: the next step re-allocates."""
        if self.trigger is not None:
            self.trigger.reset()
            self.allocator.reset()
