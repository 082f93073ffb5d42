"""The coding settings, validated once: ``Coding`` for how gradients are coded, and
``check_reallocation`` for the allocator and trigger that re-decide the bits. The compressor, the
drop-in optimizer and the simulation take the same ones (as keywords, or a ``Coding`` object).

    coding = hvd_gradq.Coding(codec="qsgd", bits={"fc.*": 2}, bucket_size=512)
    comp = hvd_gradq.Compressor(model.named_parameters(), coding=coding)
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

from hvd_gradq import checks
from hvd_gradq.alloc import Allocator
from hvd_gradq.alloc.trigger import Trigger
from hvd_gradq.codebook import LOWRANK, SHARED_SCALE
from hvd_gradq.codecs import make_codec
from hvd_gradq.codecs.lowrank import FACTORS
from hvd_gradq.codecs.rotated import ROUNDINGS
from hvd_gradq.plan.cost_model import TRANSPORTS, LinkModel
from hvd_gradq.plan.planner import CODECS, GATHERED_SHARED_SCALE, RATIO_CODECS

#: old names still taken, with a DeprecationWarning
_RENAMED_CODECS = {"uniform": SHARED_SCALE}


def per_layer(spec, names: list[str], default, what: str) -> dict[str, object]:
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


def check_bits(value, where: str) -> int:
    return checks.integer(value, f"{where}: bits (0 = not sent)", 0, 8)


@dataclass(frozen=True)
class Coding:
    """How gradients are coded.

    Args:
        codec: "rotated" (the default; a randomized Hadamard rotation shared by every rank, then one scale per
            rotation block shared by every rank) or "shared_scale" (one scale per layer shared
            by every rank, unrotated): the summable codes, so allreduce is among their
            transports (gathered, a rotated layer travels as the rotated code with each rank's
            own block scales and rotation key, a shared-scale one as ``qsgdinf``); any level
            codec (``qsgd``, ``qsgdinf``, ``nuqsgd``, ``natural``, ``terngrad``, ``alq``, ``amq``),
            "jointsq" or "topk" (DGC's top-k by magnitude; both with ``ratio`` and error feedback).
        bits: width 0..8 for every layer, a ``{name or regex: bits}`` mapping (others get 4;
            where several keys match a layer, the last one wins), or a function of the layer
            name. 0 = the layer is not sent at all (its gradient waits in error feedback).
        ratio: jointsq's / topk's compression ratio against float32 (e.g. 20 or 1000).
        rank: of ``codec="lowrank"`` (PowerSGD's factors, ``codecs.lowrank``): the rank of every
            matrix layer (conv kernels as out x rest), a ``{name or regex: rank}`` mapping (others
            get 4) or a function of the name. Layers that are not matrices, or whose rank-r
            factors would be more than half the matrix, take the rotated code at ``bits``.
        factors: the dtype of the low-rank factors (``codec="lowrank"`` and ranks chosen by the
            allocator): "float32" (PowerSGD's), or "float16": P, the matrix's shorter side, stays
            float32 with the summed header and Q, the longer side, travels in float16 with a
            power-of-two scale every rank takes from the summed norms, so that no sum can overflow
            (about 1.7-2x fewer bytes; ``codecs.lowrank``).
        bucket_size: elements per bucket of the level codecs (one float32 norm per bucket).
        transport: "auto" (the cost model's cheapest), "allreduce", "allgather", "two_phase", or
            a ``{name or regex: transport}`` mapping.
        link: the ``LinkModel`` the cost model prices with; "measure" times allreduces at
            construction (a job only, all ranks); default ``LinkModel()`` (10 Gbit/s, 50 us).
        min_elements: layers smaller than this go as exact float32.
        error_feedback: keep what coding drops and add it back at the next step. "auto": for
            biased codes only (JointSQ, top-k, the rotated code with nearest rounding; the lanes
            always keep theirs, for clipping); unbiased codecs go without, as their variance would
            pile up in the residual.
        seed: of the stochastic rounding (each rank draws its own stream).
        rotation: the largest rotation block of ``codec="rotated"`` (a power of two 8..65536), on
            every transport.
        rounding: of ``codec="rotated"``: "nearest" (biased, with error feedback) or "stochastic".
        block_scales: of ``codec="rotated"``: "this_step" (a first, small allreduce of the block
            statistics, one word per rotation block, then the codes) or "previous_step" (one
            allreduce: the codes carry the statistics that set the next step's scales;
            ``UniformCompressor``'s, weaker on row-sparse layers).
        refit_levels: for the adaptive codecs (``alq``, ``amq``; 3 bits or more): refit every
            layer's levels to its aggregated gradient after step 0 and then every this many steps
            (default 100; 0: keep the initial exponential levels).
        level_groups: which layers share one fitted level set: "layer" (each its own), "global"
            (one for all, the global quantizer), or ``{layer name: group}``, e.g.
            ``hvd_gradq.layer_types(model)`` for one level set per layer type (QODA's layer-wise
            quantization); layers missing from the mapping form the group "other".
    """

    codec: str = "rotated"
    bits: int | Mapping[str, int] | Callable[[str], int] = 4
    ratio: float | None = None
    rank: int | Mapping[str, int] | Callable[[str], int] = 4
    factors: str = "float32"
    bucket_size: int = 1024
    transport: str | Mapping[str, str] = "auto"
    link: LinkModel | str | None = None
    min_elements: int = 1024
    error_feedback: bool | str = "auto"
    seed: int = 0
    refit_levels: int | None = None
    level_groups: str | Mapping[str, str] = "layer"
    rotation: int = 4096
    rounding: str = "nearest"
    block_scales: str = "this_step"

    def __post_init__(self) -> None:
        codec = self.codec
        if codec in _RENAMED_CODECS:
            warnings.warn(f"codec={codec!r} is now called {_RENAMED_CODECS[codec]!r}", DeprecationWarning,
                          stacklevel=3)
            codec = _RENAMED_CODECS[codec]
            object.__setattr__(self, "codec", codec)
        checks.choice(codec, "codec", CODECS)
        if codec in RATIO_CODECS and self.ratio is None:
            raise ValueError(f"codec={codec!r} needs ratio=, e.g. ratio=20 (20x fewer bytes than float32)")
        if self.error_feedback not in (True, False, "auto"):
            raise ValueError(f"error_feedback must be True, False or 'auto', got {self.error_feedback!r}")
        checks.integer(self.bucket_size, "bucket_size", low=1)
        checks.integer(self.min_elements, "min_elements", low=0)
        checks.integer(self.seed, "seed")
        checks.rotation_block(self.rotation, "rotation")
        if codec == "rotated" and self.rotation == 0:
            raise ValueError("codec='rotated' needs a rotation block: rotation=4096, or codec='shared_scale'")
        checks.choice(self.rounding, "rounding", ROUNDINGS)
        checks.choice(self.factors, "factors", FACTORS)
        if isinstance(self.level_groups, Mapping):
            bad = [k for k, v in self.level_groups.items() if not (isinstance(k, str) and isinstance(v, str))]
            if bad:
                raise ValueError(f"level_groups maps layer names to group names (str -> str); got {bad[:3]}")
        else:
            checks.choice(self.level_groups, "level_groups (or a {layer: group} mapping)", ("layer", "global"))
        checks.choice(self.block_scales, "block_scales", ("this_step", "previous_step"))
        if not (self.link is None or self.link == "measure" or isinstance(self.link, LinkModel)):
            raise ValueError(f"link must be a hvd_gradq.LinkModel, 'measure' or None, got {self.link!r}")
        if isinstance(self.bits, (int, bool)):
            check_bits(self.bits, "every layer")
        if isinstance(self.transport, str) and self.transport != "auto":
            checks.choice(self.transport, "transport", ("auto", *TRANSPORTS))
        if self.refit_levels is None:
            object.__setattr__(self, "refit_levels", 100 if codec in ("alq", "amq") else 0)
        else:
            checks.integer(self.refit_levels, "refit_levels (steps between level fits; 0: never)", low=0)

    @classmethod
    def of(cls, coding: Coding | None, **keywords) -> Coding:
        """``coding`` itself, or a ``Coding`` of the keywords that differ from the defaults (not both)."""
        given = {k: v for k, v in keywords.items() if v != _DEFAULTS[k]}
        if coding is None:
            return cls(**keywords)
        if not isinstance(coding, Coding):
            raise TypeError(f"coding must be a hvd_gradq.Coding, got {type(coding).__name__}")
        if given:
            raise ValueError("pass the coding settings either as coding= or as keywords, not both "
                             f"(got {sorted(given)})")
        return coding

    def layer_bits(self, names: list[str]) -> dict[str, int]:
        out = per_layer(self.bits, names, 4, "bits")
        for name, b in out.items():
            check_bits(b, f"layer {name!r}")
        return out

    def layer_ranks(self, names: list[str]) -> dict[str, int]:
        """The low-rank codec's rank per layer (0 for every layer under another codec)."""
        if self.codec != LOWRANK:
            return dict.fromkeys(names, 0)
        out = per_layer(self.rank, names, 4, "rank")
        for name, r in out.items():
            checks.integer(r, f"rank of layer {name!r} (the low-rank factors' rank)", low=1)
        return out

    def level_group(self, name: str) -> str:
        """The group whose level set layer ``name`` shares (``level_groups``)."""
        if isinstance(self.level_groups, Mapping):
            return self.level_groups.get(name, "other")
        return name if self.level_groups == "layer" else "global"

    def layer_transports(self, names: list[str]) -> dict[str, str]:
        out = per_layer(self.transport, names, "auto", "transport")
        for name, t in out.items():
            if t != "auto" and t not in TRANSPORTS:
                raise ValueError(f"layer {name!r}: transport must be 'auto' or one of {TRANSPORTS}, got {t!r}")
        return out

    def feedback(self, unbiased: bool) -> bool:
        """Whether a gathered layer whose codec is (un)biased keeps error feedback."""
        return self.error_feedback is True or (self.error_feedback == "auto" and not unbiased)

    def _rank_key(self) -> str:
        if isinstance(self.rank, Mapping):
            return repr(sorted(self.rank.items()))
        return repr(self.rank) if isinstance(self.rank, int) else "per-layer function"

    @property
    def config(self) -> dict:
        """What a saved compression state must have been made with to resume."""
        return {"codec": self.codec, "ratio": self.ratio, "bucket_size": self.bucket_size,
                **({"rank": self._rank_key()} if self.codec == LOWRANK else {}),
                **({"factors": self.factors} if self.factors != "float32" else {}),
                **({"level_groups": self.level_groups if isinstance(self.level_groups, str) else
                    sorted(self.level_groups.items())} if self.level_groups != "layer" else {}),
                "min_elements": self.min_elements, "error_feedback": self.error_feedback,
                "rotation": self.rotation, "rounding": self.rounding, "block_scales": self.block_scales}


_DEFAULTS = {f.name: f.default for f in fields(Coding)}
#: the settings' names, which the optimizers also take as keywords
CODING_KEYWORDS = tuple(_DEFAULTS)


def check_reallocation(coding: Coding, allocator: Allocator | None, trigger: Trigger | None) -> Trigger | None:
    """Validate the allocator and trigger for these coding settings; returns the trigger to use
    (the default one when an allocator comes without)."""
    if allocator is None:
        if trigger is not None:
            raise ValueError("a trigger needs an allocator= to decide the bits when it fires")
        return None
    if not isinstance(allocator, Allocator):
        raise TypeError(f"allocator must be a hvd_gradq.Allocator, got {type(allocator).__name__}")
    if coding.codec == LOWRANK:
        raise ValueError("codec='lowrank' takes its ranks from rank=; for ranks chosen by the allocator, use a codec "
                         "with bit widths (e.g. 'rotated') and Allocator(ranks=(1, 2, 4))")
    if coding.codec in RATIO_CODECS:
        raise ValueError(f"codec={coding.codec!r} sets its own element-level budget (ratio=); an allocator needs a "
                         f"codec with bit widths, one of {[c for c in CODECS if c not in RATIO_CODECS]}")
    for b in allocator.options:
        if b:
            try:
                make_codec(GATHERED_SHARED_SCALE if coding.codec == SHARED_SCALE else coding.codec, b)
            except ValueError as e:
                raise ValueError(f"allocator option {b} bits does not suit codec {coding.codec!r}: {e}") from e
    trigger = Trigger() if trigger is None else trigger
    if not isinstance(trigger, Trigger):
        raise TypeError(f"trigger must be a hvd_gradq.Trigger, got {type(trigger).__name__}")
    return trigger
