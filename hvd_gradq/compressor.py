"""Horovod ``Compressor`` classes users pass to ``hvd.DistributedOptimizer(compression=...)``.

This is glue: it asks Horovod for rank and size, names the gradient it is given, and calls the
codec (``codecs``), the packing (``packing``) and the header checks (``wire``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from hvd_gradq import checkpoint, wire
from hvd_gradq.broadcast import gather_objects
from hvd_gradq.codebook import FLOAT_BITS, Codebook, LayerCode
from hvd_gradq.codecs import DitherSource, ErrorFeedback
from hvd_gradq.codecs.uniform import abs_max, dequantize_lanes, quantize_to_lanes
from hvd_gradq.packing import lane_layout, pack_lanes
from hvd_gradq.transport import HorovodCollectives

try:
    import horovod.torch as hvd
    from horovod.torch.compression import Compressor as _HorovodCompressor
except ImportError as exc:  # pragma: no cover - exercised only without Horovod
    raise ImportError(
        "hvd_gradq needs Horovod with PyTorch support. Run `make setup` (launch/setup.sh) from the "
        "hvd_gradq checkout: it builds Horovod 0.28.1 against torch 2.13.0."
    ) from exc

#: fixed-point unit of the per-rank scale statistic in packed payloads (max|x| / scale)
_STAT_ONE = 1 << 16
_STAT_CAP = 1 << 30


@dataclass(frozen=True)
class PayloadInfo:
    """What the latest ``compress`` of one layer handed to Horovod."""

    dtype: torch.dtype
    nbytes: int
    numel: int  # elements of the gradient (not of the payload)
    packed: bool  # True: quantized codes in lanes; False: float32


@dataclass(frozen=True)
class WireStats:
    """Bytes handed to Horovod for the latest payload of every layer, against float32."""

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
            f"{self.packed_layers} packed, {self.float_layers} float32 layers)"
        )


def _op_name(op) -> str:
    if op is None or op == hvd.Average:
        return wire.AVERAGE
    if op == hvd.Sum:
        return wire.SUM
    raise ValueError(
        f"op must be hvd.Average (the DistributedOptimizer default) or hvd.Sum, got {op!r}; "
        "pass the same op to hvd.DistributedOptimizer"
    )


class UniformCompressor(_HorovodCompressor):
    """Uniform stochastic ``bits``-bit quantization of every gradient, packed into summable lanes.

    Usage (pass the same ``op`` to both, ``hvd.Sum`` gives the smallest payload)::

        comp = hvd_gradq.UniformCompressor(bits=2, named_parameters=model.named_parameters(),
                                           op=hvd.Sum)
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                       compression=comp, op=hvd.Sum)

    What is communicated, per layer and step: a short header (see ``wire``) and the layer's codes
    packed into int64 lanes (``op=hvd.Sum``) or into exact integers of float64 words
    (``op=hvd.Average``), with headroom for the sum over all ranks. All ranks quantize against
    the same scale (the codebook), set from the mean over ranks of max|g + residual| of the
    previous step; what clipping and rounding drop is kept by error feedback. A layer's first
    step, and any layer with fewer than ``min_elements`` elements, is sent as float32.

    Args:
        bits: bit width 1..8 of every quantized layer.
        named_parameters: the model's ``named_parameters()``; the compressor uses them to know
            which layer a gradient belongs to (Horovod hands it the gradient only).
        op: ``hvd.Average`` (default, as in ``hvd.DistributedOptimizer``) or ``hvd.Sum``.
        min_elements: layers smaller than this are sent as float32 (header included).
        seed: seed of the stochastic rounding; each rank draws from its own stream.
        process_set: the Horovod process set the optimizer reduces over (pass the same one to
            ``hvd.DistributedOptimizer``); N in the lane headroom is its size.

    The decoded gradient follows Horovod's op: the sum over ranks for ``hvd.Sum``, the mean for
    ``hvd.Average``.
    """

    def __init__(
        self,
        bits: int,
        named_parameters: Iterable[tuple[str, torch.Tensor]],
        *,
        op=None,
        min_elements: int = 1024,
        seed: int = 0,
        process_set=None,
        codebook: Codebook | None = None,
        collectives=None,
    ) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
        if isinstance(min_elements, bool) or not isinstance(min_elements, int) or min_elements < 0:
            raise ValueError(f"min_elements must be a non-negative integer, got {min_elements!r}")
        if named_parameters is None:
            raise ValueError("pass named_parameters=model.named_parameters()")
        params = list(named_parameters)
        if not params or not all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], torch.Tensor)
            for p in params
        ):
            raise ValueError(
                "named_parameters must be a non-empty iterable of (name, tensor) pairs, "
                "e.g. model.named_parameters()"
            )
        names = [n for n, _ in params]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"named_parameters has duplicate names: {dups}")
        self.bits = bits
        self.op = _op_name(op)
        self.min_elements = min_elements
        self.seed = int(seed)
        if collectives is None:  # the stock path: Horovod's process set
            self.process_set = hvd.global_process_set if process_set is None else process_set
            if not isinstance(self.process_set, hvd.ProcessSet):
                raise ValueError(f"process_set must be a horovod.torch ProcessSet, got {process_set!r}")
            collectives = HorovodCollectives(self.process_set)
        else:  # inside hvd_gradq.DistributedOptimizer or hvd_gradq.simulate: rank, size and barrier from there
            self.process_set = getattr(collectives, "process_set", None)
        self._coll = collectives
        self.codebook = Codebook() if codebook is None else codebook
        #: per-layer bit widths that override ``bits`` (set by ``hvd_gradq.DistributedOptimizer``)
        self.layer_bits: dict[str, int] = {}
        #: what error messages tell the user to construct identically on every rank
        self.label = type(self).__name__
        self.error_feedback = ErrorFeedback()
        self._params = params
        self._index = {n: i for i, n in enumerate(names)}
        self._cursor = 0  # where the last gradient was found; backward visits layers in order
        self._grad_names: dict[int, str] = {}
        self._rng: DitherSource | None = None  # seeded from (seed, rank) at the first step
        #: per layer, what its latest compress handed to Horovod
        self.payloads: dict[str, PayloadInfo] = {}

    # ---- naming ---------------------------------------------------------------------------------
    def _name_of(self, grad: torch.Tensor) -> str:
        name = self._grad_names.get(id(grad))
        if name is not None and self._params[self._index[name]][1].grad is grad:
            return name
        count = len(self._params)
        for k in range(count):  # search backwards from the last hit: gradients arrive in reverse
            i = (self._cursor - 1 - k) % count
            pname, p = self._params[i]
            if p.grad is grad:
                self._cursor = i
                self._grad_names[id(grad)] = pname
                return pname
        raise ValueError(
            f"{type(self).__name__} was given a tensor of shape {tuple(grad.shape)} that is not the "
            "gradient of any parameter in its named_parameters. Pass the same model's "
            "named_parameters() to the compressor and to hvd.DistributedOptimizer; the compressor "
            "cannot be used with hvd.allreduce on arbitrary tensors."
        )

    @property
    def rng(self) -> DitherSource:
        if self._rng is None:
            self._rng = DitherSource([self.seed, self._coll.rank()])
        return self._rng

    def _code(self, name: str, numel: int, size: int) -> LayerCode:
        if name in self.codebook:
            code = self.codebook[name]
            if code.numel != numel:
                raise ValueError(f"layer {name!r} changed size from {code.numel} to {numel} elements")
            return code
        if numel < self.min_elements:
            return self.codebook.add(LayerCode(name, numel, FLOAT_BITS, None))
        container = torch.int64 if self.op == wire.SUM else torch.float64
        bits = self.layer_bits.get(name, self.bits)
        return self.codebook.add(LayerCode(name, numel, bits, lane_layout(bits, size, container),
                                           transport="allreduce"))

    # ---- Horovod Compressor interface -----------------------------------------------------------
    def compress(self, tensor: torch.Tensor):
        if tensor.is_sparse:
            raise ValueError(
                f"{type(self).__name__} compresses dense gradients only; this parameter has a sparse "
                "gradient (e.g. nn.Embedding(sparse=True)). Pass sparse_as_dense=True to "
                "hvd.DistributedOptimizer, or build the layer with sparse=False."
            )
        name = self._name_of(tensor)
        return self.compress_layer(name, tensor, frozen=not self._params[self._index[name]][1].requires_grad)

    def compress_layer(self, name: str, tensor: torch.Tensor, frozen: bool = False):
        """``compress`` for a gradient whose layer name the caller knows. ``frozen``: the parameter
        does not require grad now (Horovod still sends zeros for it): it goes as exact float32,
        its residual is neither added nor replaced, so a frozen layer stays where it is; its
        scale is recalibrated when it is unfrozen."""
        rank, size = self._coll.rank(), self._coll.size()
        code = self._code(name, tensor.numel(), size)
        quantized = code.bits != FLOAT_BITS
        g = tensor.detach().reshape(-1).to(torch.float32)  # a view when the gradient is flat float32
        # error feedback: the codec quantizes g + r; the new residual is committed in decompress,
        # once the reduced header says whether the step is finite on every rank
        track = quantized and not frozen  # error feedback for this layer this step
        r = self.error_feedback.buffer(name, g) if track else None
        amax = abs_max(g, r)  # max |g + r|, NaN/inf if any element is: one pass, no temporary
        nonfinite = not math.isfinite(amax)
        digest = self.codebook.digest(name, size)
        packed = code.packed and not frozen
        if packed:
            container = code.layout.container
            if nonfinite:  # every rank will decode NaN; keep the residual of the last finite step
                body, stat = pack_lanes(torch.zeros_like(g, dtype=torch.int64), code.layout), 0
            else:
                stat = min(round(amax / code.scale * _STAT_ONE), _STAT_CAP)
                body = quantize_to_lanes(g, code.scale, code.bits, code.layout, self.rng, residual=r,
                                         residual_out=self.error_feedback.staging(name, g) if track else None)
        else:  # float32: small layers always, quantized layers until a scale is calibrated
            container = torch.float32
            body = g if r is None else g + r
            stat = amax if (quantized and not nonfinite and not frozen) else 0.0
        head = wire.header(rank=rank, size=size, digest=digest, nonfinite=nonfinite, stat=stat,
                           container=container)
        payload = torch.cat([head, body.to(container)])
        self.payloads[name] = PayloadInfo(payload.dtype, payload.numel() * payload.element_size(),
                                          tensor.numel(), packed)
        return payload, (name, tensor.shape, tensor.dtype, packed, track)

    def decompress(self, payload: torch.Tensor, ctx):
        name, shape, dtype, packed, track = ctx
        size = self._coll.size()
        code = self.codebook[name]
        hlen = wire.header_len(payload.dtype, size)
        try:
            head = wire.read_header(payload[:hlen], size=size, op=self.op, layer=name,
                                    compressor=self.label)
        except (wire.ReductionMismatchError, wire.CodebookMismatchError):
            # Every rank reaches this verdict from the same reduced words, but a fast rank must not
            # exit (shutting Horovod down) while a slow one is still submitting this step's
            # gradients: meet in a barrier first, so that every rank raises this error.
            self._coll.barrier()
            raise
        code.version += 1
        if head.nonfinite:  # some rank had NaN/Inf: every rank decodes NaN, residuals stay as they were
            return torch.full(shape, float("nan"), dtype=dtype, device=payload.device)
        if track:  # packed: the staged residual; float32: sent exactly, nothing left
            self.error_feedback.commit(name, zero=not packed)
        count = size if self.op == wire.AVERAGE else 1  # Horovod's op: mean or sum over ranks
        if packed:
            out = dequantize_lanes(payload[hlen:], code.numel, code.scale, code.bits, code.layout, size,
                                   head.multiplier)  # the mean over ranks
            if count == 1:
                out.mul_(size)
            ratio = head.stat_sum / (size * _STAT_ONE)
            code.scale = code.scale * ratio if ratio > 0 else None
        else:
            out = payload[hlen:] * (head.multiplier / count)
            if code.bits != FLOAT_BITS:
                mean_max = head.stat_sum / size
                code.scale = mean_max if mean_max > 0 else None
        return out.view(shape).to(dtype)

    # ---- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state: codebook entries (bits, shared scale, reduction count), residuals,
        dither stream."""
        return {"codebook": {c.name: {"bits": c.bits, "scale": c.scale, "version": c.version} for c in self.codebook},
                "feedback": self.error_feedback.state_dict(), "layer_bits": dict(self.layer_bits),
                "rng": None if self._rng is None else self._rng.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        size = self._coll.size()
        numel = {n: p.numel() for n, p in self._params}
        self.layer_bits = dict(state["layer_bits"])
        for name, code in state["codebook"].items():
            entry = self._code(name, numel[name], size)
            if entry.bits != code["bits"]:
                raise checkpoint.StateMismatchError(
                    f"layer {name!r} was saved at {code['bits']} bits and is coded at {entry.bits} here")
            entry.scale, entry.version = code["scale"], code["version"]
        self.error_feedback.load_state_dict(state["feedback"])
        self._rng = None
        if state["rng"] is not None:
            self.rng.load_state_dict(state["rng"])

    def _config(self) -> dict:
        return {"bits": self.bits, "op": self.op, "min_elements": self.min_elements, "seed": self.seed}

    def compression_state_dict(self) -> dict:
        """Every rank's state in one bundle for a checkpoint (see ``hvd_gradq.checkpoint``).
        Collective: call it on every rank of the process set at the same point (after
        ``optimizer.step()``); every rank gets the bundle, so rank 0 alone can save it."""
        numel = {n: p.numel() for n, p in self._params}
        return checkpoint.bundle(gather_objects(self.state_dict(), self.process_set), layers=numel,
                                 config=self._config())

    def load_compression_state_dict(self, state: dict, reset: bool = False) -> None:
        """Resume from ``compression_state_dict()`` on every rank, before the first step. A state
        from another number of ranks, model or setting raises ``StateMismatchError``; with
        ``reset=True`` the compressor starts afresh instead (no residuals, scales recalibrated by a
        float32 step)."""
        if not isinstance(state, dict) or state.get("format") != checkpoint.FORMAT:
            raise TypeError("load_compression_state_dict() takes what compression_state_dict() returned, got "
                            f"{type(state).__name__}")
        numel = {n: p.numel() for n, p in self._params}
        size = self._coll.size()
        if reset and checkpoint.mismatches(state, size=size, layers=numel, config=self._config()):
            self.codebook.layers.clear()
            self.error_feedback.residuals.clear()
            return
        self.load_state_dict(checkpoint.select(state, rank=self._coll.rank(), size=size, layers=numel,
                                               config=self._config(), owner=type(self).__name__))

    # ---- reporting ------------------------------------------------------------------------------
    def wire_stats(self) -> WireStats:
        """Payload bytes of the latest step of every layer seen so far, against float32."""
        vals = self.payloads.values()
        return WireStats(
            payload_bytes=sum(v.nbytes for v in vals),
            fp32_bytes=sum(4 * v.numel for v in vals),
            elements=sum(v.numel for v in vals),
            packed_layers=sum(1 for v in vals if v.packed),
            float_layers=sum(1 for v in vals if not v.packed),
        )

    def payload_bytes(self, numel: int, packed: bool = True, bits: int | None = None) -> int:
        """Predicted payload bytes of a layer of ``numel`` elements (packed, or sent as float32)."""
        size = self._coll.size()
        if packed and numel >= self.min_elements:
            container = torch.int64 if self.op == wire.SUM else torch.float64
            layout = lane_layout(bits or self.bits, size, container)
            return wire.header_len(container, size) * layout.word_bytes + layout.nbytes(numel)
        return (wire.header_len(torch.float32, size) + numel) * 4
