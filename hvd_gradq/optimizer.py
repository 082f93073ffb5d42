"""``hvd_gradq.DistributedOptimizer``: a drop-in for ``hvd.DistributedOptimizer`` whose layers
can travel by lane allreduce, allgather or the two-phase exchange, chosen per layer by the cost
model, with one codebook on every rank.

Glue only: the plan (``LayerPlan``, built by ``plan_layers``) asks the codecs and the cost model,
the exchanges live in ``transport``, the frames in ``layer_coder``, the lanes in ``compressor``.
The optimizer class is created from the wrapped optimizer's class, as Horovod does, so
``isinstance(opt, type(original))`` holds and the update rule is the original one.
"""
from __future__ import annotations

import abc
import logging
import math
import os
import re
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass

import horovod.torch as hvd
import torch

from hvd_gradq import checkpoint, cost_model, wire
from hvd_gradq.alloc import AllocationEvent, Allocator
from hvd_gradq.broadcast import broadcast_codebook, broadcast_decision, gather_objects, transport_name
from hvd_gradq.codebook import FLOAT_BITS, Codebook, LayerCode
from hvd_gradq.codecs import LEVEL_CODECS, AdaptiveLevelCodec, Codec, DitherSource, ErrorFeedback, make_codec
from hvd_gradq.codecs.uniform import abs_max
from hvd_gradq.compressor import UniformCompressor
from hvd_gradq.cost_model import ALLGATHER, ALLREDUCE, FLOAT32, NONE, TRANSPORTS, TWO_PHASE, LinkModel, TransportCost
from hvd_gradq.layer_coder import GatherCoder
from hvd_gradq.packing import lane_layout
from hvd_gradq.transport import (
    Allgather,
    Exchange,
    HorovodCollectives,
    LaneAllreduce,
    Skip,
    TwoPhase,
    measure_link,
)
from hvd_gradq.trigger import Trigger

_log = logging.getLogger("hvd_gradq")

#: codecs the optimizer takes: "uniform" (shared scale: summable, so allreduce is open to it;
#: gathered as qsgdinf, the same uniform levels with a per-bucket scale), every level codec, and the
#: sparse codecs that take a ratio instead of bits: jointsq and DGC-style top-k
RATIO_CODECS = ("jointsq", "topk")
CODECS = ("uniform", *sorted(LEVEL_CODECS), *RATIO_CODECS)


@dataclass
class LayerPlan:
    """One layer's decision and its predicted cost (``costs``: every transport that was priced)."""

    name: str
    numel: int
    bits: int
    codec: str
    transport: str
    predicted: TransportCost
    costs: dict[str, TransportCost]
    payload_bytes: int = 0  # measured at the collectives, latest step

    def __str__(self) -> str:
        return (f"{self.name}: {self.numel} el, {self.codec}@{self.bits}b via {self.transport}, "
                f"{self.payload_bytes} B (predicted {self.predicted.payload_bytes} B)")


def _check_bits(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 8:
        raise ValueError(f"{where}: bits must be an integer in 0..8 (0 = not sent), got {value!r}")
    return value


def _per_layer(spec, names: list[str], default, what: str) -> dict[str, object]:
    """Resolve a scalar / {name or regex: value} / callable(name) spec to a value per layer."""
    if callable(spec) and not isinstance(spec, (str, int)):
        return {n: spec(n) for n in names}
    if isinstance(spec, Mapping):
        out = dict.fromkeys(names, default)
        for pattern, value in spec.items():
            hits = [n for n in names if n == pattern or re.fullmatch(str(pattern), n)]
            if not hits:
                raise ValueError(
                    f"{what}: {pattern!r} matches no parameter name; names are e.g. {names[:4]} "
                    "(keys are exact names or full-match regular expressions)"
                )
            for n in hits:
                out[n] = value
        return out
    return dict.fromkeys(names, spec)


class GradientExchange:
    """The per-layer plan, codebook, codecs and error feedback behind the optimizer."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], *, op, collectives: HorovodCollectives, codec: str,
                 bits, ratio, bucket_size: int, transport, link: LinkModel, min_elements: int,
                 error_feedback: bool | str, seed: int, refit_levels: int = 0) -> None:
        self.op = op
        #: the collectives the exchanges run on: Horovod's (a job) or hvd_gradq.simulate's (N ranks in one process)
        self.collectives = collectives
        self.size = collectives.size()
        self.rank = collectives.rank()
        self.link = link
        self.codebook = Codebook()
        self._track_error = False
        #: refit adaptive levels (ALQ/AMQ) after every this many steps (0: never)
        self.refit_levels = refit_levels
        self.seed = seed
        self.rng = DitherSource([seed, self.rank])
        self._coders_made = 0  # each coder draws from its own stream (see _plan)
        self.error_feedback = error_feedback
        self.worker_feedback = ErrorFeedback()
        self.server_feedback = ErrorFeedback()
        self.zero_bit_feedback = ErrorFeedback()
        # lanes (uniform codec on allreduce, and float32 for tiny layers) ride the same codebook
        self.lanes = UniformCompressor(bits=1, named_parameters=named, op=hvd.Sum, min_elements=min_elements,
                                       seed=seed, codebook=self.codebook, collectives=collectives)
        self.lanes.label = "hvd_gradq.DistributedOptimizer"
        self.coders: dict[str, GatherCoder] = {}
        self.plans: dict[str, LayerPlan] = {}
        self.codec, self.ratio, self.bucket_size, self.min_elements = codec, ratio, bucket_size, min_elements
        #: residuals moved out of a layer's error feedback when its coding changed; sent next step
        self.carry: dict[str, torch.Tensor] = {}
        names = [n for n, _ in named]
        self.numel = {n: p.numel() for n, p in named}
        bits_of = _per_layer(bits, names, 4, "bits")
        self.forced = _per_layer(transport, names, "auto", "transport")
        for name, p in named:
            b = _check_bits(bits_of[name], f"layer {name!r}")
            t = self.forced[name]
            if t != "auto" and t not in TRANSPORTS:
                raise ValueError(f"layer {name!r}: transport must be 'auto' or one of {TRANSPORTS}, got {t!r}")
            self._plan(name, p.numel(), codec, b, ratio, bucket_size, t, min_elements)

    @property
    def allocatable(self) -> list[str]:
        """Layers whose bit width an allocator may set (not the exact float32 ones)."""
        return [n for n, plan in self.plans.items() if plan.transport != FLOAT32]

    def replan(self, bits: Mapping[str, int], version: int) -> None:
        """Switch to a new codebook version with these per-layer bit widths (all ranks, same step).

        What the old coding still owed a changed layer (its residuals, including the two-phase
        requantization residual of this rank's chunk) is carried into the layer's next step."""
        for name, b in bits.items():
            plan = self.plans.get(name)
            if plan is None or plan.transport == FLOAT32:
                raise ValueError(f"cannot allocate bits to layer {name!r}: not a coded layer of this optimizer")
            _check_bits(b, f"layer {name!r}")
            if b == plan.bits:
                continue
            owed = self.take_owed(name)
            if owed is not None:
                self.carry[name] = owed
            old_scale = self.codebook[name].scale if plan.transport == ALLREDUCE else None
            self._plan(name, plan.numel, self.codec, b, self.ratio, self.bucket_size, self.forced[name],
                       self.min_elements)
            if self.plans[name].transport == ALLREDUCE:
                self.codebook[name].scale = old_scale  # no float32 recalibration step
        self.codebook.version = version

    def take_owed(self, name: str) -> torch.Tensor | None:
        """Remove and return everything this rank's coding of layer ``name`` still owes (its
        residuals, the requantization residual of its two-phase chunk, what was carried), as one
        flat float32 tensor; None if nothing."""
        owed = torch.zeros(self.numel[name], dtype=torch.float32)
        for store in (self.worker_feedback, self.zero_bit_feedback, self.lanes.error_feedback):
            r = store.pop(name)
            if r is not None:
                owed += r
        coder = self.coders.pop(name, None)
        r = self.server_feedback.pop(name)
        if r is not None and coder is not None:
            owed[coder.bounds[coder.rank]:coder.bounds[coder.rank + 1]] += r
        carried = self.carry.pop(name, None)
        if carried is not None:
            owed += carried
        return owed if bool(owed.any()) else None

    def shared_codebook(self) -> dict:
        """What every rank must take from the root after the set of workers changed: per-layer
        bits, shared scale and reduction count, and the codebook version."""
        return {"version": self.codebook.version,
                "layers": {c.name: (c.bits, c.scale, c.version) for c in self.codebook}}

    def adopt(self, shared: dict) -> None:
        """Follow the root's ``shared_codebook()`` (between steps: a fresh exchange after the set of
        workers changed, or this one after ``hvd.join()``)."""
        bits = {n: b for n, (b, _, _) in shared["layers"].items() if self.plans[n].transport != FLOAT32}
        self.replan(bits, shared["version"])
        for name, (_, scale, version) in shared["layers"].items():
            entry = self.codebook[name]
            entry.scale, entry.version = scale, version

    def quantizer(self, seed: int = 0):
        """``quantize(name, bits, g)``: what layer ``name``'s codec makes of ``g`` at ``bits``
        (for the allocator's distortion metrics; uniform is taken with a per-bucket scale)."""
        rng = DitherSource([seed, 0x51])
        cache: dict[int, Codec] = {}

        def quantize(name: str, bits: int, g: torch.Tensor) -> torch.Tensor:
            if bits == 0:
                return torch.zeros_like(g)
            codec = cache.get(bits)
            if codec is None:
                codec = cache[bits] = self._gather_codec(self.codec, bits, self.ratio, self.bucket_size)
            return codec.roundtrip(g, rng)

        return quantize

    # ---- adaptive levels (ALQ / AMQ) ---------------------------------------------------------------
    def fit_levels(self, grads: Mapping[str, torch.Tensor]) -> dict[str, dict]:
        """Rank 0: fit the level set of every layer coded with an adaptive codec (ALQ, AMQ; 3 bits
        or more) to that layer's aggregated gradient in ``grads``; returns {layer: codec state}
        for every rank's ``set_levels``."""
        out = {}
        for name, coder in self.coders.items():
            if isinstance(coder.codec, AdaptiveLevelCodec) and coder.codec.bits > 2 and name in grads:
                coder.codec.fit(grads[name])
                out[name] = coder.codec.state_dict()
        return out

    def refit_due(self, step: int) -> bool:
        """Whether rank 0 refits the adaptive levels after ``step`` (the same answer on every rank)."""
        return bool(self.refit_levels) and step % self.refit_levels == 0 and any(
            isinstance(c.codec, AdaptiveLevelCodec) and c.codec.bits > 2 for c in self.coders.values())

    def set_levels(self, levels: Mapping[str, dict]) -> None:
        """Adopt rank 0's fitted levels (every rank, the same step). They enter the layer's
        codebook digest, so a rank that missed them is caught at the next exchange."""
        for name, state in levels.items():
            coder = self.coders[name]
            coder.codec.load_state_dict(state)
            fitted = zlib.crc32(coder.codec.levels.numpy().tobytes())
            self.codebook[name].codec_key = f"bucket={self.bucket_size};levels={fitted:08x}"

    def coding_error(self) -> tuple[float, float]:
        """(sum of ||decoded - x||^2, sum of ||x||^2) over the gather-coded layers of this rank's
        latest step (its normalised coding variance is their ratio); needs ``track_error``."""
        err = energy = 0.0
        for coder in self.coders.values():
            if coder.last_error is not None:
                err += coder.last_error[0]
                energy += coder.last_error[1]
        return err, energy

    @property
    def track_error(self) -> bool:
        return self._track_error

    @track_error.setter
    def track_error(self, on: bool) -> None:
        self._track_error = bool(on)
        for coder in self.coders.values():
            coder.track_error = self._track_error

    def wire_bits(self, name: str, bits: int) -> float:
        """Bits handed to the collectives per step if layer ``name`` were coded at ``bits``."""
        if bits == 0:
            return 0.0
        codec = self._gather_codec(self.codec, bits, self.ratio, self.bucket_size)
        coder = GatherCoder(name, self.numel[name], codec, rank=self.rank, size=self.size, rng=self.rng,
                            worker_feedback=None, server_feedback=None)
        costs = self._costs(name, self.numel[name], self.codec, bits, coder)
        forced = self.forced[name]
        cost = costs[forced] if forced in costs else cost_model.cheapest([costs[t] for t in TRANSPORTS
                                                                            if t in costs])
        return 8.0 * cost.payload_bytes

    # ---- checkpoint -----------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """The settings a saved state must have been made with to resume here."""
        return {"codec": self.codec, "ratio": self.ratio, "bucket_size": self.bucket_size,
                "min_elements": self.min_elements, "error_feedback": self.error_feedback,
                "op": "sum" if self.op == hvd.Sum else "average"}

    def state_dict(self) -> dict:
        """This rank's compression state: codebook, residuals, carried residuals, dither streams
        and the coders' own state."""
        stores = {"worker": self.worker_feedback, "server": self.server_feedback, "zero_bit": self.zero_bit_feedback,
                  "lanes": self.lanes.error_feedback}
        return {
            "codebook": {"version": self.codebook.version,
                         "layers": {c.name: {"bits": c.bits, "scale": c.scale, "version": c.version,
                                             "transport": c.transport} for c in self.codebook}},
            "feedback": {k: v.state_dict() for k, v in stores.items()},
            "carry": {k: v.clone() for k, v in self.carry.items()},
            "rng": self.rng.state_dict(),
            "lanes_rng": self.lanes.rng.state_dict(),
            "coders": {n: c.state_dict() for n, c in self.coders.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()`` of the same rank of a job with the same model, size and
        settings (checked by the caller): the plan follows the saved bits and transports."""
        for name, code in state["codebook"]["layers"].items():
            plan = self.plans[name]
            if plan.transport != FLOAT32 and (code["bits"], code["transport"]) != (plan.bits, plan.transport):
                self.coders.pop(name, None)
                forced = code["transport"] if code["transport"] in TRANSPORTS else "auto"
                self._plan(name, plan.numel, self.codec, code["bits"], self.ratio, self.bucket_size, forced,
                           self.min_elements)
            entry = self.codebook[name]
            entry.scale, entry.version = code["scale"], code["version"]
        self.codebook.version = state["codebook"]["version"]
        fb = state["feedback"]
        self.worker_feedback.load_state_dict(fb["worker"])
        self.server_feedback.load_state_dict(fb["server"])
        self.zero_bit_feedback.load_state_dict(fb["zero_bit"])
        self.lanes.error_feedback.load_state_dict(fb["lanes"])
        self.carry = {k: v.clone() for k, v in state["carry"].items()}
        self.rng.load_state_dict(state["rng"])
        self.lanes.rng.load_state_dict(state["lanes_rng"])
        for name, coder_state in state["coders"].items():
            self.coders[name].load_state_dict(coder_state)

    def reset_state(self) -> None:
        """Forget every residual and what was carried (the plan and the codebook stay)."""
        for store in (self.worker_feedback, self.server_feedback, self.zero_bit_feedback, self.lanes.error_feedback):
            store.residuals.clear()
        self.carry.clear()

    # ---- planning -------------------------------------------------------------------------------------
    def _gather_codec(self, codec: str, bits: int, ratio, bucket_size: int) -> Codec:
        if codec in RATIO_CODECS:
            return make_codec(codec, ratio=ratio)
        return make_codec("qsgdinf" if codec == "uniform" else codec, bits, bucket_size=bucket_size)

    def _plan(self, name: str, numel: int, codec: str, bits: int, ratio, bucket_size: int, forced: str,
              min_elements: int) -> None:
        n = self.size
        if numel < min_elements:  # tiny layers: exact float32 allreduce (header included)
            cost = cost_model.allreduce_cost(self.lanes.payload_bytes(numel, packed=False), n, self.link, FLOAT32)
            self.codebook.add(LayerCode(name, numel, FLOAT_BITS, None, codec="float32", transport=FLOAT32))
            self.plans[name] = LayerPlan(name, numel, FLOAT_BITS, "float32", FLOAT32, cost, {FLOAT32: cost})
            return
        if bits == 0:
            cost = cost_model.none_cost()
            self.codebook.add(LayerCode(name, numel, 0, None, codec=codec, transport=NONE))
            self.plans[name] = LayerPlan(name, numel, 0, codec, NONE, cost, {NONE: cost})
            return
        gcodec = self._gather_codec(codec, bits, ratio, bucket_size)
        # error feedback for biased codes (JointSQ drops elements); unbiased ones (QSGD & co.) do
        # without by default: their variance would accumulate in the residual
        ef = self.error_feedback is True or (self.error_feedback == "auto" and not gcodec.unbiased)
        # A stream per coder, not one shared by all layers: two-phase second halves run when
        # their first half completes, an order that varies from run to run, and the dither must not
        self._coders_made += 1
        rng = DitherSource([self.seed, self.rank, zlib.crc32(name.encode()), self._coders_made])
        coder = GatherCoder(name, numel, gcodec, rank=self.rank, size=n, rng=rng,
                            worker_feedback=self.worker_feedback if ef else None,
                            server_feedback=self.server_feedback if ef else None)
        coder.what = "hvd_gradq.DistributedOptimizer"
        coder.track_error = self._track_error
        costs = self._costs(name, numel, codec, bits, coder)
        if forced == "auto":
            choice = cost_model.cheapest([costs[t] for t in TRANSPORTS if t in costs]).transport
        elif forced not in costs:
            raise ValueError(
                f"layer {name!r}: transport {forced!r} needs summable codes (codec='uniform'); codec {codec!r} "
                f"can use {sorted(costs)}"
            )
        else:
            choice = forced
        key = f"ratio={ratio}" if codec in RATIO_CODECS else f"bucket={bucket_size}"
        if choice == ALLREDUCE:
            layout = lane_layout(bits, n, torch.int64)
            self.codebook.add(LayerCode(name, numel, bits, layout, codec="uniform", transport=ALLREDUCE))
        else:
            self.codebook.add(LayerCode(name, numel, bits, None, codec=gcodec.name, transport=choice, codec_key=key))
            self.coders[name] = coder
        self.plans[name] = LayerPlan(name, numel, bits, codec, choice, costs[choice], costs)

    def _costs(self, name: str, numel: int, codec: str, bits: int, coder: GatherCoder) -> dict[str, TransportCost]:
        n = self.size
        costs = {
            ALLGATHER: cost_model.allgather_cost(coder.frame_bytes(), n, self.link),
            TWO_PHASE: self._two_phase_cost(coder),
        }
        if codec == "uniform":
            costs[ALLREDUCE] = cost_model.allreduce_cost(self.lanes.payload_bytes(numel, bits=bits), n, self.link)
        return costs

    def _two_phase_cost(self, coder: GatherCoder) -> TransportCost:
        chunks = coder.chunk_frame_bytes()
        per_rank = [cost_model.two_phase_cost(chunks, chunks, r, self.link) for r in range(self.size)]
        mine = per_rank[self.rank]
        # the choice must be the same on every rank: price the slowest rank
        slowest = max(c.seconds for c in per_rank)
        return TransportCost(TWO_PHASE, mine.payload_bytes, mine.sent_bytes, mine.received_bytes, mine.steps, slowest)

    # ---- one step -------------------------------------------------------------------------------------
    def launch(self, name: str, grad: torch.Tensor, frozen: bool = False) -> Exchange:
        """Start layer ``name``'s exchange. ``frozen``: the parameter does not require grad now;
        it still takes part (every rank runs the same collectives) but its residuals are left alone."""
        plan = self.plans[name]
        owed = self.carry.pop(name, None)
        if owed is not None and not frozen:
            grad = grad.detach().reshape(-1).to(torch.float32) + owed
        if plan.transport == NONE:  # nothing leaves the rank; the gradient waits in error feedback
            g = grad.detach().reshape(-1).to(torch.float32)
            if not frozen and math.isfinite(abs_max(g)):
                self.zero_bit_feedback.buffer(name, g).add_(g)
            return Skip(plan.numel)
        if plan.transport in (ALLREDUCE, FLOAT32):
            payload, ctx = self.lanes.compress_layer(name, grad, frozen=frozen)
            return LaneAllreduce(name, payload, lambda out, ctx=ctx: self.lanes.decompress(out, ctx).reshape(-1),
                                 self.collectives, plan.transport)
        coder = self.coders[name]
        coder.stamp = (self.codebook.version, self.codebook.digest(name, self.size))
        coder.frozen = frozen
        if plan.transport == ALLGATHER:
            return Allgather(name, coder, grad, self.collectives)
        return TwoPhase(name, coder, grad, self.collectives)

    def finish(self, name: str, exchange: Exchange) -> torch.Tensor:
        """The layer's aggregate (float32, flat): sum over ranks, or mean for ``op=hvd.Average``."""
        out = exchange.result()
        plan = self.plans[name]
        plan.payload_bytes = exchange.payload_bytes
        if plan.transport not in (ALLREDUCE, FLOAT32):
            self.codebook[name].version += 1  # lanes advance it in decompress
        if self.op == hvd.Average:
            out = out / self.size
        return out


def decide_bits(allocator: Allocator, exchange: GradientExchange, params: dict[str, torch.Tensor], step: int,
                lr: float) -> dict:
    """Rank 0's allocation at ``step`` as the payload every rank applies with ``apply_bits``: the
    new codebook version and bits per layer, or the error (so that no rank waits for a decision
    that will not come)."""
    try:
        alloc, cost = allocator.allocate(params, exchange.quantizer(seed=step), lr=lr, wire_bits=exchange.wire_bits)
    except Exception as e:  # every rank must leave the broadcast: send the error instead
        return {"error": f"{type(e).__name__}: {e}"}
    return {"version": exchange.codebook.version + 1, "step": step, "bits": alloc.bits, "summary": alloc.summary(),
            "forwards": cost["forwards"], "backwards": cost["backwards"]}


def apply_bits(payload: dict, exchange: GradientExchange, step: int) -> None:
    """Switch ``exchange`` to the codebook in rank 0's ``decide_bits`` payload (raises its error)."""
    if "error" in payload:
        raise RuntimeError(f"bit allocation on rank 0 failed at step {step}: {payload['error']}")
    exchange.replan(payload["bits"], payload["version"])


def check_coding(*, codec: str, ratio, error_feedback, bucket_size, min_elements, allocator, trigger) -> Trigger | None:
    """Validate the coding settings shared by ``DistributedOptimizer`` and ``hvd_gradq.simulate``;
    returns the trigger to use (the default one when an allocator comes without)."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {list(CODECS)}, got {codec!r}")
    if codec in RATIO_CODECS and ratio is None:
        raise ValueError(f"codec={codec!r} needs ratio=, e.g. ratio=20 (20x fewer bytes than float32)")
    if error_feedback not in (True, False, "auto"):
        raise ValueError(f"error_feedback must be True, False or 'auto', got {error_feedback!r}")
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 1:
        raise ValueError(f"bucket_size must be an integer >= 1, got {bucket_size!r}")
    if isinstance(min_elements, bool) or not isinstance(min_elements, int) or min_elements < 0:
        raise ValueError(f"min_elements must be an integer >= 0, got {min_elements!r}")
    if allocator is None:
        if trigger is not None:
            raise ValueError("a trigger needs an allocator= to decide the bits when it fires")
        return None
    if not isinstance(allocator, Allocator):
        raise TypeError(f"allocator must be a hvd_gradq.Allocator, got {type(allocator).__name__}")
    if codec in RATIO_CODECS:
        raise ValueError(f"codec={codec!r} sets its own element-level budget (ratio=); an allocator needs a codec "
                         f"with bit widths, one of {[c for c in CODECS if c not in RATIO_CODECS]}")
    for b in allocator.options:
        if b:
            try:
                make_codec("qsgdinf" if codec == "uniform" else codec, b)
            except ValueError as e:
                raise ValueError(f"allocator option {b} bits does not suit codec {codec!r}: {e}") from e
    trigger = Trigger() if trigger is None else trigger
    if not isinstance(trigger, Trigger):
        raise TypeError(f"trigger must be a hvd_gradq.Trigger, got {type(trigger).__name__}")
    return trigger


def check_refit(refit_levels: int | None, codec: str) -> int:
    """The refit interval of adaptive levels: None -> 100 steps for alq/amq (0 for other codecs)."""
    if refit_levels is None:
        return 100 if codec in ("alq", "amq") else 0
    if isinstance(refit_levels, bool) or not isinstance(refit_levels, int) or refit_levels < 0:
        raise ValueError(f"refit_levels must be an integer >= 0 (steps between level fits; 0: never), "
                         f"got {refit_levels!r}")
    return refit_levels


def rank_state(step: int, exchange: GradientExchange, trigger: Trigger | None, allocator: Allocator | None,
               events: list[AllocationEvent], alloc_seconds: float) -> dict:
    """One rank's part of a compression checkpoint (``checkpoint.bundle`` collects every rank's),
    the same for ``DistributedOptimizer`` and ``hvd_gradq.simulate``."""
    return {"step": step, "exchange": exchange.state_dict(),
            "trigger": None if trigger is None else trigger.state_dict(),
            "allocator": None if allocator is None else allocator.state_dict(),
            "events": [asdict(e) for e in events], "alloc_seconds": alloc_seconds}


def coding_config(exchange: GradientExchange, allocator: Allocator | None, trigger: Trigger | None) -> dict:
    """The settings a saved compression state must have been made with to resume."""
    return {**exchange.config, "allocator": None if allocator is None else repr(allocator),
            "trigger": None if trigger is None else repr(trigger)}


def allocation_overhead(events: list[AllocationEvent], seconds: float, started: float | None, version: int) -> dict:
    """Allocations, seconds deciding bits, forward passes, and that time as a fraction of the
    wall clock since ``started`` (time.perf_counter())."""
    wall = time.perf_counter() - started if started is not None else 0.0
    return {"allocations": len(events), "seconds": seconds, "forwards": sum(e.forwards for e in events),
            "fraction": seconds / wall if wall > 0 else 0.0, "version": version}


def _check_groups(groups, params: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]] | None:
    if groups is None or groups == 0:
        return None
    if isinstance(groups, bool) or not (isinstance(groups, list) or (isinstance(groups, int) and groups > 0)):
        raise ValueError("groups must be a positive integer or a list of lists of parameters (torch.Tensor)")
    ids = {id(p) for p in params}
    if isinstance(groups, int):
        count = min(groups, len(params))
        return [tuple(params[len(params) * i // count:len(params) * (i + 1) // count]) for i in range(count)]
    seen: set[int] = set()
    out = []
    for group in groups:
        for p in group:
            if not isinstance(p, torch.Tensor):
                raise ValueError("groups must consist of torch.Tensor parameters")
            if id(p) in seen:
                raise ValueError("a parameter can appear in only one group")
            seen.add(id(p))
        out.append(tuple(p for p in group if id(p) in ids))
    out += [(p,) for p in params if id(p) not in seen]
    return [g for g in out if g]


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
                 allocator: Allocator | None = None, trigger: Trigger | None = None) -> None:
        super(self.__class__, self).__init__(params)
        # hvd.broadcast_optimizer_state recognises Horovod's optimizer by its module and then
        # materialises empty state with super(type(opt), opt).step(), which bypasses the gradient
        # exchange; any other optimizer it steps in full, launching collectives on the ranks with
        # empty state only (a hang). Ours is recognised too, and that step is _materialising_step.
        self.__module__ = hvd.DistributedOptimizer.__module__
        self._gq_make_exchange = make_exchange
        exchange = make_exchange() if process_set.included() else None
        self.allocator = allocator
        self.trigger = trigger
        #: every codebook switch: step, version, summary, cost
        self.allocation_events: list[AllocationEvent] = []
        self._gq_step = 0
        self._gq_started: float | None = None
        self._gq_alloc_seconds = 0.0
        self.process_set = process_set
        self.backward_passes_per_step = backward_passes_per_step
        self.sparse_as_dense = sparse_as_dense
        self.gradient_exchange = exchange
        self._gq_names = {p: n for n, p in named}
        self._gq_by_name = {n: p for n, p in named}
        self._gq_params = [p for _, p in named if p.requires_grad]
        #: frozen when the optimizer was built: no exchange exists for them (as in Horovod)
        self._gq_untracked = [p for _, p in named if not p.requires_grad]
        self._gq_delay = dict.fromkeys(self._gq_params, backward_passes_per_step)
        self._gq_pending: dict[torch.Tensor, Exchange] = {}
        self._gq_waiting: list[Exchange] = []  # exchanges whose next phase is not started yet
        self._gq_groups = _check_groups(groups, self._gq_params)
        self._gq_group_of = {p: g for g in (self._gq_groups or []) for p in g}
        self._gq_ready: dict[tuple, list[torch.Tensor]] = {}
        self._gq_hooks = []
        self._synchronized = False
        self._should_synchronize = True
        if process_set.included() and (hvd.size() > 1 or os.environ.get("HOROVOD_ELASTIC") == "1"):
            self._gq_hooks = [p.register_post_accumulate_grad_hook(self._gq_hook) for p in self._gq_params]

    # ---- hooks ------------------------------------------------------------------------------------------
    def _gq_hook(self, p: torch.Tensor) -> None:
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
        ex = self._gq_pending[p] = self.gradient_exchange.launch(self._gq_names[p], grad,
                                                                 frozen=not p.requires_grad)
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
        for p in self._gq_params:  # layers whose hook did not fire (yet): every rank sends every layer
            self._gq_launch(p)
        errors: list[BaseException] = []
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
        self._gq_pending.clear()
        self._gq_waiting.clear()
        self._gq_ready.clear()
        for p in self._gq_delay:
            self._gq_delay[p] = self.backward_passes_per_step
        late = [self._gq_names[p] for p in self._gq_untracked if p.requires_grad and p.grad is not None]
        if late and not errors:  # Horovod would apply each rank's own gradient to them, silently
            errors.append(ValueError(
                f"parameters {late} have gradients but did not require grad when the DistributedOptimizer was "
                "built, so no exchange exists for them and each rank would apply its own gradient. Build the "
                "optimizer with requires_grad=True on every parameter that will train (one frozen later is "
                "exchanged as zeros), or build a new DistributedOptimizer after unfreezing."))
        if errors:
            err = errors[0]
            if isinstance(err, (wire.CodebookMismatchError, wire.ReductionMismatchError)):
                # every rank reached this verdict from the same bytes; meet before raising so that
                # no rank shuts Horovod down under another that is still in a collective
                with suppress(Exception):
                    hvd.barrier(process_set=self.process_set)
            raise err
        self._gq_after_step()
        self._synchronized = True

    # ---- reallocation -------------------------------------------------------------------------------------
    def _gq_after_step(self) -> None:
        """Rank 0 feeds the trigger with the aggregated per-layer gradient norms; its verdict is
        broadcast, and when it fires rank 0 allocates and broadcasts the new codebook, which every
        rank applies before the next step."""
        step = self._gq_step
        self._gq_step += 1
        if self._gq_started is None:
            self._gq_started = time.perf_counter()
        ex = self.gradient_exchange
        ps = self.process_set
        by_name = self._gq_by_name
        is_root = ps.rank() == 0
        if ex.refit_due(step):  # every rank knows when: only the levels travel
            fitted = ex.fit_levels({n: p.grad for n, p in by_name.items() if p.grad is not None}) if is_root else None
            ex.set_levels(broadcast_codebook(fitted, ps))
        if self.allocator is None:
            return
        start = time.perf_counter()
        names = ex.allocatable
        fire = False
        if is_root:
            norms = [float(by_name[n].grad.detach().float().norm()) if by_name[n].grad is not None else 0.0
                     for n in names]
            fire = self.trigger.observe(step, norms)
        fire = broadcast_decision(fire, step, ps)
        if not fire:
            self._gq_alloc_seconds += time.perf_counter() - start
            return
        payload = None
        via = transport_name(ps)  # asked before the broadcast: after it, a finished peer may end MPI
        if is_root:
            payload = decide_bits(self.allocator, ex, {n: by_name[n] for n in names}, step,
                                  float(self.param_groups[0]["lr"]))
        payload = broadcast_codebook(payload, ps)
        apply_bits(payload, ex, step)
        seconds = time.perf_counter() - start
        self._gq_alloc_seconds += seconds
        event = AllocationEvent(step, payload["version"], payload["summary"], seconds, payload["forwards"],
                                payload["backwards"], dict(payload["bits"]))
        self.allocation_events.append(event)
        if is_root:
            _log.info("step %d: codebook v%d (%s) in %.3f s, %d forward passes, via %s", step, event.version,
                      event.summary, seconds, event.forwards, via)

    def allocation_overhead(self) -> dict:
        """Time spent deciding bits (trigger broadcasts, allocations, codebook broadcasts), the
        number of allocations and forward passes, and that time as a fraction of training time."""
        ex = self.gradient_exchange
        return allocation_overhead(self.allocation_events, self._gq_alloc_seconds, self._gq_started,
                                   ex.codebook.version if ex else 0)

    # ---- checkpoint ----------------------------------------------------------------------------------------
    def compression_state_dict(self) -> dict | None:
        """Every rank's compression state in one bundle, for a checkpoint next to the model's and
        ``optimizer.state_dict()``: residuals, codebook, dither streams, coder state, step count,
        and rank 0's trigger and allocator state.

        Collective: call it on every rank of the process set at the same point (after ``step()``);
        every rank gets the whole bundle, so rank 0 alone can save it. None on ranks outside the
        process set."""
        if self._gq_pending:
            raise RuntimeError("compression_state_dict() was called with gradients in flight; call it after "
                               "optimizer.step() (or synchronize())")
        ex = self.gradient_exchange
        if ex is None:
            return None
        local = rank_state(self._gq_step, ex, self.trigger, self.allocator, self.allocation_events,
                           self._gq_alloc_seconds)
        return checkpoint.bundle(gather_objects(local, self.process_set), layers=ex.numel, config=self._gq_config())

    def load_compression_state_dict(self, state: dict, reset: bool = False) -> None:
        """Resume from ``compression_state_dict()``: every rank takes its own part, and training
        continues exactly as it would have without the interruption (same seeds and data).

        A state saved by a different number of ranks, for a different model or with other coding
        settings raises ``hvd_gradq.StateMismatchError`` naming the mismatch, unless ``reset=True``:
        then the compression state starts afresh (residuals zero; with an allocator, the codebook
        is re-allocated at the next step). Call it on every rank, before the first step."""
        if not isinstance(state, Mapping) or state.get("format") != checkpoint.FORMAT:
            raise TypeError("load_compression_state_dict() takes what compression_state_dict() returned (a dict with "
                            f"format {checkpoint.FORMAT!r}), got {type(state).__name__}")
        if reset not in (True, False):
            raise ValueError(f"reset must be True or False, got {reset!r}")
        if self._gq_pending:
            raise RuntimeError("load_compression_state_dict() was called with gradients in flight")
        ex = self.gradient_exchange
        if ex is None:
            return
        problems = checkpoint.mismatches(state, size=ex.size, layers=ex.numel, config=self._gq_config())
        if problems and reset:
            _log.warning("compression state not resumed (%s); starting it afresh", "; ".join(problems))
            self.reset_compression_state()
            return
        local = checkpoint.select(state, rank=ex.rank, size=ex.size, layers=ex.numel, config=self._gq_config(),
                                  owner="hvd_gradq.DistributedOptimizer")
        ex.load_state_dict(local["exchange"])
        if self.trigger is not None:
            self.trigger.load_state_dict(local["trigger"])
            self.allocator.load_state_dict(local["allocator"])
        self.allocation_events = [AllocationEvent(**e) for e in local["events"]]
        self._gq_alloc_seconds = local["alloc_seconds"]
        self._gq_step = local["step"]

    def reset_compression_state(self) -> None:
        """Zero every residual; with an allocator, re-allocate the codebook at the next step."""
        if self.gradient_exchange is not None:
            self.gradient_exchange.reset_state()
        if self.trigger is not None:
            self.trigger.reset()
            self.allocator.reset()

    def elastic_resync(self) -> None:
        """After the set of workers changed (a Horovod elastic reset): rebuild everything that
        depends on N and this rank (lane widths, chunk bounds, transports) for the current process
        set, fold this rank's residuals into its next step, and take rank 0's codebook (bits,
        scales, versions), so that every rank starts the next step from the same one. With an
        allocator, the bits are re-decided at the next step for the new N. Collective: every rank
        of the process set calls it at the same point; ``hvd_gradq.elastic`` does so on sync and the
        optimizer does so itself at the first step after the world size or its rank changed."""
        old = self.gradient_exchange
        if old is None or not self.process_set.included():
            return
        owed = {n: t for n in list(old.numel) if (t := old.take_owed(n)) is not None}
        fresh = self._gq_make_exchange()
        mine = {"codebook": old.shared_codebook(), "step": self._gq_step} if self.process_set.rank() == 0 else None
        shared = broadcast_codebook(mine, self.process_set)
        fresh.adopt(shared["codebook"])
        self._gq_step = shared["step"]  # a worker that joined now counts steps like the others
        fresh.carry = owed
        self.gradient_exchange = fresh
        self._gq_pending.clear()
        self._gq_waiting.clear()
        self._gq_ready.clear()
        for p in self._gq_delay:
            self._gq_delay[p] = self.backward_passes_per_step
        if self.trigger is not None:
            self.trigger.reset()
        _log.info("rank %d of %d: codebook v%d adopted after the set of workers changed", fresh.rank, fresh.size,
                  fresh.codebook.version)

    def sync_codebook(self, root_rank: int) -> None:
        """Take the codebook (bits, shared scales, reduction counts, version) and the step count of
        global rank ``root_rank``. After ``hvd.join()``: the ranks that joined early missed the
        exchanges the others went on with. Call it on every rank of the process set after the join,
        with what ``hvd.join()`` returned (the rank that joined last), next to
        ``hvd.broadcast_parameters(model.state_dict(), root_rank=...)``. Residuals stay local.

        Under ``hvd.join()`` Horovod reduces only by allreduce: layers on the lanes (codec
        "uniform" with transport "allreduce", and the float32 ones) work; allgather, two-phase and
        the allocator's broadcasts raise Horovod's "not supported with Join" error."""
        ex = self.gradient_exchange
        if ex is None or not self.process_set.included():
            return
        mine = {"codebook": ex.shared_codebook(), "step": self._gq_step} if hvd.rank() == root_rank else None
        shared = broadcast_codebook(mine, self.process_set, root=root_rank)
        ex.adopt(shared["codebook"])
        self._gq_step = shared["step"]

    def local_compression_state(self) -> dict:
        """This rank's compression state (not collective; for Horovod elastic's commit/restore)."""
        ex = self.gradient_exchange
        return {"size": None if ex is None else ex.size, "step": self._gq_step,
                "exchange": None if ex is None else ex.state_dict(),
                "trigger": None if self.trigger is None else self.trigger.state_dict(),
                "allocator": None if self.allocator is None else self.allocator.state_dict()}

    def load_local_compression_state(self, state: dict) -> None:
        """Undo to ``local_compression_state()`` of this rank (elastic restore, before the reset).
        A state from another world size only restores the step count; the next step rebuilds."""
        ex = self.gradient_exchange
        self._gq_pending.clear()
        self._gq_waiting.clear()
        self._gq_ready.clear()
        self._gq_step = state["step"]
        if ex is None or state["exchange"] is None or state["size"] != ex.size:
            return
        ex.load_state_dict(state["exchange"])
        if self.trigger is not None:
            self.trigger.load_state_dict(state["trigger"])
            self.allocator.load_state_dict(state["allocator"])

    def _gq_config(self) -> dict:
        return coding_config(self.gradient_exchange, self.allocator, self.trigger)

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
        return super(self._gq_update_class, self).step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._gq_pending:
            raise AssertionError(  # Horovod's words
                "optimizer.zero_grad() was called after loss.backward() but before optimizer.step() or "
                "optimizer.synchronize(). This is prohibited as it can cause a race condition."
            )
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, *args, **kwargs):
        self._gq_pending.clear()
        self._gq_waiting.clear()
        self._gq_ready.clear()
        self._synchronized = False
        self._should_synchronize = True
        for p in self._gq_delay:
            self._gq_delay[p] = self.backward_passes_per_step
        return super(self.__class__, self).load_state_dict(*args, **kwargs)

    def set_backward_passes_per_step(self, passes: int) -> None:
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ValueError(f"backward_passes_per_step must be an integer >= 1, got {passes!r}")
        self.backward_passes_per_step = passes
        for p in self._gq_delay:
            self._gq_delay[p] = passes

    # ---- reporting ---------------------------------------------------------------------------------------
    @property
    def codebook(self) -> Codebook:
        return self.gradient_exchange.codebook

    def layer_plans(self) -> list[LayerPlan]:
        """Per layer: bits, codec, chosen transport, predicted and measured payload bytes."""
        return list(self.gradient_exchange.plans.values())

    def transport_summary(self) -> str:
        """One line: layers per transport and payload bytes of the latest step vs float32."""
        plans = self.layer_plans()
        kinds = (ALLREDUCE, ALLGATHER, TWO_PHASE, FLOAT32, NONE)
        counts = {t: sum(1 for p in plans if p.transport == t) for t in kinds}
        sent = sum(p.payload_bytes for p in plans)
        fp32 = sum(4 * p.numel for p in plans)
        parts = ", ".join(f"{t} {c}" for t, c in counts.items() if c)
        line = (f"layers by transport: {parts}; {sent} B handed to collectives vs {fp32} B fp32 "
                f"({fp32 / max(sent, 1):.1f}x)")
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
    codec: str = "qsgd",
    bits: int | Mapping[str, int] | Callable[[str], int] = 4,
    ratio: float | None = None,
    bucket_size: int = 1024,
    transport: str | Mapping[str, str] = "auto",
    link: LinkModel | str | None = None,
    min_elements: int = 1024,
    error_feedback: bool | str = "auto",
    seed: int = 0,
    allocator: Allocator | None = None,
    trigger: Trigger | None = None,
    refit_levels: int | None = None,
):
    """Wrap ``optimizer`` like ``hvd.DistributedOptimizer``, exchanging coded gradients.

    The positional arguments are Horovod's and mean what they mean there (``op``: the sum or the
    mean over the process set's ranks; ``gradient_predivide_factor`` is accepted for compatibility
    and changes nothing, since the sum is formed in float32 after decoding; sparse gradients are
    densified and coded like any layer whatever ``sparse_as_dense`` says, and handed back sparse).
    Horovod's helpers work with it as with its own optimizer (``hvd.broadcast_optimizer_state``
    materialises missing state without exchanging or moving parameters, ``hvd.elastic.TorchState``
    keeps the compression state, after ``hvd.join()`` call ``sync_codebook``): see
    docs/HOROVOD_COMPAT.md. The keyword-only ones choose the coding:

    Args:
        codec: "uniform" (shared-scale uniform levels: the only summable codes, so allreduce is
            among its transports), any level codec (``qsgd``, ``qsgdinf``, ``nuqsgd``, ``natural``,
            ``terngrad``, ``alq``, ``amq``), "jointsq" or "topk" (DGC's top-k by magnitude, float32
            values + int32 indices; both with ``ratio`` and error feedback).
        bits: bit width 0..8 for every layer, a ``{name or regex: bits}`` mapping (others get
            4; where several keys match a layer, the last one wins), or a function of the layer
            name. 0 = the layer is not sent at all (its gradient waits
            in error feedback).
        ratio: jointsq's / topk's compression ratio against float32 (e.g. 20 or 1000).
        bucket_size: elements per bucket of the level codecs (one float32 norm per bucket).
        transport: "auto" (the cost model's cheapest), one of "allreduce", "allgather",
            "two_phase", or a ``{name or regex: transport}`` mapping.
        link: the ``LinkModel`` the cost model prices with; "measure" times allreduces on this
            process set at construction (all ranks); default ``LinkModel()`` (10 Gbit/s, 50 us).
        min_elements: layers smaller than this go as exact float32.
        error_feedback: keep what coding drops (worker residuals, and the two-phase requantization
            residuals) and add it back at the next step. "auto" (default): for biased codes only
            (JointSQ; the shared-scale lanes always keep theirs, for clipping); unbiased codecs
            (QSGD & co.) go without, as their variance would pile up in the residual.
        seed: seed of the stochastic rounding (each rank draws its own stream).
        allocator: a ``hvd_gradq.Allocator`` (budget, metric, solver, probe): rank 0 re-decides the
            bits of every coded layer when ``trigger`` fires and broadcasts the new codebook (over
            MPI with mpi4py under ``horovodrun --mpi``, else Horovod's ``broadcast_object``); all
            ranks switch at the same step. ``bits=`` is then only the start.
        trigger: a ``hvd_gradq.Trigger`` (default: similarity, tau 0.95, k_min 20, first
            allocation after step 0).
        refit_levels: for the adaptive codecs (``alq``, ``amq``; 3 bits or more): rank 0 refits
            every layer's level set to its aggregated gradient after step 0 and then every this
            many steps, and broadcasts it (default 100; 0: keep the initial exponential levels).

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
    if not (isinstance(gradient_predivide_factor, (int, float)) and gradient_predivide_factor > 0):
        raise ValueError(f"gradient_predivide_factor must be > 0, got {gradient_predivide_factor!r}")
    if isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int) \
            or backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be an integer >= 1, got {backward_passes_per_step!r}")
    if num_groups:
        warnings.warn("num_groups is deprecated (as in Horovod); pass groups=", DeprecationWarning, stacklevel=2)
        groups = num_groups if groups is None else groups
    trigger = check_coding(codec=codec, ratio=ratio, error_feedback=error_feedback, bucket_size=bucket_size,
                           min_elements=min_elements, allocator=allocator, trigger=trigger)
    refit_levels = check_refit(refit_levels, codec)
    process_set = hvd.global_process_set if process_set is None else process_set
    if not isinstance(process_set, hvd.ProcessSet):
        raise ValueError(f"process_set must be a horovod.torch ProcessSet, got {process_set!r}")

    if named_parameters is None:
        named = [(f"allreduce.noname.{i}.{j}", p) for i, g in enumerate(optimizer.param_groups)
                 for j, p in enumerate(g["params"])]
    else:
        named = list(named_parameters)
    if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in named):
        raise ValueError("named_parameters must be (name, parameter) pairs, e.g. model.named_parameters()")
    names = [n for n, _ in named]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"parameter names in named_parameters must be unique; duplicates: {dups}")
    named_ids = {id(p) for _, p in named}
    unnamed = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in named_ids]
    if unnamed:
        raise ValueError(f"{len(unnamed)} optimizer parameters are missing from named_parameters; pass "
                         "model.named_parameters() of the model the optimizer was built on")
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    named = [(n, p) for n, p in named if id(p) in in_optimizer]

    if link is None:
        link = LinkModel()
    elif link == "measure":
        link = measure_link(process_set) if process_set.included() else LinkModel()
    elif not isinstance(link, LinkModel):
        raise ValueError(f"link must be a hvd_gradq.LinkModel, 'measure' or None, got {link!r}")

    trainable = [(n, p) for n, p in named if p.requires_grad]

    def make_exchange() -> GradientExchange:  # again after an elastic reset, for the new process set
        return GradientExchange(trainable, op=op, collectives=HorovodCollectives(process_set), codec=codec,
                                bits=bits, ratio=ratio, bucket_size=bucket_size, transport=transport, link=link,
                                min_elements=min_elements, error_feedback=error_feedback, seed=seed,
                                refit_levels=refit_levels)

    exchange = make_exchange() if process_set.included() else None  # settings errors surface here
    base = optimizer.__class__
    # Between the wrapped class and ours: the step Horovod's broadcast_optimizer_state takes when it
    # materialises the state of a rank whose state is empty (see _materialising_step)
    local = type(base.__name__, (base,), {"step": _materialising_step, "__module__": __name__})
    cls = type(base.__name__, (local,), {**_GradqOptimizer.__dict__, "_gq_update_class": local})
    GradqOptimizer.register(cls)
    import hvd_gradq.elastic  # noqa: F401 - hvd.elastic.TorchState then keeps the compression state too
    made = iter([exchange])
    return cls(optimizer.param_groups, named, lambda: next(made, None) or make_exchange(), backward_passes_per_step,
               groups, sparse_as_dense, process_set, allocator, trigger)
