"""When to reallocate bits: the LAD paper's dynamic trigger (Sec. 2.4), plus fixed-interval and
static modes for ablations. Pure: it sees one per-layer gradient-norm vector per step.

similarity  fire at the first observed step >= ``warmup``; afterwards fire when the cosine
            similarity between the normalised norm vector and the anchor (Eq. 14-15) falls below
            ``tau`` and at least ``k_min`` steps have passed since the last allocation.
interval    fire at ``warmup`` and then every ``interval`` steps.
static      fire once, at ``warmup``.

In a job, only rank 0 evaluates the trigger and its verdict is broadcast with the step, so every
rank switches codebooks at the same step by construction (see ``exchange.reallocation``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hvd_gradq import checks

MODES = ("similarity", "interval", "static")


class Trigger:
    def __init__(self, mode: str = "similarity", *, tau: float = 0.95, k_min: int = 20, interval: int = 50,
                 warmup: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"trigger mode must be one of {MODES}, got {mode!r}")
        checks.number(tau, "tau (cosine-similarity threshold)", low=0, high=1)
        for key, value, low in (("k_min", k_min, 0), ("interval", interval, 1), ("warmup", warmup, 0)):
            checks.integer(value, key, low=low)
        self.mode = mode
        self.tau = float(tau)
        self.k_min = k_min
        self.interval = interval
        self.warmup = warmup
        self.anchor: torch.Tensor | None = None
        self.last_step: int | None = None
        self.last_similarity: float | None = None
        self.fired = 0

    @staticmethod
    def _normalise(norms: Sequence[float] | torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(norms, dtype=torch.float64).reshape(-1)
        n = float(v.norm())
        return v / n if n > 0 and math.isfinite(n) else v

    def observe(self, step: int, norms: Sequence[float] | torch.Tensor) -> bool:
        """Feed step ``step``'s per-layer gradient L2 norms; True when a reallocation is due."""
        if step < self.warmup:
            return False
        v = self._normalise(norms)
        if not bool(torch.isfinite(v).all()):
            return False  # a non-finite step (skipped by AMP) says nothing about the profile
        fire = False
        if self.last_step is None:
            fire = True
        elif self.mode == "interval":
            fire = step - self.last_step >= self.interval
        elif self.mode == "similarity":
            if self.anchor is None or self.anchor.shape != v.shape:
                sim = 0.0
            else:
                sim = float(v @ self.anchor)  # both unit vectors (Eq. 15)
            self.last_similarity = sim
            fire = sim < self.tau and step - self.last_step >= self.k_min
        if fire:
            self.anchor = v
            self.last_step = step
            self.fired += 1
        return fire

    def state_dict(self) -> dict:
        return {"mode": self.mode, "tau": self.tau, "k_min": self.k_min, "interval": self.interval,
                "warmup": self.warmup, "anchor": None if self.anchor is None else self.anchor.clone(),
                "last_step": self.last_step, "last_similarity": self.last_similarity, "fired": self.fired}

    def load_state_dict(self, state: dict) -> None:
        for key in ("mode", "tau", "k_min", "interval", "warmup"):
            if state[key] != getattr(self, key):
                raise ValueError(f"trigger state has {key}={state[key]!r}, this trigger {getattr(self, key)!r}")
        self.anchor = None if state["anchor"] is None else state["anchor"].clone()
        self.last_step = state["last_step"]
        self.last_similarity = state.get("last_similarity")
        self.fired = state["fired"]

    def reset(self) -> None:
        """Forget the anchor: the next observed step at or after ``warmup`` fires."""
        self.anchor = None
        self.last_step = None
        self.last_similarity = None

    def __repr__(self) -> str:
        return (f"Trigger({self.mode!r}, tau={self.tau}, k_min={self.k_min}, interval={self.interval}, "
                f"warmup={self.warmup})")
