"""Bucketed level-set quantizers: QSGD, QSGDinf, NUQSGD, natural compression, TernGrad, ALQ, AMQ.

Every one of them is the same machine with a different set of magnitude levels:

* split the layer into buckets of ``bucket_size`` elements; each bucket sends its norm (L2 or
  L-infinity) as float32;
* each element's normalised magnitude r = |x| / norm in [0, 1] is stochastically rounded to one
  of the two neighbouring levels of 0 = l_0 < ... < l_(m-1) = 1 (unbiased: E[level] = r);
* the code is (level index << 1) | sign, ``bits`` bits per element with m = 2**(bits-1)
  magnitude levels, packed into a byte stream.

Decoding is norm * l_k * sign. ``bits=0`` sends nothing and decodes to zeros (the layer's
gradient then lives in error feedback). NaN/Inf anywhere in the input make every decoded value
NaN, so an AMP GradScaler still sees the overflow.

Level sets (m magnitude levels):
  uniform      l_k = k / (m-1)                       QSGD (L2), QSGDinf (L-inf)
  exponential  (0, p^(m-2), ..., p, 1), p = 1/2      NUQSGD (L2), natural compression (L-inf:
                                                     powers of two of the bucket maximum)
  ternary      (0, 1) at 2 bits                      TernGrad (L-inf)
  ALQ / AMQ    fitted to sampled coordinates (``fit``), shared by all ranks via the codebook
"""
from __future__ import annotations

import torch

from hvd_gradq import checks
from hvd_gradq.bits import native
from hvd_gradq.bits.bitstream import pack_bits, packed_nbytes, unpack_bits
from hvd_gradq.bits.dither import DitherSource
from hvd_gradq.codecs.adaptive import (
    exponential_levels,
    fit_alq,
    fit_amq,
    normalized_coordinates,
    normalized_variance,
)
from hvd_gradq.codecs.base import Codec, Encoded, flat_float32

NORMS = ("l2", "linf")


def linear_levels(count: int) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, count, dtype=torch.float32)


class LevelCodec(Codec):
    """Bucketed stochastic quantization onto a fixed set of magnitude levels (see module doc)."""

    def __init__(self, bits: int, levels: torch.Tensor | None, *, norm: str = "l2", bucket_size: int = 1024,
                 name: str = "levels") -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not (bits == 0 or 2 <= bits <= 8):
            raise ValueError(
                f"{name}: bits must be 0 or in 2..8 (1 sign bit + level bits; qsgd and qsgdinf also take 1), "
                f"got {bits!r}"
            )
        if norm not in NORMS:
            raise ValueError(f"{name}: norm must be one of {NORMS}, got {norm!r}")
        checks.integer(bucket_size, f"{name}: bucket_size", low=1)
        super().__init__(bits)
        self.name = name
        self.norm = norm
        self.bucket_size = bucket_size
        self.levels = torch.zeros(1) if bits == 0 else self._check_levels(levels)

    @property
    def level_count(self) -> int:
        return 1 << (self.bits - 1) if self.bits else 0

    def _check_levels(self, levels: torch.Tensor) -> torch.Tensor:
        lv = torch.as_tensor(levels, dtype=torch.float32).reshape(-1)
        if lv.numel() != self.level_count:
            raise ValueError(
                f"{self.name}: {self.bits} bits carry {self.level_count} magnitude levels, got {lv.numel()}"
            )
        if lv[0] != 0 or lv[-1] != 1 or bool((lv[1:] <= lv[:-1]).any()):
            raise ValueError(f"{self.name}: levels must rise strictly from 0 to 1, got {lv.tolist()}")
        return lv

    def set_levels(self, levels: torch.Tensor) -> None:
        """Replace the level set (all ranks must use the same: it belongs in the codebook)."""
        self.levels = self._check_levels(levels)

    # ---- layout -------------------------------------------------------------------------------
    def buckets(self, numel: int) -> int:
        return -(-numel // self.bucket_size) if self.bits else 0

    def layout(self, numel: int) -> list[tuple[str, torch.dtype, int]]:
        if self.bits == 0:
            return []
        return [("norms", torch.float32, self.buckets(numel)), ("codes", torch.uint8, packed_nbytes(numel, self.bits))]


    # ---- encode / decode ----------------------------------------------------------------------
    def _norms(self, x: torch.Tensor) -> torch.Tensor:
        """Per-bucket norms (float32, (buckets,)); the last bucket may be partial."""
        n, b = x.numel(), self.bucket_size
        lib = native.load() if x.device.type == "cpu" and self.norm == "linf" else None
        if lib is not None:  # torch's inf-norm reduction is ~20x slower than its L2 one here
            out = torch.empty(self.buckets(n), dtype=torch.float32)
            lib.hvdgq_bucket_absmax(x.data_ptr(), n, b, out.data_ptr())
            return out
        full = (n // b) * b
        ord_ = 2 if self.norm == "l2" else float("inf")
        parts = [torch.linalg.vector_norm(x[:full].view(-1, b), ord=ord_, dim=1)]
        if full < n:
            parts.append(torch.linalg.vector_norm(x[full:], ord=ord_).view(1))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def encode(self, x: torch.Tensor, rng: DitherSource) -> Encoded:
        x = flat_float32(x).contiguous()
        n = x.numel()
        if self.bits == 0:
            return Encoded(n, {})
        norms = self._norms(x)
        if not bool(torch.isfinite(norms).all()):  # NaN/Inf (or an L2 overflow): decode to NaN everywhere
            return Encoded(n, {"norms": torch.full_like(norms, float("nan")),
                               "codes": torch.zeros(packed_nbytes(n, self.bits), dtype=torch.uint8)})
        inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
        lib = native.load() if x.device.type == "cpu" else None
        if lib is not None:
            out = torch.empty(packed_nbytes(n, self.bits), dtype=torch.uint8)
            lv, table = self.levels.contiguous(), self._interval_table()
            lib.hvdgq_encode_levels(x.data_ptr(), n, self.bucket_size, inv.data_ptr(), lv.data_ptr(),
                                    self.level_count, int(self._uniform), table.data_ptr(), table.numel() - 1,
                                    rng.key(), self.bits, out.data_ptr())
            return Encoded(n, {"norms": norms, "codes": out})
        return Encoded(n, {"norms": norms, "codes": pack_bits(self._reference_codes(x, inv, rng), self.bits)})

    def _interval_table(self, size: int = 4096) -> torch.Tensor:
        """int16 (size + 1,): for r = t / size, the largest level index <= r (capped at m - 2)."""
        cached = getattr(self, "_table", None)
        if cached is not None and cached[0] is self.levels:
            return cached[1]
        grid = torch.arange(size + 1, dtype=torch.float32) / size
        idx = (torch.searchsorted(self.levels, grid, right=True) - 1).clamp_(0, self.level_count - 2)
        table = idx.to(torch.int16).contiguous()
        self._table = (self.levels, table)
        return table

    @property
    def _uniform(self) -> bool:
        return self.name in ("qsgd", "qsgdinf")

    def _reference_codes(self, x: torch.Tensor, inv: torch.Tensor, rng: DitherSource) -> torch.Tensor:
        """The torch path (any device): codes (k << 1 | sign) as uint8, same arithmetic as the kernel."""
        n = x.numel()
        r = (x.abs() * inv.repeat_interleave(self.bucket_size)[:n]).clamp_(max=1.0)
        u = rng.uniform(n, r.device)
        m = self.level_count
        if self._uniform:  # uniform levels: the interval index is a floor
            k = r.mul_(m - 1).add_(u).floor_().clamp_(max=m - 1)
        else:
            lv = self.levels.to(r.device)
            idx = (torch.searchsorted(lv, r, right=True) - 1).clamp_(0, m - 2)
            lo = lv[idx]
            up = (r - lo) > u * (lv[idx + 1] - lo)  # round up with probability (r - lo) / (hi - lo)
            k = idx.add_(up)
        return k.to(torch.uint8).bitwise_left_shift_(1).bitwise_or_(torch.signbit(x).to(torch.uint8))

    def decode(self, enc: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 (numel,) values; written into ``out`` (contiguous float32 CPU, numel elements)
        when given, which spares the allocation."""
        n = enc.numel
        if self.bits == 0:
            return torch.zeros(n) if out is None else out.zero_()
        stream, norms = enc.parts["codes"], enc.parts["norms"]
        lib = native.load() if stream.device.type == "cpu" else None
        if lib is not None:
            if out is None:
                out = torch.empty(n, dtype=torch.float32)
            elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != n:
                raise ValueError(f"out must be a contiguous float32 tensor of {n} elements")
            lv = self.levels.contiguous()
            lib.hvdgq_decode_levels(stream.contiguous().data_ptr(), n, self.bucket_size,
                                    norms.contiguous().data_ptr(), lv.data_ptr(), self.bits, out.data_ptr())
            return out
        codes = unpack_bits(stream, self.bits, n)
        mag = self.levels.to(codes.device)[(codes >> 1).long()]
        val = mag.mul_(norms.repeat_interleave(self.bucket_size)[:n])
        val = torch.where((codes & 1).bool(), -val, val)
        return val if out is None else out.copy_(val.view(out.shape))

    def state_dict(self) -> dict:
        return {"levels": self.levels.clone()}

    def load_state_dict(self, state: dict) -> None:
        if self.bits:
            self.set_levels(state["levels"])


class OneBitCodec(LevelCodec):
    """QSGD / QSGDinf at 1 bit: each element becomes +norm or -norm, with P(+) = (1 + x/norm) / 2,
    so E = x for |x| <= norm (variance norm^2 - x^2). Sign-magnitude codes need 2 bits; this is
    the 1-bit member of the uniform family. Torch path only (no C kernel)."""

    def __init__(self, *, norm: str, bucket_size: int, name: str) -> None:
        super().__init__(2, torch.tensor([0.0, 1.0]), norm=norm, bucket_size=bucket_size, name=name)
        self.bits = 1

    def encode(self, x: torch.Tensor, rng: DitherSource) -> Encoded:
        x = flat_float32(x).contiguous()
        n = x.numel()
        norms = self._norms(x)
        if not bool(torch.isfinite(norms).all()):
            return Encoded(n, {"norms": torch.full_like(norms, float("nan")),
                               "codes": torch.zeros(packed_nbytes(n, 1), dtype=torch.uint8)})
        inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
        t = (x * inv.repeat_interleave(self.bucket_size)[:n]).clamp_(-1.0, 1.0).add_(1.0).mul_(0.5)
        codes = t.add_(rng.uniform(n)).floor_().clamp_(max=1.0).to(torch.uint8)
        return Encoded(n, {"norms": norms, "codes": pack_bits(codes, 1)})

    def decode(self, enc: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        n = enc.numel
        codes = unpack_bits(enc.parts["codes"], 1, n)
        scale = enc.parts["norms"].repeat_interleave(self.bucket_size)[:n]
        val = codes.to(torch.float32).mul_(2.0).sub_(1.0).mul_(scale)
        return val if out is None else out.copy_(val)


class AdaptiveLevelCodec(LevelCodec):
    """ALQ or AMQ: a ``LevelCodec`` whose levels are fitted to sampled gradients with ``fit``."""

    def __init__(self, bits: int, *, method: str, norm: str = "l2", bucket_size: int = 1024, sweeps: int = 10) -> None:
        if method not in ("alq", "amq"):
            raise ValueError(f"method must be 'alq' or 'amq', got {method!r}")
        count = 1 << (bits - 1) if isinstance(bits, int) and bits >= 2 else 2
        super().__init__(bits, exponential_levels(0.5, count), norm=norm, bucket_size=bucket_size, name=method)
        self.method = method
        self.sweeps = sweeps
        self.multiplier = 0.5  # AMQ's p

    def fit(self, samples: torch.Tensor, max_samples: int = 200_000) -> torch.Tensor:
        """Fit the levels to gradient ``samples`` (any shape); returns the new levels."""
        if self.bits <= 2:  # 2 bits: levels are (0, 1), nothing to fit
            return self.levels
        return self.fit_coordinates(normalized_coordinates(samples, self.norm, self.bucket_size), max_samples)

    def coordinates(self, samples: torch.Tensor) -> torch.Tensor:
        """The normalised coordinates r = |x| / ||bucket|| of ``samples`` in this codec's buckets."""
        return normalized_coordinates(samples, self.norm, self.bucket_size)

    def fit_coordinates(self, r: torch.Tensor, max_samples: int = 200_000) -> torch.Tensor:
        """Fit the levels to normalised coordinates ``r`` (e.g. of several layers, each bucketed
        on its own); returns the new levels."""
        if self.bits <= 2:
            return self.levels
        if r.numel() > max_samples:  # a fixed-stride subsample keeps the fit deterministic
            r = r[:: -(-r.numel() // max_samples)]
        if self.method == "alq":
            self.set_levels(fit_alq(r, self.levels, self.sweeps))
        else:
            self.multiplier = fit_amq(r, self.level_count, p0=self.multiplier)
            self.set_levels(exponential_levels(self.multiplier, self.level_count))
        return self.levels

    def state_dict(self) -> dict:
        return {**super().state_dict(), "multiplier": self.multiplier}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.multiplier = state.get("multiplier", self.multiplier)


def fit_level_groups(groups: dict[str, dict[str, AdaptiveLevelCodec]], grads) -> dict[str, dict]:
    """Fit one level set per group ({group: {layer: its codec}}) to the normalised coordinates of
    the group's gradients ``grads[layer]`` (each layer bucketed on its own; the first layer's codec
    fits and every codec of the group takes its levels). Returns {"levels": {layer: codec state},
    "groups": {group: {"layers", "variance", "epsilon"}}}: "variance" is the set's normalised
    variance Psi on those coordinates (the mean over coordinates of (hi - r)(r - lo)), "epsilon" =
    bucket size x Psi, the measured E||Q(v) - v||^2 / ||v||^2 of a full bucket under stochastic
    rounding (the epsilon_Q of the layer-wise quantization paper's bound
    E||Q(v) - v||^2 <= epsilon_Q ||v||^2)."""
    levels, report = {}, {}
    for group, codecs in groups.items():
        first = next(iter(codecs.values()))
        r = torch.cat([codec.coordinates(grads[name]) for name, codec in codecs.items()])
        first.fit_coordinates(r)
        state = first.state_dict()
        for codec in codecs.values():
            if codec is not first:
                codec.load_state_dict(state)
        levels.update(dict.fromkeys(codecs, state))
        psi = normalized_variance(first.levels, r)
        report[group] = {"layers": list(codecs), "variance": psi, "epsilon": psi * first.bucket_size}
    return {"levels": levels, "groups": report}


def _level_factory(name: str, norm: str, levels):
    def make(bits: int, bucket_size: int = 1024, norm_: str | None = None) -> LevelCodec:
        if bits == 1 and name in ("qsgd", "qsgdinf") and not isinstance(bits, bool):
            return OneBitCodec(norm=norm_ or norm, bucket_size=bucket_size, name=name)
        count = 1 << (bits - 1) if isinstance(bits, int) and not isinstance(bits, bool) and bits >= 2 else 2
        return LevelCodec(bits, levels(count), norm=norm_ or norm, bucket_size=bucket_size, name=name)
    return make


def _terngrad(bits: int, bucket_size: int = 1024, norm_: str | None = None) -> LevelCodec:
    if bits not in (0, 2):
        raise ValueError(f"terngrad: ternary levels need bits=2 (or 0 to send nothing), got {bits!r}")
    return LevelCodec(bits, torch.tensor([0.0, 1.0]), norm=norm_ or "linf", bucket_size=bucket_size, name="terngrad")


#: name -> factory(bits, bucket_size, norm)
LEVEL_CODECS = {
    "qsgd": _level_factory("qsgd", "l2", linear_levels),
    "qsgdinf": _level_factory("qsgdinf", "linf", linear_levels),
    "nuqsgd": _level_factory("nuqsgd", "l2", lambda c: exponential_levels(0.5, c)),
    "natural": _level_factory("natural", "linf", lambda c: exponential_levels(0.5, c)),
    "terngrad": _terngrad,
    "alq": lambda bits, bucket_size=1024, norm_=None: AdaptiveLevelCodec(
        bits, method="alq", norm=norm_ or "l2", bucket_size=bucket_size),
    "amq": lambda bits, bucket_size=1024, norm_=None: AdaptiveLevelCodec(
        bits, method="amq", norm=norm_ or "l2", bucket_size=bucket_size),
}


def make_codec(name: str, bits: int | None = None, *, bucket_size: int = 1024, norm: str | None = None,
               ratio: float | None = None, rotation: int = 4096, rounding: str = "nearest") -> Codec:
    """A codec by name: one of ``sorted(LEVEL_CODECS)`` or "rotated" (with ``bits``; "rotated" also
    takes its largest ``rotation`` block and ``rounding``), or "jointsq" or "topk" (with ``ratio``)."""
    if name == "rotated":
        from hvd_gradq.codecs.rotated import RotatedCodec

        if bits is None:
            raise ValueError("rotated needs bits=, e.g. make_codec('rotated', bits=2)")
        return RotatedCodec(bits, rotation=rotation, rounding=rounding)
    if name == "jointsq":
        from hvd_gradq.codecs.jointsq import JointSQCodec

        if ratio is None:
            raise ValueError("jointsq takes a compression ratio, e.g. make_codec('jointsq', ratio=20)")
        return JointSQCodec(ratio)
    if name == "topk":
        from hvd_gradq.codecs.topk import TopKCodec

        if ratio is None:
            raise ValueError("topk takes a compression ratio, e.g. make_codec('topk', ratio=20)")
        return TopKCodec(ratio)
    if name not in LEVEL_CODECS:
        choices = [*sorted(LEVEL_CODECS), "rotated", "jointsq", "topk"]
        raise ValueError(f"unknown codec {name!r}; choose one of {choices}")
    if bits is None:
        raise ValueError(f"{name} needs bits=, e.g. make_codec({name!r}, bits=4)")
    return LEVEL_CODECS[name](bits, bucket_size, norm)
