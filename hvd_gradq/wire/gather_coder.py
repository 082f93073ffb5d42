"""One layer's coding for the transports that gather instead of sum (allgather, two-phase).

A ``GatherCoder`` joins a codec (``codecs``), error feedback and the frame header
(``wire.frames``); it produces and consumes uint8 frames and knows nothing about how they travel
(``exchange.exchanges`` moves them). Pure tensor code: rank and size are the coder's; the
codebook stamp (version, layer digest) and whether the parameter is frozen are call arguments.

Error feedback is kept at two places, as in two-phase compressed allreduce schemes:
  * worker residual, per layer: what this rank's encoding of g + r dropped;
  * server residual, per layer, on the chunk this rank reduces in the two-phase exchange: what
    requantizing the chunk's sum dropped (so requantization error is not lost either).
Both are staged and committed only once every frame of the step said its sender was finite.
"""
from __future__ import annotations

import math

import torch

from hvd_gradq.bits.chunks import chunk_bounds
from hvd_gradq.bits.dither import DitherSource
from hvd_gradq.codecs import Codec, ErrorFeedback, JointSQCodec, JointSQState
from hvd_gradq.codecs.rotated import RotatedCodec
from hvd_gradq.codecs.shared_scale import abs_max
from hvd_gradq.wire.frames import FRAME_HEADER_BYTES, FrameHeader, check_frames, frame, parse_frames

#: two-phase chunk granularity of JointSQ: its per-payload header and position slack make tiny
#: chunks cost more than their share (and land further below the target size the cost model uses)
JOINTSQ_CHUNK_ALIGN = 4096


def _align_of(codec: Codec, numel: int) -> int:
    if isinstance(codec, JointSQCodec):
        return JOINTSQ_CHUNK_ALIGN
    if isinstance(codec, RotatedCodec):  # whole rotation blocks of the layer: no chunk pads more
        return codec.block(numel)
    # chunk boundaries on bucket boundaries keep two-phase chunks coded exactly like the whole layer
    return max(8, int(getattr(codec, "bucket_size", 8)))


def layer_bounds(codec: Codec, numel: int, size: int) -> list[int]:
    """The two-phase chunk boundaries of a layer: one chunk per rank, on the codec's buckets (on
    the layer's rotation blocks for the rotated code)."""
    return chunk_bounds(numel, size, _align_of(codec, numel))


def _body_bytes(codec: Codec, numel: int) -> int:
    return 0 if numel == 0 else codec.payload_bytes(numel)


def frame_bytes(codec: Codec, numel: int) -> int:
    """Bytes of one rank's allgather frame of a layer of ``numel`` elements."""
    return FRAME_HEADER_BYTES + _body_bytes(codec, numel)


def chunk_frame_bytes(codec: Codec, numel: int, size: int) -> list[int]:
    """Bytes of the frame of each two-phase chunk (chunk j goes to rank j)."""
    bounds = layer_bounds(codec, numel, size)
    return [FRAME_HEADER_BYTES + _body_bytes(codec, b - a) for a, b in zip(bounds, bounds[1:])]


class GatherCoder:
    """Frames of one layer of ``numel`` elements coded with ``codec`` across ``size`` ranks."""

    def __init__(self, name: str, numel: int, codec: Codec, *, rank: int, size: int, rng: DitherSource,
                 worker_feedback: ErrorFeedback | None, server_feedback: ErrorFeedback | None,
                 label: str = "the optimizer") -> None:
        if not 0 <= rank < size:
            raise ValueError(f"rank must be in [0, {size}), got {rank}")
        self.name = name
        self.numel = numel
        self.codec = codec
        self.rank = rank
        self.size = size
        self.rng = rng
        self.worker_feedback = worker_feedback
        self.server_feedback = server_feedback
        self.bounds = layer_bounds(codec, numel, size)
        self._states: dict[int, JointSQState] = {}
        self._staged = False
        self._server_staged = False
        #: what error messages tell the user to build identically on every rank
        self.label = label
        #: measure the coding error of this rank's encoding (``last_error``): two extra reductions
        self.track_error = False
        #: (||decoded - x||^2, ||x||^2) of this rank's latest encoding of the layer (worker side)
        self.last_error: tuple[float, float] | None = None

    # ---- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The dither stream, JointSQ's per-chunk reallocation state and the codec's own state
        (e.g. fitted levels)."""
        state: dict = {"jointsq": {k: (s.R, s.last_noise) for k, s in self._states.items()},
                       "rng": self.rng.state_dict()}
        if hasattr(self.codec, "state_dict"):
            state["codec"] = self.codec.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._states = {int(k): JointSQState(R=r, last_noise=h) for k, (r, h) in state["jointsq"].items()}
        self.rng.load_state_dict(state["rng"])
        if "codec" in state and hasattr(self.codec, "load_state_dict"):
            self.codec.load_state_dict(state["codec"])

    # ---- coding ---------------------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 body, coding error x - decoded) of ``x``."""
        if x.numel() == 0:
            return torch.zeros(0, dtype=torch.uint8), x
        if isinstance(self.codec, JointSQCodec):
            enc = self.codec.encode(x, self.rng, self._states.setdefault(key, JointSQState()))
            err = x - self.codec.decode(enc)
        else:
            enc, err = self.codec.encode_error(x, self.rng)
        return self.codec.to_bytes(enc), err

    def _decode_into(self, body: torch.Tensor, out: torch.Tensor, first: bool = False) -> None:
        """Add the decoded ``body`` to ``out`` (``first``: write it; ``out`` holds garbage)."""
        if out.numel():
            self.codec.decode_into(self.codec.from_bytes(body, out.numel()), out, accumulate=not first)

    def _read(self, buf: torch.Tensor) -> tuple[list[tuple[FrameHeader, torch.Tensor]], bool]:
        """One frame per rank from ``buf``, checked for agreement; and whether any sender was non-finite."""
        frames = parse_frames(buf, self.size, layer=self.name)
        return frames, check_frames([h for h, _ in frames], layer=self.name, what=self.label)

    @staticmethod
    def _frame(body: torch.Tensor, nonfinite: bool, stamp: tuple[int, int]) -> torch.Tensor:
        version, digest = stamp
        return frame(body, version=version, digest=digest, nonfinite=nonfinite)

    def _compensated(self, g: torch.Tensor, frozen: bool) -> tuple[torch.Tensor, bool]:
        g = g.detach().reshape(-1)
        if self.worker_feedback is not None and not frozen:
            self.worker_feedback.buffer(self.name, g)  # zeros at the first step, so commit can swap
            x = self.worker_feedback.compensate(self.name, g)
        else:
            x = g.to(torch.float32).contiguous()
        return x, not math.isfinite(abs_max(x))

    def _stage_worker(self, x: torch.Tensor, err: torch.Tensor, frozen: bool) -> None:
        if self.track_error:
            self.last_error = (float(err.square().sum()), float(x.square().sum()))
        if self.worker_feedback is not None and not frozen:
            self.worker_feedback.staging(self.name, x).copy_(err)
            self._staged = True

    def _finish(self, out: torch.Tensor, nonfinite: bool) -> torch.Tensor:
        if nonfinite:  # every rank returns NaN; residuals stay as they were
            self._staged = self._server_staged = False
            return out.fill_(float("nan"))
        if self._staged:
            self.worker_feedback.commit(self.name)
        if self._server_staged:
            self.server_feedback.commit(self.name)
        self._staged = self._server_staged = False
        return out

    # ---- allgather ------------------------------------------------------------------------------------
    def encode_layer(self, g: torch.Tensor, *, stamp: tuple[int, int], frozen: bool = False) -> torch.Tensor:
        """This rank's frame of the whole layer. ``stamp``: (codebook version, layer digest);
        ``frozen``: the parameter does not require grad now (its residual is left alone)."""
        if self.worker_feedback is not None and not frozen and not self.track_error:
            fused = self._encode_compensated(g, stamp)
            if fused is not None:
                return fused
        x, nonfinite = self._compensated(g, frozen)
        if nonfinite:
            return self._frame(torch.zeros(0, dtype=torch.uint8), True, stamp)
        body, err = self._encode(x, -1)
        self._stage_worker(x, err, frozen)
        return self._frame(body, False, stamp)

    def _encode_compensated(self, g: torch.Tensor, stamp: tuple[int, int]) -> torch.Tensor | None:
        """The frame of codecs that code g + r without materialising it (``Codec.encode_compensated``;
        the residual goes straight into the staging buffer); None where the codec has no such path."""
        flat = g.detach().reshape(-1)
        r = self.worker_feedback.buffer(self.name, flat)  # zeros at the first step, so commit can swap
        done = self.codec.encode_compensated(flat, r, self.rng, self.worker_feedback.staging(self.name, flat))
        if done is None:
            return None
        enc, finite = done
        if not finite:  # every rank will decode NaN; the residual stays
            return self._frame(torch.zeros(0, dtype=torch.uint8), True, stamp)
        self._staged = True
        return self._frame(self.codec.to_bytes(enc), False, stamp)

    def sum_frames(self, buf: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (float32, (numel,)) of the gathered frames; identical on every rank."""
        frames, nonfinite = self._read(buf)
        out = torch.empty(self.numel, dtype=torch.float32)
        if not nonfinite:
            for i, (_, body) in enumerate(frames):
                self._decode_into(body, out, first=i == 0)
        return self._finish(out, nonfinite)

    # ---- two-phase ------------------------------------------------------------------------------------
    def encode_chunks(self, g: torch.Tensor, *, stamp: tuple[int, int], frozen: bool = False,
                      ) -> tuple[torch.Tensor, list[int]]:
        """One frame per chunk, chunk j for rank j, concatenated; and the byte split per rank."""
        x, nonfinite = self._compensated(g, frozen)
        frames = []
        if nonfinite:
            frames = [self._frame(torch.zeros(0, dtype=torch.uint8), True, stamp) for _ in range(self.size)]
        else:
            err = torch.empty_like(x)
            for j, (a, b) in enumerate(zip(self.bounds, self.bounds[1:])):
                body, e = self._encode(x[a:b], j)
                err[a:b] = e
                frames.append(self._frame(body, False, stamp))
            self._stage_worker(x, err, frozen)
        return torch.cat(frames), [f.numel() for f in frames]

    def reduce_own_chunk(self, buf: torch.Tensor, *, stamp: tuple[int, int]) -> torch.Tensor:
        """From every rank's frame of this rank's chunk: decode, sum, requantize (with the server
        residual), and return the frame to allgather."""
        frames, nonfinite = self._read(buf)
        a, b = self.bounds[self.rank], self.bounds[self.rank + 1]
        if nonfinite:
            return self._frame(torch.zeros(0, dtype=torch.uint8), True, stamp)
        y = torch.zeros(b - a, dtype=torch.float32)
        for _, body in frames:
            self._decode_into(body, y)
        if self.server_feedback is not None and y.numel():
            self.server_feedback.buffer(self.name, y)
            y = self.server_feedback.compensate(self.name, y)
        body, err = self._encode(y, self.size + self.rank)
        if self.server_feedback is not None and y.numel():
            self.server_feedback.staging(self.name, y).copy_(err)
            self._server_staged = True
        return self._frame(body, False, stamp)

    def assemble(self, buf: torch.Tensor) -> torch.Tensor:
        """The whole layer's sum over ranks from the gathered requantized chunks."""
        frames, nonfinite = self._read(buf)
        out = torch.zeros(self.numel, dtype=torch.float32)
        if not nonfinite:
            for j, (_, body) in enumerate(frames):
                self._decode_into(body, out[self.bounds[j]:self.bounds[j + 1]])
        return self._finish(out, nonfinite)
