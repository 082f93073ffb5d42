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
from hvd_gradq.broadcast import broadcast_codebook, gather_objects
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
    ``hvd.Average``; under ``hvd.join()`` the joined ranks add nothing and Average still divides by
    N, as in Horovod (afterwards call ``sync_codebook(root_rank=<what hvd.join() returned>)``).
    Sparse gradients: with ``sparse_as_dense=False`` Horovod sends them itself, exactly, without
    calling the compressor; with ``sparse_as_dense=True`` they are coded. In Horovod elastic, pass
    the compressor to the ``TorchState`` (``compressor=comp``). More in docs/HOROVOD_COMPAT.md.
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
            raise ValueError("pass named_parameters=model.named_parameters() (or model.parameters())")
        params = list(named_parameters)
        if params and all(isinstance(p, torch.Tensor) for p in params):  # model.parameters(): name by position
            params = [(f"allreduce.noname.{i}", p) for i, p in enumerate(params)]
        if not params or not all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], torch.Tensor)
            for p in params
        ):
            raise ValueError(
                "named_parameters must be a non-empty iterable of (name, tensor) pairs, "
                "e.g. model.named_parameters(), or of tensors (model.parameters())"
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
        #: the number of ranks the codebook is for; None when the owner of a shared codebook
        #: (hvd_gradq.DistributedOptimizer) rebuilds it itself after the world size changed
        self._codebook_size = self._coll.size() if codebook is None else None
        #: per-layer bit widths that override ``bits`` (set by ``hvd_gradq.DistributedOptimizer``)
        self.layer_bits: dict[str, int] = {}
        #: what error messages tell the user to construct identically on every rank
        self.label = type(self).__name__
        self.error_feedback = ErrorFeedback()
        self._params = params
        self._index = {n: i for i, n in enumerate(names)}
        self._cursor = 0  # where the last gradient was found; backward visits layers in order
        self._grad_names: dict[int, str] = {}
        #: layers found by their sparse gradient (sparse_as_dense=True) and not yet decompressed
        self._densified: set[str] = set()
        self._rng: DitherSource | None = None  # seeded from (seed, rank) at the first step
        #: per layer, what its latest compress handed to Horovod
        self.payloads: dict[str, PayloadInfo] = {}
        import hvd_gradq.elastic  # noqa: F401 - hvd.elastic.TorchState(compressor=...) keeps its state

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
        name = self._densified_name(grad)
        if name is not None:
            return name
        if any(p is grad for _, p in self._params):
            raise ValueError(
                f"{type(self).__name__} was given a parameter instead of its gradient: that is "
                "hvd.DistributedOptimizer with op=hvd.Adasum, whose reduction is not a sum of codes. "
                "Use op=hvd.Average or op=hvd.Sum (the same in the optimizer and the compressor)."
            )
        raise ValueError(
            f"{type(self).__name__} was given a tensor of shape {tuple(grad.shape)} that is not the "
            "gradient of any parameter in its named_parameters. Pass the same model's "
            "named_parameters() to the compressor and to hvd.DistributedOptimizer; the compressor "
            "cannot be used with hvd.allreduce on arbitrary tensors."
        )

    def _densified_name(self, dense: torch.Tensor) -> str | None:
        """The layer whose sparse gradient ``dense`` is a dense copy of (Horovod's
        ``sparse_as_dense=True`` hands ``compress`` ``p.grad.to_dense()``, not ``p.grad``)."""
        found = [n for n, p in self._params if p.grad is not None and p.grad.is_sparse
                 and p.grad.shape == dense.shape and n not in self._densified]
        if len(found) > 1:  # several sparse layers of this shape: the one with these values
            by_name = dict(self._params)
            found = [n for n in found if torch.equal(by_name[n].grad.to_dense(), dense)]
        if len(found) > 1:
            raise ValueError(
                f"{type(self).__name__}: the sparse gradients of {found} are equal this step, so the "
                "dense copy Horovod made (sparse_as_dense=True) cannot be told apart; build these "
                "layers with sparse=False, or use hvd_gradq.DistributedOptimizer"
            )
        if not found:
            return None
        self._densified.add(found[0])
        return found[0]

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
        if tensor.is_sparse:  # Horovod's grouped path (groups=) hands sparse gradients over as they are
            raise ValueError(
                f"{type(self).__name__} compresses dense gradients only; this parameter has a sparse "
                "gradient (e.g. nn.Embedding(sparse=True)) and hvd.DistributedOptimizer(groups=...) does not "
                "densify it. Leave groups unset (sparse gradients then work with sparse_as_dense=True or "
                "False), build the layer with sparse=False, or use hvd_gradq.DistributedOptimizer."
            )
        name = self._name_of(tensor)
        return self.compress_layer(name, tensor, frozen=not self._params[self._index[name]][1].requires_grad)

    def compress_layer(self, name: str, tensor: torch.Tensor, frozen: bool = False):
        """``compress`` for a gradient whose layer name the caller knows. ``frozen``: the parameter
        does not require grad now (Horovod still sends zeros for it): it goes as exact float32,
        its residual is neither added nor replaced, so a frozen layer stays where it is; its
        scale is recalibrated when it is unfrozen."""
        rank, size = self._coll.rank(), self._coll.size()
        if self._codebook_size not in (None, size):
            self.restart_codebook()
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
        if ctx is None:
            # Horovod's own sparse path (a sparse gradient, sparse_as_dense=False): it allgathered the
            # values and indices exactly, without calling compress; there is nothing to decode
            return payload
        name, shape, dtype, packed, track = ctx
        self._densified.discard(name)
        size = self._coll.size()
        code = self.codebook[name]
        hlen = wire.header_len(payload.dtype, size)
        try:
            head = wire.read_header(payload[:hlen], size=size, op=self.op, layer=name,
                                    compressor=self.label)
        except (wire.ReductionMismatchError, wire.CodebookMismatchError) as e:
            # Every rank reaches this verdict from the same reduced words, but a fast rank must not
            # exit (shutting Horovod down) while a slow one is still submitting this step's
            # gradients: meet in a barrier first, so that every rank raises this error. Not when
            # ranks have joined (hvd.join()): they take no part in a barrier.
            if e.ranks in (None, size):
                self._coll.barrier()
            raise
        code.version += 1
        if head.nonfinite:  # some rank had NaN/Inf: every rank decodes NaN, residuals stay as they were
            return torch.full(shape, float("nan"), dtype=dtype, device=payload.device)
        if track:  # packed: the staged residual; float32: sent exactly, nothing left
            self.error_feedback.commit(name, zero=not packed)
        k = head.ranks  # the ranks that contributed: all, or those that have not called hvd.join()
        if packed:
            out = dequantize_lanes(payload[hlen:], code.numel, code.scale, code.bits, code.layout, k,
                                   head.multiplier)  # the mean over the contributing ranks
            # Horovod's op: the sum over ranks, or that sum divided by N (also when ranks joined)
            factor = k if self.op == wire.SUM else k / size
            if factor != 1:
                out.mul_(factor)
            ratio = head.stat_sum / (k * _STAT_ONE)
            code.scale = code.scale * ratio if ratio > 0 else None
        else:
            out = payload[hlen:] * (head.multiplier / (size if self.op == wire.AVERAGE else 1))
            if code.bits != FLOAT_BITS:
                mean_max = head.stat_sum / k
                code.scale = mean_max if mean_max > 0 else None
        return out.view(shape).to(dtype)

    def restart_codebook(self) -> None:
        """Start a fresh codebook for the current number of ranks: every layer's lanes are laid
        out anew and its scale is recalibrated by one float32 step (residuals stay). It happens by
        itself at the first step after the world size changed (Horovod elastic), on every rank at
        the same step, since lanes sized for fewer ranks could carry into each other."""
        self.codebook.layers.clear()
        self._densified.clear()
        self._codebook_size = self._coll.size()

    def sync_codebook(self, root_rank: int) -> None:
        """Take the codebook (per-layer scales and reduction counts) of global rank ``root_rank``.

        After ``hvd.join()``: the ranks that joined early missed the reductions the others went
        on with, so their codebooks are behind. Call it on every rank of the process set after the
        join, with what ``hvd.join()`` returned (the rank that joined last), next to
        ``hvd.broadcast_parameters(model.state_dict(), root_rank=...)``. Residuals stay local.
        Horovod elastic calls it (root 0) on sync when the compressor is in the ``TorchState``."""
        if self._codebook_size not in (None, self._coll.size()):
            self.restart_codebook()
        mine = None
        if hvd.rank() == root_rank:
            mine = {"layer_bits": dict(self.layer_bits),
                    "layers": {c.name: (c.numel, c.scale, c.version) for c in self.codebook}}
        shared = broadcast_codebook(mine, self.process_set, root=root_rank)
        self.layer_bits = dict(shared["layer_bits"])
        for name in [n for n in self.codebook.layers if n not in shared["layers"]]:
            del self.codebook.layers[name]
        for name, (numel, scale, version) in shared["layers"].items():
            entry = self._code(name, numel, self._coll.size())
            entry.scale, entry.version = scale, version

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
        for name in [n for n in self.codebook.layers if n not in state["codebook"]]:
            del self.codebook.layers[name]  # made after the state was taken (elastic restore)
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
