"""Error feedback (residual memory): what a codec dropped is added back before the next step.

For each layer, the compressor sends C(g + r) and keeps r <- (g + r) - D(C(g + r)), so nothing a
lossy codec (clipping, rounding, sparsification) drops is lost for good. Works with any codec.
The residuals are the only state; ``state_dict`` exposes them for checkpointing.
"""
from __future__ import annotations

import torch


class ErrorFeedback:
    """Per-layer residual memory keyed by layer name."""

    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}
        self._staging: dict[str, torch.Tensor] = {}

    def compensate(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """``grad + residual``, flattened, as a new float32 tensor (``grad`` is not modified)."""
        g = grad.detach().reshape(-1)
        r = self.residuals.get(name)
        if r is None:
            return g.to(torch.float32, copy=True)
        if r.numel() != g.numel():
            raise ValueError(
                f"error-feedback residual of layer {name!r} has {r.numel()} elements, "
                f"its gradient {g.numel()}"
            )
        return torch.add(g.to(torch.float32), r)  # one pass when the gradient is float32

    def update(self, name: str, x: torch.Tensor, decoded: torch.Tensor) -> None:
        """Keep ``x - decoded`` (flat tensors) as the residual of ``name``, reusing its buffer."""
        r = self.residuals.get(name)
        if r is None or r.shape != x.shape:
            self.residuals[name] = x - decoded
        else:
            torch.sub(x, decoded, out=r)

    def buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The float32 tensor holding ``name``'s residual (zeros if new), for a codec to read."""
        r = self.residuals.get(name)
        if r is None or r.shape != like.shape:
            r = self.residuals[name] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        return r

    def staging(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A second buffer for a codec to write the *next* residual into; it becomes the residual
        only at ``commit`` (after the step's outcome is known), so a step whose aggregate turns
        out non-finite, and is skipped, leaves every rank's residual as it was."""
        s = self._staging.get(name)
        if s is None or s.shape != like.shape:
            s = self._staging[name] = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        return s

    def commit(self, name: str, zero: bool = False) -> None:
        """Make the staged residual current (swapping buffers, no copy); ``zero=True`` instead
        sets the residual to zero (the layer was sent exactly)."""
        if zero:
            if name in self.residuals:
                self.residuals[name].zero_()
            return
        self.residuals[name], self._staging[name] = self._staging[name], self.residuals[name]

    def pop(self, name: str) -> torch.Tensor | None:
        """Remove and return the residual of ``name`` (None if it has none), staging included."""
        self._staging.pop(name, None)
        return self.residuals.pop(name, None)

    def reset(self, name: str | None = None) -> None:
        """Forget the residual of ``name``, or all residuals."""
        if name is None:
            self.residuals.clear()
        else:
            self.residuals.pop(name, None)

    def state_dict(self) -> dict:
        return {"residuals": {k: v.clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.residuals = {k: v.clone() for k, v in state["residuals"].items()}
