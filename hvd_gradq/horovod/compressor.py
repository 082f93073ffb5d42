"""``UniformCompressor``: the Horovod ``Compressor`` users pass to
``hvd.DistributedOptimizer(compression=...)``.

A thin adapter over the lane protocol (``wire.lane_coder``): Horovod hands ``compress`` a bare
gradient, so the compressor finds the layer it belongs to, asks Horovod for rank and size, and
meets the other ranks in a barrier before a mismatch is raised. The codes are summable, so
Horovod's own allreduce carries them.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from hvd_gradq import checks
from hvd_gradq.bits.rotation import block_for
from hvd_gradq.codebook import Codebook
from hvd_gradq.codecs import ErrorFeedback
from hvd_gradq.codecs.rotated import ROUNDINGS
from hvd_gradq.exchange import state as checkpoint
from hvd_gradq.exchange.timings import StepTimer
from hvd_gradq.horovod.arguments import named_list
from hvd_gradq.horovod.channel import broadcast_object, gather_objects
from hvd_gradq.horovod.collectives import HorovodCollectives
from hvd_gradq.wire.header import AVERAGE, SUM, CodebookMismatchError, ReductionMismatchError
from hvd_gradq.wire.lane_coder import LaneCoder, lane_payload_bytes

try:
    import horovod.torch as hvd
    from horovod.torch.compression import Compressor as _HorovodCompressor
except ImportError as exc:  # pragma: no cover - exercised only without Horovod
    raise ImportError(
        "hvd_gradq needs Horovod with PyTorch support. Run `bash launch/setup.sh` from the hvd_gradq "
        "checkout: it builds Horovod 0.28.1 against torch 2.13.0."
    ) from exc


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


def op_name(op) -> str:
    """``wire.SUM`` / ``wire.AVERAGE`` for Horovod's op (None: Average, Horovod's default)."""
    if op is None or op == hvd.Average:
        return AVERAGE
    if op == hvd.Sum:
        return SUM
    raise ValueError(
        f"op must be hvd.Average (the DistributedOptimizer default) or hvd.Sum, got {op!r}; "
        "pass the same op to hvd.DistributedOptimizer"
    )


class UniformCompressor(_HorovodCompressor):
    """``bits``-bit quantization of every gradient onto evenly spaced levels, packed into summable
    lanes.

    Usage (pass the same ``op`` to both, ``hvd.Sum`` gives the smallest payload)::

        comp = hvd_gradq.UniformCompressor(bits=2, named_parameters=model.named_parameters(),
                                           op=hvd.Sum)
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                       compression=comp, op=hvd.Sum)

    What is communicated, per layer and step: a short header (``wire.header``) and the layer's
    codes packed into int64 lanes (``op=hvd.Sum``) or into exact integers of float64 words
    (``op=hvd.Average``), with headroom for the sum over all ranks. By default (``rotation``) each
    layer is first rotated by a randomized Hadamard transform shared by every rank, and every
    rotation block is quantized against its own scale, the same on all ranks: the MSE-optimal clip
    for the block's RMS in the previous step (``codecs.rotated``), so a sparse or heavy-tailed
    layer codes as well as a Gaussian one; the payload carries one statistic word per block for
    the next scales. With ``rotation=0`` the layer is quantized unrotated, stochastically, against
    one scale (the mean over ranks of max|g + residual| of the previous step). What clipping and
    rounding drop is kept by error feedback. A layer's first step, and any layer with fewer than
    ``min_elements`` elements, is sent as float32.

    Args:
        bits: bit width 1..8 of every quantized layer.
        named_parameters: the model's ``named_parameters()`` (or ``parameters()``); the compressor
            uses them to know which layer a gradient belongs to (Horovod hands it the gradient only).
        op: ``hvd.Average`` (default, as in ``hvd.DistributedOptimizer``) or ``hvd.Sum``.
        min_elements: layers smaller than this are sent as float32 (header included).
        seed: of the rotations (the same on every rank) and of the stochastic rounding (each rank
            and layer draws from its own stream, so the order Horovod hands layers over, e.g.
            with ``groups=``, does not change the result).
        rotation: the largest rotation block, a power of two 8..65536 (default 4096); 0: no
            rotation (one scale per layer, stochastic rounding; the codes before this option).
        rounding: of the rotated codes: "nearest" (default; biased, its error goes to error
            feedback) or "stochastic" (unbiased within the clip).
        process_set: the Horovod process set the optimizer reduces over (pass the same one to
            ``hvd.DistributedOptimizer``); N in the lane headroom is its size.

    The decoded gradient follows Horovod's op: the sum over ranks for ``hvd.Sum``, the mean for
    ``hvd.Average``; under ``hvd.join()`` the joined ranks add nothing and Average still divides by
    N, as in Horovod (afterwards call ``sync_codebook(root_rank=<what hvd.join() returned>)``).
    Sparse gradients: with ``sparse_as_dense=False`` Horovod sends them itself, exactly, without
    calling the compressor; with ``sparse_as_dense=True`` they are coded. In Horovod elastic, pass
    the compressor to the ``TorchState`` (``compressor=comp``). More in docs/HOROVOD_COMPAT.md.
    """

    def __init__(self, bits: int, named_parameters: Iterable[tuple[str, torch.Tensor]], *, op=None,
                 min_elements: int = 1024, seed: int = 0, rotation: int = 4096, rounding: str = "nearest",
                 process_set=None) -> None:
        self.bits = checks.integer(bits, "bits", 1, 8)
        self.rotation = checks.rotation_block(rotation, "rotation")
        self.rounding = checks.choice(rounding, "rounding", ROUNDINGS)
        self.min_elements = checks.integer(min_elements, "min_elements", low=0)
        self.seed = checks.integer(seed, "seed")
        self._params = named_list(named_parameters, type(self).__name__)
        self.op = op_name(op)
        self.process_set = hvd.global_process_set if process_set is None else process_set
        if not isinstance(self.process_set, hvd.ProcessSet):
            raise ValueError(f"process_set must be a horovod.torch ProcessSet, got {process_set!r}")
        self._coll = HorovodCollectives(self.process_set)
        self.codebook = Codebook()
        self.error_feedback = ErrorFeedback()
        self._lanes: LaneCoder | None = None  # made at the first step, once Horovod knows rank and size
        self._index = {n: i for i, (n, _) in enumerate(self._params)}
        self._cursor = 0  # where the last gradient was found; backward visits layers in order
        self._grad_names: dict[int, str] = {}
        #: layers found by their sparse gradient (sparse_as_dense=True) and not yet decompressed
        self._densified: set[str] = set()
        #: per layer, what its latest compress handed to Horovod
        self.payloads: dict[str, PayloadInfo] = {}
        #: seconds in ``compress`` (encode) and ``decompress`` (decode), accumulated in
        #: ``timer.current`` until ``timer.reset()``; Horovod's own waiting is the caller's to time
        self.timer = StepTimer()
        from hvd_gradq.horovod import elastic  # noqa: F401 - TorchState(compressor=...) keeps its state

    # ---- the lane coder, for the current number of ranks ----------------------------------------
    def _coder(self) -> LaneCoder:
        rank, size = self._coll.rank(), self._coll.size()
        if self._lanes is None:
            self._lanes = LaneCoder(bits=self.bits, op=self.op, min_elements=self.min_elements, seed=self.seed,
                                    rank=rank, size=size, codebook=self.codebook, residuals=self.error_feedback,
                                    label=type(self).__name__, rotation=self.rotation, rounding=self.rounding)
        elif (self._lanes.rank, self._lanes.size) != (rank, size):
            # the world changed (Horovod elastic): lanes sized for fewer ranks could carry into each
            # other, so every rank starts a fresh codebook (one float32 step) at this same step
            self._lanes.restart(rank, size)
            self._densified.clear()
        return self._lanes

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

    # ---- Horovod Compressor interface -----------------------------------------------------------
    def compress(self, tensor: torch.Tensor):
        if tensor.is_sparse:  # Horovod's grouped path (groups=) hands sparse gradients over as they are
            raise ValueError(
                f"{type(self).__name__} compresses dense gradients only; this parameter has a sparse "
                "gradient (e.g. nn.Embedding(sparse=True)) and hvd.DistributedOptimizer(groups=...) does not "
                "densify it. Leave groups unset (sparse gradients then work with sparse_as_dense=True or "
                "False), build the layer with sparse=False, or use hvd_gradq.DistributedOptimizer."
            )
        t = time.perf_counter()
        name = self._name_of(tensor)
        frozen = not self._params[self._index[name]][1].requires_grad
        payload, ctx = self._coder().encode(name, tensor, frozen=frozen)
        self.payloads[name] = PayloadInfo(payload.dtype, payload.numel() * payload.element_size(), tensor.numel(),
                                          ctx.packed)
        self.timer.add("encode", time.perf_counter() - t)
        return payload, ctx

    def decompress(self, payload: torch.Tensor, ctx):
        if ctx is None:
            # Horovod's own sparse path (a sparse gradient, sparse_as_dense=False): it allgathered the
            # values and indices exactly, without calling compress; there is nothing to decode
            return payload
        self._densified.discard(ctx.name)
        t = time.perf_counter()
        try:
            return self._lanes.decode(payload, ctx)
        except (ReductionMismatchError, CodebookMismatchError) as e:
            # Every rank reaches this verdict from the same reduced words, but a fast rank must not
            # exit (shutting Horovod down) while a slow one is still submitting this step's
            # gradients: meet in a barrier first, so that every rank raises this error. Not when
            # ranks have joined (hvd.join()): they take no part in a barrier.
            if e.ranks in (None, self._lanes.size):
                self._coll.barrier()
            raise
        finally:
            self.timer.add("decode", time.perf_counter() - t)

    def sync_codebook(self, root_rank: int) -> None:
        """Take the codebook (per-layer scales and reduction counts) of global rank ``root_rank``.

        After ``hvd.join()``: the ranks that joined early missed the reductions the others went
        on with, so their codebooks are behind. Call it on every rank of the process set after the
        join, with what ``hvd.join()`` returned (the rank that joined last), next to
        ``hvd.broadcast_parameters(model.state_dict(), root_rank=...)``. Residuals stay local.
        Horovod elastic calls it (root 0) on sync when the compressor is in the ``TorchState``."""
        coder = self._coder()
        shared = broadcast_object(self.codebook.state_dict() if hvd.rank() == root_rank else None, self.process_set,
                                  root=root_rank)
        self._follow(coder, shared["layers"])

    def _follow(self, coder: LaneCoder, layers: dict) -> None:
        for name in [n for n in self.codebook.layers if n not in layers]:
            del self.codebook.layers[name]
        for name, state in layers.items():
            entry = coder.code_of(name, state["numel"])
            if entry.bits != state["bits"]:
                raise checkpoint.StateMismatchError(
                    f"layer {name!r} was coded at {state['bits']} bits there and is coded at {entry.bits} here")
            entry.follow(state)

    # ---- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state: codebook, residuals, dither streams (one per layer)."""
        return {"codebook": self.codebook.state_dict(), "feedback": self.error_feedback.state_dict(),
                "lanes": None if self._lanes is None else self._lanes.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        coder = self._coder()
        self._follow(coder, state["codebook"]["layers"])
        self.error_feedback.load_state_dict(state["feedback"])
        if state["lanes"] is not None:
            coder.load_state_dict(state["lanes"])

    def _config(self) -> dict:
        return {"bits": self.bits, "op": self.op, "min_elements": self.min_elements, "seed": self.seed,
                "rotation": self.rotation, "rounding": self.rounding}

    def _layers(self) -> dict[str, int]:
        return {n: p.numel() for n, p in self._params}

    def compression_state_dict(self) -> dict:
        """Every rank's state in one bundle for a checkpoint (``exchange.state``). Collective: call
        it on every rank of the process set at the same point (after ``optimizer.step()``); every
        rank gets the bundle, so rank 0 alone can save it."""
        return checkpoint.bundle(gather_objects(self.state_dict(), self.process_set), layers=self._layers(),
                                 config=self._config())

    def load_compression_state_dict(self, state: dict, reset: bool = False) -> None:
        """Resume from ``compression_state_dict()`` on every rank, before the first step. A state
        from another number of ranks, model or setting raises ``StateMismatchError``; with
        ``reset=True`` the compressor starts afresh instead (no residuals, scales recalibrated by a
        float32 step)."""
        parts = checkpoint.parts_to_resume(state, owner=type(self).__name__, size=self._coll.size(),
                                           ranks=[self._coll.rank()], layers=self._layers(), config=self._config(),
                                           reset=reset)
        if parts is None:
            self.codebook.clear()
            self.error_feedback.residuals.clear()
            return
        self.load_state_dict(parts[0])

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
        packed = packed and numel >= self.min_elements
        block = block_for(numel, self.rotation) if self.rotation else 0
        return lane_payload_bytes(numel, (bits or self.bits) if packed else None, self._coll.size(), self.op, block)
