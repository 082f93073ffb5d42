"""What a ``Compressor`` reports: bytes per layer against float32 (``PayloadInfo``, ``WireStats``),
the plans, one summary line, step timings, the allocator's events and overhead, the coding error.
A mixin of ``horovod.compressor.Compressor`` (the drop-in optimizer hands these on to its own)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hvd_gradq.alloc import AllocationEvent, Allocator, Trigger
from hvd_gradq.codebook import Codebook
from hvd_gradq.plan.planner import LayerPlan


@dataclass(frozen=True)
class PayloadInfo:
    """What one layer handed to the collectives in its latest step."""

    dtype: torch.dtype  # of what Horovod's allreduce carried (the payload, or the placeholder)
    nbytes: int  # everything this rank handed to collectives for the layer (placeholder included)
    numel: int  # elements of the gradient (not of the payload)
    packed: bool  # True: coded; False: float32 (a tiny layer, a calibration step, a frozen layer)


@dataclass(frozen=True)
class WireStats:
    """Bytes handed to the collectives in the latest step of every layer, against float32."""

    payload_bytes: int
    fp32_bytes: int
    elements: int
    packed_layers: int
    float_layers: int

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.payload_bytes / max(1, self.elements)

    @property
    def ratio(self) -> float:
        """payload bytes / float32 bytes (smaller is better)."""
        return self.payload_bytes / max(1, self.fp32_bytes)

    def __str__(self) -> str:
        return (
            f"{self.bits_per_element:.2f} bits/element on the wire, {self.payload_bytes} B vs "
            f"{self.fp32_bytes} B fp32 ({1 / max(self.ratio, 1e-12):.1f}x smaller; "
            f"{self.packed_layers} coded, {self.float_layers} float32 layers)"
        )


class CompressionReport:
    """Methods of ``Compressor`` (``gradient_exchange``, ``reallocation``, ``payloads``, ``_step``)."""

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

    @property
    def codebook(self) -> Codebook:
        return self.gradient_exchange.codebook

    @property
    def steps(self) -> int:
        """Steps exchanged so far (the reallocation's step count)."""
        return self._step

    @property
    def error_feedback(self):
        """The lanes' residuals (``codecs.ErrorFeedback``; the gathered codes' are in
        ``gradient_exchange.residuals``)."""
        return self.gradient_exchange.residuals.lanes

    @property
    def timer(self):
        """This step's seconds per phase so far (``exchange.timings.StepTimer``: ``current``, ``history``)."""
        return self.gradient_exchange.timer

    def layer_plans(self) -> list[LayerPlan]:
        """Per layer: bits, codec, chosen transport, predicted and measured payload bytes."""
        return list(self.gradient_exchange.plans.values())

    def step_timings(self, last: int | None = None) -> list[dict]:
        """This rank's steps, oldest first (``last``: the latest ones): seconds of ``compute``,
        ``encode``, ``decode``, ``wait``, ``allocation``, ``update``, ``other``, their sum ``step``
        and ``bytes`` handed to the collectives (see the class docs for the stock path's
        ``compute`` and ``wait``). Empty in a one-process job (Horovod calls no compressor)."""
        ex = self.gradient_exchange
        records = [] if ex is None else list(ex.timer.history)
        return records if last is None else records[-last:]

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
        """One line: layers per transport and bytes of the latest step vs float32 (placeholders
        included), and with an allocator the codebook version and the time spent deciding."""
        ex = self.gradient_exchange
        plans = ex.plans.values()
        sent = sum(self.payloads[p.name].nbytes if p.name in self.payloads else p.payload_bytes for p in plans)
        line = ex.summary(sent)
        if self.allocator is not None:
            o = self.allocation_overhead()
            line += (f"; codebook v{o['version']}, {o['allocations']} allocations, {o['seconds']:.2f} s deciding "
                     f"({100 * o['fraction']:.1f}% of training)")
        return line

    def wire_stats(self) -> WireStats:
        """Bytes of the latest step of every layer seen so far (placeholders included), against float32."""
        vals = self.payloads.values()
        return WireStats(payload_bytes=sum(v.nbytes for v in vals), fp32_bytes=sum(4 * v.numel for v in vals),
                         elements=sum(v.numel for v in vals), packed_layers=sum(1 for v in vals if v.packed),
                         float_layers=sum(1 for v in vals if not v.packed))

    def bits(self) -> dict[str, int]:
        """Bits per layer now (32 for float32 layers; low-rank layers: 32, see ``layer_plans``)."""
        return {p.name: p.bits for p in self.layer_plans()}
