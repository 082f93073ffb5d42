"""QODA, quantized optimistic dual averaging (Nguyen, Markov, Wu, Ramezani-Kebrya, Antonakopoulos,
Alistarh & Cevher, ICML 2025, "Layer-wise Quantization for Quantized Optimistic Dual Averaging"),
as a torch optimizer: for monotone variational inequalities such as two-player games (a GAN's
generator and critic, a saddle point min_x max_y f(x, y)) as well as plain minimisation.

The operator V stacks every player's gradient of its own loss with respect to its own parameters
(for min_x max_y f: (grad_x f, -grad_y f); a player that maximises passes its negated loss). It is
evaluated at the leading point X_{t+1/2}, which is what the parameters hold between steps. Given
the aggregate V_{t+1/2} (under ``hvd_gradq.DistributedOptimizer``: the mean over the ranks of
their coded gradients, one exchange per step), a step is

    Y_{t+1}   = Y_t - V_{t+1/2}                    dual vectors summed (Y_1 = 0)
    X_{t+1}   = X_1 + eta_{t+1} Y_{t+1}            dual averaging, anchored at the start X_1
    X_{t+3/2} = X_{t+1} - gamma_{t+1} V_{t+1/2}    optimistic half step, the parameters' new value

The half step reuses the dual vector just received where extra-gradient methods (Q-GenX) would
exchange a second gradient, so QODA communicates once per step. The step sizes adapt to the
observed variation of the dual vectors, per parameter group (one group per player gives each
player its own, as in adaptive optimistic dual averaging, Hsieh, Antonakopoulos & Mertikopoulos,
COLT 2021):

    S_{t+1}      = S_t + ||V_{t+1/2} - V_{t-1/2}||^2     (V_{1/2} = 0, S_1 = 0; over the group)
    eta_{t+1}    = lr / sqrt(1 + S_{t+1})
    gamma_{t+1}  = lr_half / (1 + S_{t+1})^(1/2 - q)      (default lr_half = lr, q = 0)

(The paper describes its rates as adjusted to the variation of the dual vectors; this is the
form of Hsieh et al., with q in [0, 1/4] as in the Q-GenX analysis. Our copy of the QODA paper
does not give the constants.) The state (X_1, Y, the previous dual vector, S) is in
``state_dict()``, so a resumed run continues bit for bit. Parameters whose ``grad`` is None are
left as they are. A group whose dual vectors are not finite (NaN/Inf, e.g. an overflow that AMP's
GradScaler did not catch) is not updated: its parameters and state stay, and the group counts the
step in ``"skipped"``.
"""
from __future__ import annotations

import math

import torch

from hvd_gradq import checks


class QODA(torch.optim.Optimizer):
    """Quantized optimistic dual averaging (module docstring). ``lr``: the scale of eta (and of
    gamma unless ``lr_half``); ``q``: gamma's decay is (1 + S)^(q - 1/2), 0 <= q <= 1/4."""

    def __init__(self, params, lr: float = 0.1, *, lr_half: float | None = None, q: float = 0.0) -> None:
        checks.number(lr, "lr", positive=True)
        if lr_half is not None:
            checks.number(lr_half, "lr_half", low=0.0)
        checks.number(q, "q", low=0.0, high=0.25)
        super().__init__(params, {"lr": float(lr), "lr_half": None if lr_half is None else float(lr_half),
                                  "q": float(q), "variation": 0.0, "steps": 0, "skipped": 0})

    @staticmethod
    def step_sizes(group: dict) -> tuple[float, float]:
        """(eta, gamma) for the group's accumulated variation S."""
        base = 1.0 + group["variation"]
        lr_half = group["lr"] if group["lr_half"] is None else group["lr_half"]
        return group["lr"] / math.sqrt(base), lr_half * base ** (group["q"] - 0.5)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            if not live:
                continue
            if any(p.grad.is_sparse for p in live):
                raise RuntimeError("QODA does not take sparse gradients; use sparse_as_dense=True or dense layers")
            change = 0.0
            for p in live:
                state = self.state[p]
                if not state:  # X_1 is where the first gradient was taken; Y_1 = 0; V_{1/2} = 0
                    state["anchor"] = p.detach().clone()
                    state["dual"] = torch.zeros_like(p)
                    state["previous"] = torch.zeros_like(p)
                change += float(torch.sum((p.grad - state["previous"]).double() ** 2))
            if not math.isfinite(change):
                group["skipped"] += 1
                continue
            group["variation"] += change
            group["steps"] += 1
            eta, gamma = self.step_sizes(group)
            for p in live:
                state, v = self.state[p], p.grad.to(p.dtype)
                state["dual"].sub_(v)
                torch.add(state["anchor"], state["dual"], alpha=eta, out=p.data)  # X_{t+1}
                p.add_(v, alpha=-gamma)  # X_{t+3/2}
                state["previous"].copy_(v)
        return loss
