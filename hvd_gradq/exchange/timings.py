"""Where one rank's step time goes: seconds per phase and bytes handed to the collectives.

The exchange engine times what it does itself: ``encode`` (coding gradients into payloads,
including the second phase of a two-collective exchange), ``decode`` (turning received bytes into
the aggregate; for the two-phase exchange also the reducing rank's sum and recode of its chunk)
and ``wait`` (blocked in a collective's ``synchronize``). The optimizer adds what it sees around
them: ``allocation`` (the reallocation step: trigger, allocation, broadcasts), ``update`` (the
wrapped optimizer's update), ``other`` (its own bookkeeping: hooks, copying the aggregate into
``.grad``) and ``compute``: everything between two steps outside the optimizer's calls (forward,
backward, loss, user code). ``step`` is the wall clock from the end of one step to the end of the
next; the phases add up to it by construction of ``compute``, so each is measured, not estimated,
except that ``compute`` is what remains.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

#: the phases of a step, in the order a breakdown draws them
PHASES = ("compute", "encode", "decode", "wait", "allocation", "update", "other")
#: the phases the exchange engine measures
ENGINE_PHASES = ("encode", "decode", "wait")


class StepTimer:
    """Seconds per phase of the step in progress, and a window of finished steps.

    ``add(phase, seconds)`` accumulates; ``timed(phase, fn)`` wraps a callable; ``close(...)``
    ends a step and returns its record: ``{phase: seconds, ..., "step": wall seconds,
    "bytes": payload bytes}``. Cost: two ``perf_counter`` calls per timed call.
    """

    def __init__(self, keep: int = 1000) -> None:
        self.current: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.history: deque[dict] = deque(maxlen=keep)

    def add(self, phase: str, seconds: float) -> None:
        self.current[phase] += seconds

    def timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with its run time added to ``phase``."""
        current = self.current

        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                current[phase] += time.perf_counter() - t

        return run

    def close(self, step: float, payload_bytes: int, **phases: float) -> dict:
        """End the step: ``step`` its wall seconds, ``phases`` the seconds the caller measured
        (``allocation``, ``update``, ``other``); ``compute`` is what the wall clock leaves."""
        record = dict(self.current)
        for k, v in phases.items():
            if k not in PHASES:
                raise ValueError(f"unknown phase {k!r}; phases are {PHASES}")
            record[k] += v
        record["compute"] = max(0.0, step - sum(record[k] for k in PHASES if k != "compute"))
        record["step"] = step
        record["bytes"] = int(payload_bytes)
        self.history.append(record)
        for k in self.current:
            self.current[k] = 0.0
        return record

    def reset(self) -> None:
        self.history.clear()
        for k in self.current:
            self.current[k] = 0.0


class StepClock:
    """The optimizer's side of step timings: the end of the last step, and this step's seconds
    inside the optimizer's own calls (``inside``) and in its ``allocation`` and ``update``
    phases (``phase``); ``close`` hands them to the engine's timer, with the rest as ``other``."""

    def __init__(self) -> None:
        self.last_end: float | None = None
        self.own = 0.0
        self.phases = {"allocation": 0.0, "update": 0.0}

    @contextmanager
    def inside(self):
        t = time.perf_counter()
        if self.last_end is None:  # the first step's clock starts at its first call
            self.last_end = t
        try:
            yield
        finally:
            self.own += time.perf_counter() - t

    @contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] += time.perf_counter() - t

    def close(self, engine) -> dict | None:
        """End the step on ``engine`` (``exchange.engine.GradientExchange``); None before any call."""
        now = time.perf_counter()
        if self.last_end is None:
            return None
        measured = engine.timer.current
        other = self.own - self.phases["allocation"] - sum(measured[k] for k in ENGINE_PHASES)
        record = engine.close_step(now - self.last_end, other=max(0.0, other), **self.phases)
        self.last_end, self.own = now, 0.0
        self.phases = dict.fromkeys(self.phases, 0.0)
        return record


class TimedCollectives:
    """The collectives an exchange runs on, with the time blocked in ``synchronize`` added to the
    timer's ``wait`` (launches and polls do not block and are not counted)."""

    def __init__(self, inner, timer: StepTimer) -> None:
        self.inner = inner
        self._wait = timer.timed("wait", inner.synchronize)

    def size(self) -> int:
        return self.inner.size()

    def rank(self) -> int:
        return self.inner.rank()

    def allreduce_sum_async(self, tensor, name: str):
        return self.inner.allreduce_sum_async(tensor, name)

    def allgather_async(self, tensor, name: str):
        return self.inner.allgather_async(tensor, name)

    def alltoall_async(self, tensor, splits, name: str):
        return self.inner.alltoall_async(tensor, splits, name)

    def synchronize(self, handle):
        return self._wait(handle)

    def poll(self, handle) -> bool:
        return self.inner.poll(handle)

    def barrier(self) -> None:
        self.inner.barrier()


def summarize(records: list[dict]) -> dict:
    """Mean seconds per phase and step (means add up as the steps do), the median step, and the
    mean bytes over ``records`` (e.g. a benchmark's timed steps)."""
    if not records:
        return {}
    out = {k: sum(r[k] for r in records) / len(records) for k in (*PHASES, "step", "bytes")}
    steps = sorted(r["step"] for r in records)
    mid = len(steps) // 2
    out["step_median"] = steps[mid] if len(steps) % 2 else 0.5 * (steps[mid - 1] + steps[mid])
    return out
