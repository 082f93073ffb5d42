"""Distortion metrics D_l(b): how much coding layer l's gradient at b bits hurts. Pure torch.

All metrics fill an (layers, options) table for ``solvers.RDCurves``:

* ``lad_exact``        the LAD paper's Eq. 2-3: mean over K batches of
                       |L(W - lr * g_mixed(l, b)) - L(W - lr * g)|, g_mixed with only layer l coded.
                       Evaluated with ``torch.func.functional_call`` on detached weights (the live
                       model and its buffers are untouched), under ``no_grad``: L * |B| * K forwards.
                       A batch's forwards all draw the same random numbers (``PROBE_SEED`` + its
                       index), so dropout's masks cancel in the difference.
* ``lad_first_order``  Eq. 7-8: lr * |g_{t+1} . e_l(b)| with g_{t+1} the gradient at W - lr * g,
                       one extra backward per batch instead of L * |B| forwards.
* ``mse``              ||g_l - Q_b(g_l)||^2, the signal-level baseline.
* ``ampa``             AMPA's magnitude sensitivity (its Eq. 9 for the gradient itself):
                       E|g_l| * E|g_l - Q_b(g_l)|.

``quantize(name, bits, g)`` is the codec the layer will use (0 bits: zeros; a negative option -r:
the layer's rank-r low-rank factors); it returns None for an option the layer cannot take (a rank
for a vector), whose cell is then NOT_APPLICABLE. The gradient g is the mean gradient over the
probe batches at the current weights (``probe_gradients``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call

Quantize = Callable[[str, int, torch.Tensor], torch.Tensor]
#: the probe forwards' random seed (plus the batch index): a loss difference then measures the
#: weights, not two different dropout masks
PROBE_SEED = 0x1AD
#: the table's value for an option a layer cannot take (never a distortion: those are >= 0)
NOT_APPLICABLE = -1.0


@dataclass
class LossProbe:
    """What the allocator needs for the loss-aware metrics.

    ``model`` is the live model (only read); ``loss_fn(output, target)`` returns a scalar;
    ``batches`` is a sequence of (inputs, targets) or a function returning one (called at every
    allocation, e.g. to draw K fresh training batches).
    """

    model: torch.nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | Callable[[], Sequence[tuple[torch.Tensor, torch.Tensor]]]

    def __post_init__(self) -> None:
        if not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"LossProbe.model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not callable(self.loss_fn):
            raise TypeError("LossProbe.loss_fn must be callable: loss_fn(output, target) -> scalar tensor")

    def get_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = list(self.batches() if callable(self.batches) else self.batches)
        if not batches or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batches):
            raise ValueError("LossProbe.batches must give at least one (inputs, targets) pair")
        return batches


class LossEvaluator:
    """Loss (and gradients) of the probe model at substituted weights, without touching the live
    model: ``stepped(grads, lr)`` gives the weights after an SGD step, ``loss(weights, batch)`` the
    loss there; the distortion metrics below and ``benchmarks.superposition`` price coded steps
    with it."""

    def __init__(self, probe: LossProbe, params: dict[str, torch.Tensor]) -> None:
        self.probe = probe
        own = {id(p): n for n, p in probe.model.named_parameters()}
        missing = [n for n, p in params.items() if id(p) not in own]
        if missing:
            raise ValueError(f"LossProbe.model does not own the parameters {missing[:3]}; pass the trained model")
        self.model_name = {n: own[id(p)] for n, p in params.items()}  # allocation name -> model name
        self.weights = {n: p.detach() for n, p in probe.model.named_parameters()}
        self.buffers = {n: b.detach().clone() for n, b in probe.model.named_buffers()}
        self.forwards = 0
        self.backwards = 0
        self._devices = sorted({p.device.index or 0 for p in self.weights.values() if p.device.type == "cuda"})

    def stepped(self, grads: dict[str, torch.Tensor], lr: float) -> dict[str, torch.Tensor]:
        """The weights after an SGD step W - lr * g on every layer in ``grads`` (model names)."""
        out = dict(self.weights)
        for n, g in grads.items():
            m = self.model_name[n]
            out[m] = self.weights[m] - lr * g.view_as(self.weights[m])
        return out

    def _forward(self, weights: dict[str, torch.Tensor], x, index: int):
        """The model at ``weights`` on ``x``, with the random numbers of batch ``index`` (dropout
        draws the same masks at every evaluation of that batch; training's RNG is untouched)."""
        buffers = {n: b.clone() for n, b in self.buffers.items()} if self.buffers else {}
        with torch.random.fork_rng(devices=self._devices):
            torch.manual_seed(PROBE_SEED + index)
            return functional_call(self.probe.model, {**weights, **buffers}, (x,))

    def loss(self, weights: dict[str, torch.Tensor], batch, index: int = 0) -> float:
        """The loss at ``weights`` on ``batch``, the ``index``-th probe batch: the same index gives
        the same dropout masks, so that a difference of two losses measures the weights only."""
        x, y = batch
        out = self._forward(weights, x, index)
        self.forwards += 1
        return float(self.probe.loss_fn(out, y))

    def grads(self, weights: dict[str, torch.Tensor], batches) -> dict[str, torch.Tensor]:
        """Mean gradient over ``batches`` at ``weights`` (model names)."""
        leaves = {n: w.detach().clone().requires_grad_(True) for n, w in weights.items()}
        total = {n: torch.zeros_like(w) for n, w in leaves.items()}
        for index, (x, y) in enumerate(batches):
            with torch.enable_grad():
                loss = self.probe.loss_fn(self._forward(leaves, x, index), y)
                gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            self.forwards += 1
            self.backwards += 1
            for (n, _), g in zip(leaves.items(), gs):
                if g is not None:
                    total[n] += g
        return {n: t / len(batches) for n, t in total.items()}


def probe_gradients(probe: LossProbe, params: dict[str, torch.Tensor],
                    batches=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Mean gradient of each named parameter over the probe batches (``batches``, default: the
    probe's) at the current weights."""
    ev = LossEvaluator(probe, params)
    g = ev.grads(ev.weights, probe.get_batches() if batches is None else batches)
    return {n: g[ev.model_name[n]].reshape(-1) for n in params}, {"forwards": ev.forwards, "backwards": ev.backwards}


def _errors(grads: dict[str, torch.Tensor], quantize: Quantize, options: Sequence[int]):
    """Per layer and option: the coded gradient (flat), None where the layer cannot take it."""
    return {n: [quantize(n, b, g) if b else torch.zeros_like(g) for b in options] for n, g in grads.items()}


def _cells(coded: dict, metric) -> np.ndarray:
    return np.array([[NOT_APPLICABLE if q is None else metric(n, q) for q in qs] for n, qs in coded.items()])


def lad_exact(probe: LossProbe, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
              quantize: Quantize, options: Sequence[int], lr: float, *, batches=None,
              part: tuple[int, int] = (0, 1)) -> tuple[np.ndarray, dict]:
    """Eq. 2-3 by direct evaluation. Returns the (layers, options) table and the pass counts.

    ``part=(r, n)`` evaluates only the cells (layer i, option k) with (i * |B| + k) % n == r and
    leaves the others NaN: n processes holding the same weights, gradients and ``batches`` each
    take one part, and the parts merged (``merge_parts``) are the whole table, cell for cell."""
    ev = LossEvaluator(probe, params)
    batches = probe.get_batches() if batches is None else batches
    rank, size = part
    table = np.full((len(grads), len(options)), np.nan)
    with torch.no_grad():
        base = ev.stepped(grads, lr)
        ref = [ev.loss(base, b, i) for i, b in enumerate(batches)] if rank < len(grads) * len(options) else []
        for i, (n, g) in enumerate(grads.items()):
            m = ev.model_name[n]
            w = ev.weights[m]
            for k, b in enumerate(options):
                # every cell is coded, in the same order on every process: the codec's random
                # numbers are then those of the whole table's evaluation
                q = quantize(n, b, g) if b else torch.zeros_like(g)
                if (i * len(options) + k) % size != rank:
                    continue
                if q is None:
                    table[i, k] = NOT_APPLICABLE
                    continue
                mixed = {**base, m: w - lr * q.view_as(w)}
                table[i, k] = np.mean([abs(ev.loss(mixed, x, j) - r) for j, (x, r) in enumerate(zip(batches, ref))])
    return table, {"forwards": ev.forwards, "backwards": ev.backwards}


def merge_parts(tables: Sequence[np.ndarray]) -> np.ndarray:
    """The whole table from the parts of ``lad_exact(part=...)`` (each cell in exactly one)."""
    have = np.stack([~np.isnan(t) for t in tables])
    if not (have.sum(axis=0) == 1).all():
        raise ValueError("the table parts do not cover every cell exactly once")
    return np.nansum(np.stack(tables), axis=0)


def lad_first_order(probe: LossProbe, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                    quantize: Quantize, options: Sequence[int], lr: float, *,
                    batches=None) -> tuple[np.ndarray, dict]:
    """Eq. 7-8: lr * |g_{t+1} . e_l(b)|, g_{t+1} the mean gradient at W - lr g over the batches."""
    ev = LossEvaluator(probe, params)
    g_next = ev.grads(ev.stepped(grads, lr), probe.get_batches() if batches is None else batches)
    coded = _errors(grads, quantize, options)
    table = _cells(coded, lambda n, q: abs(lr * float(g_next[ev.model_name[n]].reshape(-1) @ (grads[n] - q))))
    return table, {"forwards": ev.forwards, "backwards": ev.backwards}


def mse(grads: dict[str, torch.Tensor], quantize: Quantize, options: Sequence[int]) -> tuple[np.ndarray, dict]:
    table = _cells(_errors(grads, quantize, options), lambda n, q: float(((grads[n] - q) ** 2).sum()))
    return table, {"forwards": 0, "backwards": 0}


def ampa(grads: dict[str, torch.Tensor], quantize: Quantize, options: Sequence[int]) -> tuple[np.ndarray, dict]:
    table = _cells(_errors(grads, quantize, options),
                   lambda n, q: float(grads[n].abs().mean() * (grads[n] - q).abs().mean()))
    return table, {"forwards": 0, "backwards": 0}


METRICS = ("lad", "lad_first_order", "mse", "ampa")
