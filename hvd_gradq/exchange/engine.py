"""The exchange engine: one rank's coding of every layer and the route of a gradient.

A gradient goes down and comes back once: ``launch`` codes it (the lane coder or the layer's
gather coder, with what its coding owes from earlier steps), hands the bytes to an exchange
(``exchanges``) together with the decode steps as callbacks, and ``finish`` returns the
aggregate the callbacks made of the bytes that came back. The plan of every layer (``plan``), the
codebook every rank shares, the coders and the residuals live here; ``replan`` and ``adopt``
switch to a new codebook between steps. The same engine runs on every rank of a Horovod job and
on every simulated rank (``simulate``); only the ``Collectives`` differ.
"""
from __future__ import annotations

import math
import time
import zlib
from collections import Counter
from collections.abc import Mapping

import torch

from hvd_gradq import checks
from hvd_gradq.bits.dither import DitherSource
from hvd_gradq.bits.rotation import key_for
from hvd_gradq.codebook import Codebook
from hvd_gradq.codecs import AdaptiveLevelCodec, Codec
from hvd_gradq.codecs.levels import fit_level_groups
from hvd_gradq.codecs.lowrank import (
    LowRankCoder,
    approximate,
    carried_q,
    factor_bits,
    factored_shape,
    initial_q,
    transposed,
)
from hvd_gradq.codecs.shared_scale import abs_max
from hvd_gradq.exchange.agreement import Agreement, describe
from hvd_gradq.exchange.collectives import Collectives
from hvd_gradq.exchange.exchanges import Allgather, Exchange, LaneAllreduce, Skip, TwoAllreduces, TwoPhase
from hvd_gradq.exchange.fusion import LowRankBucket
from hvd_gradq.exchange.residuals import ResidualStore
from hvd_gradq.exchange.timings import StepTimer, TimedCollectives
from hvd_gradq.plan.cost_model import ALLGATHER, ALLREDUCE, FLOAT32, LOWRANK, NONE, TWO_PHASE, LinkModel
from hvd_gradq.plan.planner import LayerPlan, Planner
from hvd_gradq.settings import Coding, check_bits
from hvd_gradq.wire.gather_coder import GatherCoder
from hvd_gradq.wire.header import AVERAGE, SUM, header_words, read_header
from hvd_gradq.wire.lane_coder import LaneCoder


class GradientExchange:
    """The per-layer plan, codebook, coders and residuals of one rank.

    Args:
        named: the trainable (name, parameter) pairs, in the same order on every rank.
        coding: the settings (``link`` must be a ``LinkModel`` or None here).
        collectives: the ranks the exchanges run on.
        op: ``wire.SUM`` or ``wire.AVERAGE``: ``finish`` returns the sum over ranks or the mean.
        label: what error messages tell the user to build identically on every rank.
    """

    def __init__(self, named: list[tuple[str, torch.Tensor]], *, coding: Coding, collectives: Collectives,
                 op: str = AVERAGE, label: str = "hvd_gradq.DistributedOptimizer") -> None:
        if op not in (SUM, AVERAGE):
            raise ValueError(f"op must be {SUM!r} or {AVERAGE!r}, got {op!r}")
        self.coding = coding
        self.op = op
        self.label = label
        #: the collectives the exchanges run on: Horovod's (a job) or an in-process world (simulation)
        self.collectives = collectives
        #: seconds per phase of this rank's steps (encode, decode, wait here; the caller closes steps)
        self.timer = StepTimer()
        self._coll = TimedCollectives(collectives, self.timer)
        self._step_bytes = 0
        self._bucket: LowRankBucket | None = None  # the step's low-rank layers' two allreduces
        self._agreement: Agreement | None = None  # the ranks' codebooks compared, at the first step
        self.size = collectives.size()
        self.rank = collectives.rank()
        link = coding.link if isinstance(coding.link, LinkModel) else LinkModel()
        self.planner = Planner(codec=coding.codec, ratio=coding.ratio, bucket_size=coding.bucket_size,
                               min_elements=coding.min_elements, size=self.size, rank=self.rank, link=link,
                               rotation=coding.rotation, rounding=coding.rounding, seed=coding.seed,
                               block_scales=coding.block_scales, factors=coding.factors)
        self.codebook = Codebook()
        self.residuals = ResidualStore()
        # lanes (shared-scale codes on allreduce, and float32 for tiny layers) ride the same codebook
        self.lanes = LaneCoder(bits=1, op=SUM, min_elements=coding.min_elements, seed=coding.seed, rank=self.rank,
                               size=self.size, codebook=self.codebook, residuals=self.residuals.lanes, label=label)
        self.coders: dict[str, GatherCoder] = {}
        self.lowrank: dict[str, LowRankCoder] = {}  # the low-rank layers' factors and residuals
        self.level_fit: dict[str, dict] = {}  # the latest level fit per group (``fit_levels``)
        self.plans: dict[str, LayerPlan] = {}
        self._track_error = False
        self._coders_made = 0  # each coder draws from its own stream (see plan_layer)
        names = [n for n, _ in named]
        self.numel = {n: p.numel() for n, p in named}
        self.shapes = {n: tuple(p.shape) for n, p in named}
        self.ranks = coding.layer_ranks(names)
        bits_of = coding.layer_bits(names)
        self.forced = coding.layer_transports(names)
        for name in names:
            self.plan_layer(name, bits_of[name])

    @property
    def allocatable(self) -> list[str]:
        """Layers whose bit width an allocator may set (not the exact float32 ones)."""
        return [n for n, plan in self.plans.items() if plan.transport != FLOAT32]

    # ---- planning -------------------------------------------------------------------------------------
    def plan_layer(self, name: str, bits: int) -> None:
        """(Re)plan layer ``name`` at ``bits`` with its forced transport and rank (a fresh coder)."""
        plan, code = self.planner.plan(name, self.numel[name], bits, self.forced[name], self.shapes[name],
                                       self.ranks[name])
        self.codebook.add(code)
        self.plans[name] = plan
        self.coders.pop(name, None)
        self.lowrank.pop(name, None)
        if plan.transport == LOWRANK:  # Q starts from the same key on every rank (in the codebook's digest)
            shape = factored_shape(self.shapes[name], code.rank)
            self.lowrank[name] = LowRankCoder(name, shape, code.rank, key=key_for(self.coding.seed, name),
                                              factors=self.coding.factors)
        if plan.gather is not None:
            # A stream per coder, not one shared by all layers: two-phase second halves run when
            # their first half completes, an order that varies from run to run, and the dither must not
            self._coders_made += 1
            rng = DitherSource([self.coding.seed, self.rank, zlib.crc32(name.encode()), self._coders_made])
            feedback = self.coding.feedback(plan.gather.unbiased)
            coder = GatherCoder(name, plan.numel, plan.gather, rank=self.rank, size=self.size, rng=rng,
                                worker_feedback=self.residuals.worker if feedback else None,
                                server_feedback=self.residuals.server if feedback else None, label=self.label)
            coder.track_error = self._track_error
            self.coders[name] = coder

    def replan(self, bits: Mapping[str, int], version: int, ranks: Mapping[str, int] | None = None) -> None:
        """Switch to a new codebook version with these per-layer bit widths, and low-rank factors of
        these ranks for the layers in ``ranks`` (all ranks of the job, same step).

        What the old coding still owed a changed layer (its residuals, including the two-phase
        requantization residual of this rank's chunk) is carried into the layer's next step."""
        ranks = dict(ranks or {})
        for name in [*bits, *ranks]:
            plan = self.plans.get(name)
            if plan is None or plan.transport == FLOAT32:
                raise ValueError(f"cannot allocate bits to layer {name!r}: not a coded layer of this optimizer")
            rank = ranks.get(name, 0)
            if rank:
                checks.integer(rank, f"rank of layer {name!r}", low=1)
                if factored_shape(self.shapes[name], rank) is None:
                    raise ValueError(f"layer {name!r} of shape {self.shapes[name]} cannot be sent as rank-{rank} "
                                     "factors (not a matrix, or the factors would be more than half of it)")
                b = plan.bits
            else:
                b = bits[name]
                check_bits(b, f"layer {name!r}")
            if b == plan.bits and rank == plan.rank:
                continue
            owed = self.take_owed(name)
            if owed is not None:
                self.residuals.carry[name] = owed
            old = self.codebook[name] if plan.transport == ALLREDUCE else None
            before = self.lowrank.get(name)
            self.ranks[name] = rank
            self.plan_layer(name, b)
            after = self.lowrank.get(name)
            if before is not None and after is not None:  # a rank change: the subspace found so far stays
                after.q = carried_q(before.q, after.rank, after.q)
            new = self.codebook[name]
            if old is not None and self.plans[name].transport == ALLREDUCE and new.codec == old.codec:
                new.scale, new.block_rms = old.scale, old.block_rms  # no float32 recalibration step
        self.codebook.version = version

    def take_owed(self, name: str) -> torch.Tensor | None:
        """Remove and return everything this rank's coding of layer ``name`` still owes, as one
        flat float32 tensor; None if nothing."""
        coder = self.coders.get(name)
        chunk = None if coder is None else (coder.bounds[coder.rank], coder.bounds[coder.rank + 1])
        owed = self.residuals.take_owed(name, self.numel[name], chunk)
        low = self.lowrank[name].take_residual() if name in self.lowrank else None
        if low is not None:
            owed = low if owed is None else owed + low
        return owed

    def adopt(self, shared: Mapping, factors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Follow the root's ``codebook.state_dict()`` (between steps: a fresh engine after the set
        of workers changed, or this one after ``hvd.join()``): its bits, scales, reduction
        counts, codec parameters and version; and its low-rank layers' warm-start Q (``factors``),
        which a worker that joins has not got and the others share."""
        layers = shared["layers"]
        coded = {n: s for n, s in layers.items() if self.plans[n].transport != FLOAT32}
        self.replan({n: s["bits"] for n, s in coded.items() if not s.get("rank")}, shared["version"],
                    {n: s["rank"] for n, s in coded.items() if s.get("rank")})
        for name, state in layers.items():
            self.codebook[name].follow(state)
        for name, q in (factors or {}).items():
            coder = self.lowrank.get(name)
            if coder is not None and coder.q.shape == q.shape:
                coder.q = q.clone().to(torch.float32)

    # ---- one step -------------------------------------------------------------------------------------
    def launch(self, name: str, grad: torch.Tensor, frozen: bool = False, carry: bool = False) -> Exchange:
        """Code layer ``name``'s gradient and start its exchange. ``frozen``: the parameter does
        not require grad now; it still takes part (every rank runs the same collectives) but its
        residuals are left alone. ``carry``: a one-allreduce lane layer is not started; the caller
        sums ``exchange.payload`` and hands the sum to ``exchange.deliver`` (if ``exchange.carried``)."""
        t0 = time.perf_counter()
        if self._agreement is None:  # before this engine's first collective
            self._agreement = Agreement(self._coll, describe(self), self.label)
        plan = self.plans[name]
        owed = self.residuals.carry.pop(name, None)
        if owed is not None and not frozen:
            grad = grad.detach().reshape(-1).to(torch.float32) + owed
        if plan.transport == NONE:  # nothing leaves the rank; the gradient waits in error feedback
            g = grad.detach().reshape(-1).to(torch.float32)
            if not frozen and math.isfinite(abs_max(g)):
                self.residuals.zero_bit.buffer(name, g).add_(g)
            self.timer.add("encode", time.perf_counter() - t0)
            return Skip(plan.numel)
        timed = self.timer.timed
        if plan.transport == LOWRANK:
            return self._launch_lowrank(name, grad, frozen, t0)
        if plan.transport in (ALLREDUCE, FLOAT32):
            first = self.lanes.prepare(name, grad, frozen=frozen)
            if first is not None:  # rotated lanes with this step's scales: statistics, then codes
                stats, prep = first
                ctxs = []

                def encode(summed, prep=prep, ctxs=ctxs):
                    payload, ctx = self.lanes.encode_prepared(prep, summed)
                    ctxs.append(ctx)
                    return payload

                self.timer.add("encode", time.perf_counter() - t0)
                return TwoAllreduces(name, stats, timed("encode", encode),
                                     timed("decode", lambda out: self.lanes.decode(out, ctxs[0]).reshape(-1)),
                                     self._coll)
            payload, ctx = self.lanes.encode(name, grad, frozen=frozen)
            self.timer.add("encode", time.perf_counter() - t0)
            return LaneAllreduce(name, payload, timed("decode", lambda out: self.lanes.decode(out, ctx).reshape(-1)),
                                 self._coll, plan.transport, carried=carry)
        coder = self.coders[name]
        stamp = (self.codebook.version, self.codebook.digest(name, self.size))
        if plan.transport == ALLGATHER:
            frame = coder.encode_layer(grad, stamp=stamp, frozen=frozen)
            self.timer.add("encode", time.perf_counter() - t0)
            return Allgather(name, frame, timed("decode", coder.sum_frames), self._coll)
        stream, splits = coder.encode_chunks(grad, stamp=stamp, frozen=frozen)
        self.timer.add("encode", time.perf_counter() - t0)
        return TwoPhase(name, stream, splits, timed("decode", lambda buf: coder.reduce_own_chunk(buf, stamp=stamp)),
                        timed("decode", coder.assemble), self._coll)

    def _launch_lowrank(self, name: str, grad: torch.Tensor, frozen: bool, t0: float) -> Exchange:
        """P = M Q with the summed header (op, ranks, codebook digest checked on the sum), then Q; the
        step's low-rank layers share the two allreduces (``fusion.LowRankBucket``)."""
        coder = self.lowrank[name]
        p = coder.first(grad, frozen=frozen)
        head = header_words(rank=self.rank, size=self.size, digest=self.codebook.digest(name, self.size),
                            nonfinite=not bool(torch.isfinite(p).all()), stat=coder.norm, container=torch.float32)
        at = head.numel()

        def second(summed: torch.Tensor) -> torch.Tensor:
            reduced = read_header(summed[:at], size=self.size, op=SUM, layer=name, compressor=self.label)
            return coder.second(summed[at:], reduced.stat_sum)

        self.timer.add("encode", time.perf_counter() - t0)
        if self._bucket is None or not self._bucket.takes(name):  # the step's first low-rank layer
            self._bucket = LowRankBucket([n for n, plan in self.plans.items() if plan.transport == LOWRANK], self._coll)
        return self._bucket.join(name, torch.cat([head, p]), self.timer.timed("encode", second),
                                 self.timer.timed("decode", coder.decode))

    def excuse(self, names) -> None:
        """Layers not launched this step on any rank (the stock path: Horovod reduced a sparse
        gradient itself, or its optimizer lacks them): the step's low-rank bucket goes without them."""
        lowrank = [n for n in names if self.plans[n].transport == LOWRANK]
        if lowrank and (self._bucket is None or not any(self._bucket.takes(n) for n in lowrank)):
            self._bucket = LowRankBucket([n for n, plan in self.plans.items() if plan.transport == LOWRANK], self._coll)
        if lowrank:
            self._bucket.excuse(lowrank)

    def agree(self) -> None:
        """At this engine's first step, before any wait: compare the ranks' codebooks (``agreement``)."""
        if self._agreement is not None:
            self._agreement.check()

    def finish(self, name: str, exchange: Exchange, extra_bytes: int = 0) -> torch.Tensor:
        """The layer's aggregate (float32, flat): the sum over ranks, or the mean (after ``agree``);
        ``extra_bytes`` (the stock path's placeholder) count in the step's bytes."""
        out = exchange.result()
        plan = self.plans[name]
        plan.payload_bytes = exchange.payload_bytes
        self._step_bytes += exchange.payload_bytes + extra_bytes
        if plan.transport not in (ALLREDUCE, FLOAT32):
            self.codebook[name].version += 1  # the lane coder advances it in decode
        if self.op == AVERAGE:
            out = out.div_(self.size)  # every decode returns a tensor of its own
        return out

    def close_step(self, seconds: float, **phases: float) -> dict:
        """End this rank's step for the timer: ``seconds`` its wall clock, ``phases`` what the
        caller measured (``exchange.timings``); returns the step's record."""
        record = self.timer.close(seconds, self._step_bytes, **phases)
        self._step_bytes = 0
        return record

    # ---- what the allocator asks -----------------------------------------------------------------------
    def quantizer(self, seed: int = 0):
        """``quantize(name, bits, g)``: what layer ``name``'s codec makes of ``g`` at ``bits``
        (for the allocator's distortion metrics; shared-scale layers are taken as gathered)."""
        rng = DitherSource([seed, 0x51])
        cache: dict[int, Codec] = {}

        def quantize(name: str, bits: int, g: torch.Tensor) -> torch.Tensor | None:
            if bits < 0:  # rank -bits factors: one warm-started iteration, as the layer's next step
                return self._lowrank_view(name, -bits, g)
            if bits == 0:
                return torch.zeros_like(g)
            codec = cache.get(bits)
            if codec is None:
                codec = cache[bits] = self.planner.new_gather_codec(bits)
            return codec.roundtrip(g, rng)

        return quantize

    def _lowrank_view(self, name: str, rank: int, g: torch.Tensor) -> torch.Tensor | None:
        shape = factored_shape(self.shapes[name], rank)
        if shape is None:
            return None
        coder = self.lowrank.get(name)
        flip = transposed(*shape, self.coding.factors)
        if coder is not None and coder.rank == rank:
            q = coder.q
        else:  # what the layer would start from at this rank: its Q carried over, as replan does
            q = initial_q(shape[0] if flip else shape[1], rank, key_for(self.coding.seed, name))
            if coder is not None:
                q = carried_q(coder.q, rank, q)
        return approximate(g.reshape(shape).to(torch.float32), q, flip)

    def wire_bits(self, name: str, bits: int) -> float | None:
        """Bits handed to the collectives per step if layer ``name`` were coded at ``bits`` (a
        negative ``bits``: as rank -bits factors; None if it cannot be)."""
        if bits < 0:
            shape = factored_shape(self.shapes[name], -bits)
            return None if shape is None else 8.0 * self.planner.lowrank_cost(*shape, -bits).payload_bytes
        return self.planner.wire_bits(self.numel[name], bits, self.forced[name])

    def factor_bits(self, name: str, rank: int) -> float | None:
        """Bits of layer ``name``'s rank-``rank`` factors in the dtypes they travel in (the
        allocator's paper rate of a rank; None if the layer cannot take it)."""
        shape = factored_shape(self.shapes[name], rank)
        return None if shape is None else float(factor_bits(*shape, rank, self.coding.factors))

    # ---- adaptive levels (ALQ / AMQ) -----------------------------------------------------------------
    def _adaptive(self) -> dict[str, GatherCoder]:
        return {n: c for n, c in self.coders.items() if isinstance(c.codec, AdaptiveLevelCodec) and c.codec.bits > 2}

    def refit_due(self, step: int) -> bool:
        """Whether the levels are refitted after ``step`` (the same answer on every rank)."""
        every = self.coding.refit_levels
        return bool(every) and step % every == 0 and bool(self._adaptive())

    def fit_levels(self, grads: Mapping[str, torch.Tensor]) -> dict[str, dict]:
        """The root: fit one level set per group of adaptive-coded layers (ALQ, AMQ; 3 bits or more;
        ``Coding.level_groups``: each layer, all, or per type) to the group's aggregated gradients
        in ``grads`` (``codecs.levels.fit_level_groups``), for every rank's ``set_levels``."""
        groups: dict[str, dict] = {}
        for name, coder in self._adaptive().items():
            if name in grads:
                groups.setdefault(self.coding.level_group(name), {})[name] = coder.codec
        return fit_level_groups(groups, grads)

    def set_levels(self, fitted: Mapping[str, dict]) -> None:
        """Adopt the root's fitted levels (every rank, the same step). They enter the layer's
        codebook digest, so a rank that missed them is caught at the next exchange."""
        for name, state in fitted["levels"].items():
            coder = self.coders[name]
            coder.codec.load_state_dict(state)
            fitted_key = zlib.crc32(coder.codec.levels.numpy().tobytes())
            self.codebook[name].codec_key = f"bucket={self.coding.bucket_size};levels={fitted_key:08x}"
        self.level_fit = dict(fitted["groups"])

    # ---- coding error ------------------------------------------------------------------------------------
    @property
    def track_error(self) -> bool:
        """Measure this rank's coding error of the gathered layers (``coding_error``)."""
        return self._track_error

    @track_error.setter
    def track_error(self, on: bool) -> None:
        self._track_error = bool(on)
        for coder in self.coders.values():
            coder.track_error = self._track_error

    def coding_error(self) -> tuple[float, float]:
        """(sum of ||decoded - x||^2, sum of ||x||^2) over the gather-coded layers of this rank's
        latest step (its normalised coding variance is their ratio); needs ``track_error``."""
        errors = [c.last_error for c in self.coders.values() if c.last_error is not None]
        return sum((e[0] for e in errors), 0.0), sum((e[1] for e in errors), 0.0)

    # ---- checkpoint ----------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """The settings a saved state must have been made with to resume here."""
        return {**self.coding.config, "op": self.op}

    def reset_state(self) -> None:
        """Forget every residual and what was carried (the plan and the codebook stay)."""
        self.residuals.reset()
        for coder in self.lowrank.values():
            coder.take_residual()

    # ---- reporting ----------------------------------------------------------------------------------
    def summary(self, sent: int | None = None) -> str:
        """Layers per transport and payload bytes of the latest step (or ``sent``) vs float32."""
        plans = list(self.plans.values())
        counts = Counter(p.transport for p in plans)
        order = (ALLREDUCE, LOWRANK, ALLGATHER, TWO_PHASE, FLOAT32, NONE)
        parts = ", ".join(f"{t} {counts[t]}" for t in order if counts.get(t))
        fp32 = sum(4 * p.numel for p in plans)
        sent = sum(p.payload_bytes for p in plans) if sent is None else sent
        return (f"layers by transport: {parts}; {sent} B handed to collectives vs {fp32} B fp32 "
                f"({fp32 / max(sent, 1):.1f}x)")
