"""Checkpoints of the compression state, one helper for its three owners (the drop-in optimizer,
the stock compressor and the simulation): the bundle format, its checks, and each rank's part.
Pure (no Horovod): the owners gather the ranks' parts (a job) or hold them (the simulation).

What compression adds to a training job's state, per rank: error-feedback residuals (worker,
two-phase server, 0-bit and lane residuals, and what a bit change carried over), the codebook
(version, per-layer bits, transport, shared scale and reduction count), the dithering streams,
JointSQ's per-chunk reallocation state and fitted levels, and on rank 0 the trigger's anchor and
the allocator's schedule. ``bundle`` puts every rank's part into one picklable dict (rank 0 saves
it with the model); ``select`` checks a loaded bundle against the job and returns this rank's part.

    {"format": FORMAT, "world_size": N, "layers": {name: numel}, "config": {...},
     "ranks": [rank 0's state, ..., rank N-1's state]}
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from hvd_gradq.codebook import LOWRANK
from hvd_gradq.plan.cost_model import FLOAT32, TRANSPORTS
from hvd_gradq.plan.cost_model import LOWRANK as LOWRANK_TRANSPORT

FORMAT = "hvd_gradq.compression_state/2"

RESET_HINT = ("pass reset=True to start the compression state afresh instead (residuals zero, the codebook "
              "re-allocated at the next step)")


class StateMismatchError(ValueError):
    """A saved compression state does not fit this job (world size, model or configuration)."""


def bundle(per_rank: list[dict], *, layers: Mapping[str, int], config: Mapping[str, object]) -> dict:
    """The checkpointable bundle of every rank's state (``per_rank[r]`` from rank r)."""
    return {"format": FORMAT, "world_size": len(per_rank), "layers": dict(layers), "config": dict(config),
            "ranks": list(per_rank)}


def mismatches(state: object, *, size: int, layers: Mapping[str, int], config: Mapping[str, object]) -> list[str]:
    """What keeps ``state`` from resuming in this job (empty when it fits)."""
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        return [f"not a hvd_gradq compression state (format {found!r}, expected {FORMAT!r}); pass what "
                "compression_state_dict() returned"]
    out = []
    if state["world_size"] != size:
        out.append(f"it was saved by {state['world_size']} ranks and this job has {size}")
    saved = state["layers"]
    missing = sorted(set(layers) - set(saved))
    extra = sorted(set(saved) - set(layers))
    resized = sorted(n for n in set(saved) & set(layers) if saved[n] != layers[n])
    if missing or extra or resized:
        parts = []
        if missing:
            parts.append(f"layers not in the checkpoint: {_few(missing)}")
        if extra:
            parts.append(f"layers only in the checkpoint: {_few(extra)}")
        if resized:
            parts.append("layers of another size: " + _few([f"{n} ({saved[n]} saved, {layers[n]} now)"
                                                               for n in resized]))
        out.append("it was saved for a different model (" + "; ".join(parts) + ")")
    for key, value in config.items():
        if key in state["config"] and state["config"][key] != value:
            out.append(f"it was saved with {key}={state['config'][key]!r} and this job uses {key}={value!r}")
    return out


def select(state: Mapping, *, rank: int, size: int, layers: Mapping[str, int], config: Mapping[str, object],
           owner: str) -> dict:
    """This rank's part of ``state``, after checking that the bundle fits the job; raises
    ``StateMismatchError`` naming every mismatch and the way out."""
    problems = mismatches(state, size=size, layers=layers, config=config)
    if problems:
        raise StateMismatchError(f"cannot resume {owner}'s compression state: " + "; ".join(problems)
                                 + f". Load the checkpoint into the same model and settings, or {RESET_HINT}.")
    return state["ranks"][rank]


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def engine_state(engine) -> dict:
    """One rank's engine state (``exchange.engine.GradientExchange``): codebook, residuals, dither
    streams and the coders' own."""
    return {"codebook": engine.codebook.state_dict(), "residuals": engine.residuals.state_dict(),
            "lanes": engine.lanes.state_dict(), "coders": {n: c.state_dict() for n, c in engine.coders.items()},
            "lowrank": {n: c.state_dict() for n, c in engine.lowrank.items()}}


def load_engine_state(engine, state: Mapping) -> None:
    """Resume ``engine`` from ``engine_state()`` of the same rank of a job with the same model,
    size and settings (checked by the caller): the plan follows the saved bits and transports."""
    for name, code in state["codebook"]["layers"].items():
        plan = engine.plans[name]
        saved = (code["bits"], code["transport"], code.get("rank", 0))
        if plan.transport != FLOAT32 and saved != (plan.bits, plan.transport, plan.rank):
            forced = engine.forced[name]
            engine.forced[name] = code["transport"] if code["transport"] in TRANSPORTS else "auto"
            if code["transport"] == LOWRANK_TRANSPORT or engine.coding.codec != LOWRANK:
                engine.ranks[name] = code.get("rank", 0)
            engine.plan_layer(name, code["bits"])
            engine.forced[name] = forced
        engine.codebook[name].follow(code)
    engine.codebook.version = state["codebook"]["version"]
    engine.residuals.load_state_dict(state["residuals"])
    engine.lanes.load_state_dict(state["lanes"])
    for name, coder_state in state["coders"].items():
        engine.coders[name].load_state_dict(coder_state)
    for name, coder_state in state.get("lowrank", {}).items():
        engine.lowrank[name].load_state_dict(coder_state)


def rank_state(step: int, exchange, reallocator) -> dict:
    """One rank's part of a bundle: its step count, engine state and reallocation state (the
    trigger and allocator are the root's; every rank saves its copy)."""
    return {"step": step, "exchange": engine_state(exchange), **reallocator.state_dict()}


def coding_config(exchange, reallocator) -> dict:
    """The settings a saved compression state must have been made with to resume."""
    return {**exchange.config, **reallocator.config}


def parts_to_resume(state: object, *, owner: str, size: int, ranks: Sequence[int], layers: Mapping[str, int],
                    config: Mapping[str, object], reset: bool) -> list[dict] | None:
    """The parts of ``state`` for ``ranks``, after checking that the bundle fits the job; None when
    it does not fit and ``reset`` is set (the owner then starts its compression state afresh).
    Raises ``StateMismatchError`` naming every mismatch and the way out otherwise."""
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        raise TypeError("load_compression_state_dict() takes what compression_state_dict() returned (a dict with "
                        f"format {FORMAT!r}), got {type(state).__name__}"
                        + (f" of format {state.get('format')!r}" if isinstance(state, Mapping) else ""))
    if reset not in (True, False):
        raise ValueError(f"reset must be True or False, got {reset!r}")
    problems = mismatches(state, size=size, layers=layers, config=config) if reset else []
    if problems:
        logging.getLogger("hvd_gradq").warning("%s: compression state not resumed (%s); starting it afresh", owner,
                                               "; ".join(problems))
        return None
    return [select(state, rank=r, size=size, layers=layers, config=config, owner=owner) for r in ranks]
