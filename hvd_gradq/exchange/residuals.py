"""Every residual one rank keeps, in one place.

  worker    per gathered layer: what this rank's encoding of g + r dropped
  server    per two-phase layer, on the chunk this rank reduces: what requantizing the chunk's
            sum dropped
  zero_bit  per 0-bit layer: the gradient that was not sent at all
  lanes     per lane layer: what clipping and rounding against the shared scale dropped
  carry     per layer whose coding changed (a reallocation, a new world size): everything the
            old coding still owed, sent with the layer's next step

Each kind is staged during a step and committed only once every rank's step was finite
(``codecs.ErrorFeedback``).
"""
from __future__ import annotations

import torch

from hvd_gradq.codecs import ErrorFeedback

KINDS = ("worker", "server", "zero_bit", "lanes")


class ResidualStore:
    def __init__(self) -> None:
        self.worker = ErrorFeedback()
        self.server = ErrorFeedback()
        self.zero_bit = ErrorFeedback()
        self.lanes = ErrorFeedback()
        self.carry: dict[str, torch.Tensor] = {}

    def take_owed(self, name: str, numel: int, chunk: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Remove and return everything layer ``name`` still owes on this rank (its residuals,
        the server residual of its two-phase chunk ``chunk`` = (start, end), what was carried), as
        one flat float32 tensor of ``numel`` elements; None if nothing."""
        owed = torch.zeros(numel, dtype=torch.float32)
        for store in (self.worker, self.zero_bit, self.lanes):
            r = store.pop(name)
            if r is not None:
                owed += r
        r = self.server.pop(name)
        if r is not None and chunk is not None:
            owed[chunk[0]:chunk[1]] += r
        carried = self.carry.pop(name, None)
        if carried is not None:
            owed += carried
        return owed if bool(owed.any()) else None

    def state_dict(self) -> dict:
        return {"feedback": {k: getattr(self, k).state_dict() for k in KINDS},
                "carry": {k: v.clone() for k, v in self.carry.items()}}

    def load_state_dict(self, state: dict) -> None:
        for k in KINDS:
            getattr(self, k).load_state_dict(state["feedback"][k])
        self.carry = {k: v.clone() for k, v in state["carry"].items()}

    def reset(self) -> None:
        """Forget every residual and what was carried."""
        for k in KINDS:
            getattr(self, k).residuals.clear()
        self.carry.clear()
