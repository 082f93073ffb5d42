"""The allocator: distortion metric + solver under a bit budget, as one decision. Pure (no Horovod).

``Allocator(budget=2.0, metric="lad", solver="lagrangian", probe=LossProbe(...))`` turns the current
gradients into per-layer bit widths. The budget is an average number of bits per element over the
layers it allocates: B_total = budget * sum_l N_l (Algorithm 1, line 1). With ``rate="paper"`` a
layer at b bits costs b * N_l; with ``rate="wire"`` it costs the bits its transport really hands to
Horovod at b bits (the caller supplies them from the cost model), so the budget is what crosses
the network.

In a job, ``hvd_gradq.DistributedOptimizer(allocator=..., trigger=...)`` runs it on rank 0 only,
when the trigger fires, and broadcasts the result.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hvd_gradq import checks
from hvd_gradq.alloc import distortion
from hvd_gradq.alloc.distortion import LossProbe, Quantize
from hvd_gradq.alloc.layer_types import layer_types
from hvd_gradq.alloc.solvers import SOLVERS, Allocation, AMPASchedule, RDCurves
from hvd_gradq.codecs.lowrank import factored_shape

RATES = ("paper", "wire")


@dataclass
class Evaluation:
    """What one allocation measured: the distortion table of the probed layers (rows ``names``,
    columns the options; NaN where another rank's part holds the cell), the layers left unprobed
    (``skip_share``) and the forward/backward passes it took."""

    names: tuple[str, ...]
    fixed: tuple[str, ...]
    table: np.ndarray
    counts: dict

    @staticmethod
    def merge(parts: Sequence[Evaluation]) -> Evaluation:
        """One evaluation from every rank's part (same layers; passes summed over the ranks)."""
        head = parts[0]
        if any(p.names != head.names or p.fixed != head.fixed for p in parts):
            raise ValueError("the ranks' table parts are for different layers")
        counts = {k: sum(p.counts[k] for p in parts) for k in head.counts}
        return Evaluation(head.names, head.fixed, distortion.merge_parts([p.table for p in parts]), counts)


@dataclass
class AllocationEvent:
    """One allocation: when, what it decided, what it cost."""

    step: int
    version: int
    summary: str
    seconds: float
    forwards: int
    backwards: int
    bits: dict[str, int] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)  # layers sent as low-rank factors
    changed: int = 0  # layers whose code (bit width or rank) this allocation changed
    rank_changes: int = 0  # of those, layers whose rank changed (to, from or between ranks)


class Allocator:
    """Per-layer bit widths from a distortion metric and a solver under a budget.

    Args:
        budget: average bits per element over the allocated layers (e.g. 2 or 3).
        metric: "lad" (exact, Eq. 2-3), "lad_first_order" (Eq. 7-8), "mse" or "ampa".
        solver: "lagrangian" (Algorithm 1), "greedy", "same_bits" (the uniform-allocation
            baseline: one width for every layer), "mckp_dp" or "ampa" (AMPA's
            interval schedule; the budget then only seeds the start level).
        options: the bit widths a layer may get (0 = not sent).
        rate: "paper" (b * N_l) or "wire" (real payload bits of the layer's transport).
        probe: a ``LossProbe`` (model, loss, batches); needed by the LAD metrics, and by every
            metric to compute the gradient it quantizes.
        lr: the step size eta of the LAD metrics; None: the optimizer's current learning rate.
        max_grad_norm: if training clips the gradient norm (``clip_grad_norm_``), the same bound:
            the LAD metrics then take the step eta * min(1, max_grad_norm / ||g||) that training
            takes, not eta * g (with lr 20 and a clip of 0.25, as for LSTM language models, the
            unclipped step would be many times the real one).
        group: "layer" (one width per layer) or "type" (QODA: one width per layer type, the
            types' R-D curves being the sums of their layers'; see ``alloc.layer_types``).
        skip_share: the smallest layers, together at most this fraction of the allocated
            elements (e.g. 0.01: biases and norms), are not probed: they get the widest option
            that leaves the other layers a feasible budget, and their rate is reserved from it.
            The LAD metrics then run L' x |B| x K forward passes for the L' probed layers only
            (on the benchmark LSTM 4 of its 11 tensors hold 99.8% of the elements). 0 (default):
            every layer is probed, as the paper does.
        ranks: low-rank options besides the bit widths (e.g. (1, 2, 4)): a matrix layer may be sent
            as its rank-r factors (``codec="lowrank"``'s code) when that is what the R-D curves
            choose under the budget; the allocation lists those layers in ``Allocation.ranks``.
            Layers that are not matrices, or whose factors would be more than half of them, cannot
            take a rank. Rates: ``rate="paper"`` the factors' bits, 32 r (rows + cols) in float32 (Q's
            side at 16 with ``factors="float16"``); ``"wire"`` the bytes handed to the collectives.
        spread: in a job of N > 1 ranks, the exact LAD metric's L x |B| x K forward passes are
            split over the ranks (each evaluates every N-th cell on the probe batches of rank 0,
            which it receives) and the table is gathered on rank 0: the same table cell for cell,
            about 1/N of the forwards per rank. False: rank 0 evaluates all of it.
        hysteresis: from the second allocation on, a layer keeps the option (bit width or rank)
            it has unless another is better by more than this fraction of its current
            distortion (its distortion there is lowered by ``hysteresis`` x its magnitude before
            solving), so that layers whose options are nearly equal do not flap between them at
            every allocation (a rank change restarts part of the subspace iteration; a width
            change recalibrates). 0 (the default): every allocation decides afresh.
    """

    def __init__(self, budget: float, *, metric: str = "lad", solver: str = "lagrangian",
                 options: Sequence[int] = (2, 3, 4, 5, 6, 7, 8), rate: str = "paper", probe: LossProbe | None = None,
                 lr: float | None = None, eps: float = 1e-9, dp_units: int = 4000,
                 ampa: AMPASchedule | None = None, group: str = "layer", max_grad_norm: float | None = None,
                 skip_share: float = 0.0, spread: bool = True, ranks: Sequence[int] = (),
                 hysteresis: float = 0.0) -> None:
        checks.number(budget, "budget (average bits per element)", low=0)
        checks.number(hysteresis, "hysteresis (a fraction of a layer's current distortion)", low=0)
        if hysteresis >= 1 or (hysteresis > 0 and (group != "layer" or solver == "ampa")):
            raise ValueError(f"hysteresis must be in [0, 1) and is for group='layer' with a table solver, got "
                             f"hysteresis={hysteresis!r}, group={group!r}, solver={solver!r}")
        self.hysteresis = float(hysteresis)
        checks.number(skip_share, "skip_share (a fraction of the elements)", low=0)
        if skip_share >= 1 or (skip_share > 0 and (group != "layer" or solver == "ampa")):
            raise ValueError(f"skip_share must be in [0, 1) and is for group='layer' with a table solver, got "
                             f"skip_share={skip_share!r}, group={group!r}, solver={solver!r}")
        self.skip_share = float(skip_share)
        if not isinstance(spread, bool):
            raise TypeError(f"spread must be True or False, got {spread!r}")
        self.spread = spread
        rk = tuple(ranks)
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rk) or list(rk) != sorted(set(rk)):
            raise ValueError(f"ranks must be distinct rising integers >= 1 (low-rank options), got {ranks!r}")
        if rk and (group != "layer" or solver == "ampa"):
            raise ValueError("ranks (low-rank options) are for group='layer' with a table solver, got "
                             f"group={group!r}, solver={solver!r}")
        self.ranks = rk
        opts = tuple(options)
        if not opts or any(isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= 8 for b in opts) \
                or list(opts) != sorted(set(opts)):
            raise ValueError(f"options must be distinct rising bit widths in 0..8, got {options!r}")
        if solver != "ampa" and budget < opts[0]:
            raise ValueError(
                f"budget {budget} bits/element is below the smallest option {opts[0]}: no allocation fits. Raise "
                f"the budget or add a smaller option (0 = a layer is not sent)"
            )
        if metric not in distortion.METRICS:
            raise ValueError(f"metric must be one of {distortion.METRICS}, got {metric!r}")
        if solver == "uniform":
            warnings.warn("solver='uniform' is now called 'same_bits'", DeprecationWarning, stacklevel=2)
            solver = "same_bits"
        if solver not in (*SOLVERS, "ampa"):
            raise ValueError(f"solver must be one of {[*SOLVERS, 'ampa']}, got {solver!r}")
        if group not in ("layer", "type"):
            raise ValueError(f"group must be 'layer' (a width per layer) or 'type' (per layer type), got {group!r}")
        if rate not in RATES:
            raise ValueError(f"rate must be one of {RATES}, got {rate!r}")
        if probe is None:
            raise ValueError("pass probe=hvd_gradq.LossProbe(model, loss_fn, batches): the allocator computes the "
                             "gradient it quantizes (and the LAD losses) on these batches")
        if not isinstance(probe, LossProbe):
            raise TypeError(f"probe must be a hvd_gradq.LossProbe, got {type(probe).__name__}")
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number > 0 or None, got {lr!r}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0
                                              and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got {max_grad_norm!r}")
        self.max_grad_norm = max_grad_norm
        self.budget = float(budget)
        self.metric = metric
        self.solver = solver
        self.options = opts
        self.rate = rate
        self.probe = probe
        self.lr = lr
        self.eps = eps
        self.dp_units = dp_units
        self.ampa = ampa if ampa is not None else (AMPASchedule() if solver == "ampa" else None)
        self.group = group
        self.last_curves: RDCurves | None = None

    @property
    def columns(self) -> tuple[int, ...]:
        """The options of the R-D table: the bit widths, then -r for each rank r."""
        return self.options + tuple(-r for r in self.ranks)

    @property
    def spreads(self) -> bool:
        """Whether a job splits this allocator's table over its ranks (``spread`` and exact LAD)."""
        return self.spread and self.metric == "lad" and self.solver != "ampa"

    def allocate(self, params: dict[str, torch.Tensor], quantize: Quantize, *, lr: float,
                 wire_bits: Callable[[str, int], float] | None = None,
                 factor_bits: Callable[[str, int], float | None] | None = None,
                 current: Mapping[str, int] | None = None) -> tuple[Allocation, dict]:
        """Bits per layer of ``params`` (name -> parameter). Returns the allocation and the cost
        (seconds, forward and backward passes). ``wire_bits(name, b)``: the bits a layer hands to
        the collectives at option b (``rate="wire"``); ``factor_bits(name, r)``: its rank-r factors'
        bits in the dtypes they travel in (``rate="paper"``; default: float32). ``current``: each
        layer's option now (a bit width, or -r for rank r), for ``hysteresis``; None at a first
        allocation."""
        start = time.perf_counter()
        if self.solver == "ampa":
            grads, counts = distortion.probe_gradients(self.probe, params)
            current = {n: self.ampa.bits.get(n, self.ampa.levels[0]) for n in grads}
            sens = {n: float(g.abs().mean() * (g - quantize(n, current[n], g)).abs().mean()) for n, g in grads.items()}
            bits = self.ampa.update(sens)
            rate = float(sum(bits[n] * p.numel() for n, p in params.items()))
            alloc = Allocation(bits=bits, choice=(), rate=rate, distortion=float("nan"), solver="ampa")
            return alloc, {"seconds": time.perf_counter() - start, **counts}
        ev = self.evaluate(params, quantize, lr=lr)
        return self.decide(ev, params, wire_bits, factor_bits, current), {"seconds": time.perf_counter() - start,
                                                                          **ev.counts}

    def evaluate(self, params: dict[str, torch.Tensor], quantize: Quantize, *, lr: float, batches=None,
                 part: tuple[int, int] = (0, 1)) -> Evaluation:
        """The distortion table of the probed layers (the measuring half of ``allocate``).

        ``batches``: the probe batches (default: drawn from the probe once, for the gradient and
        the losses alike). ``part=(r, n)``: with the exact LAD metric, only every n-th cell from r
        (see ``distortion.lad_exact``); the ranks of a job each evaluate one part of the same
        batches and ``Evaluation.merge`` puts the table together."""
        if self.solver == "ampa":
            raise ValueError("the AMPA schedule keeps state between allocations: use allocate()")
        batches = self.probe.get_batches() if batches is None else batches
        eta = self.lr if self.lr is not None else lr
        grads, counts = distortion.probe_gradients(self.probe, params, batches)
        if self.max_grad_norm is not None:  # the step training takes after clip_grad_norm_
            norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
            eta *= min(1.0, self.max_grad_norm / norm) if norm > 0 else 1.0
        fixed = self._unprobed(params)
        if fixed:
            grads = {n: g for n, g in grads.items() if n not in fixed}
        columns = self.columns
        if self.metric == "lad":
            table, c = distortion.lad_exact(self.probe, params, grads, quantize, columns, eta,
                                            batches=batches, part=part)
        elif self.metric == "lad_first_order":
            table, c = distortion.lad_first_order(self.probe, params, grads, quantize, columns, eta,
                                                  batches=batches)
        elif self.metric == "mse":
            table, c = distortion.mse(grads, quantize, columns)
        else:
            table, c = distortion.ampa(grads, quantize, columns)
        return Evaluation(tuple(grads), fixed, table, {k: counts[k] + c[k] for k in counts})

    def decide(self, ev: Evaluation, params: dict[str, torch.Tensor],
               wire_bits: Callable[[str, int], float] | None = None,
               factor_bits: Callable[[str, int], float | None] | None = None,
               current: Mapping[str, int] | None = None) -> Allocation:
        """The allocation from a (whole) ``evaluate`` table: the solving half of ``allocate``
        (``current``: see ``allocate``)."""
        names, fixed, table = ev.names, ev.fixed, ev.table.copy()
        if np.isnan(table).any():
            raise ValueError("the distortion table has cells not evaluated: merge the parts of every rank first")
        if self.rate == "wire" and wire_bits is None:
            raise ValueError("rate='wire' needs the transports' payload sizes (use it through the optimizer)")
        rates = np.array([[self._rate(n, b, params[n], wire_bits, factor_bits) for b in self.columns] for n in names],
                         dtype=np.float64)
        # an option a layer cannot take: worse and no cheaper than its widest option, never chosen
        bad = (table == distortion.NOT_APPLICABLE) | np.isnan(rates)
        nb = len(self.options)
        table = np.where(bad, table[:, :nb].max(axis=1, keepdims=True) + 1.0, table)
        rates = np.where(bad, rates[:, :nb].max(axis=1, keepdims=True), rates)
        if self.hysteresis and current:  # staying is worth hysteresis x the current distortion
            for i, n in enumerate(names):
                option = current.get(n)
                if option in self.columns and not bad[i, self.columns.index(option)]:
                    j = self.columns.index(option)
                    table[i, j] -= self.hysteresis * abs(table[i, j])
        total = self.budget * sum(params[n].numel() for n in (*names, *fixed))
        fixed_bits: dict[str, int] = {}
        fixed_rate = 0.0
        if fixed:  # the widest option that leaves the probed layers their cheapest choice
            def rate_of(b: int) -> float:
                return sum(wire_bits(n, b) if self.rate == "wire" else float(b * params[n].numel()) for n in fixed)

            floor = float(rates.min(axis=1).sum())
            width = next((b for b in reversed(self.options) if rate_of(b) + floor <= total), self.options[0])
            fixed_bits, fixed_rate = dict.fromkeys(fixed, width), rate_of(width)
            total -= fixed_rate
        if self.group == "type":  # one decision per type: its curve is the sum of its layers'
            kinds = layer_types(self.probe.model, params)
            groups = sorted({kinds[n] for n in names})
            member = np.array([[kinds[n] == g for n in names] for g in groups], dtype=np.float64)
            curves = RDCurves(tuple(groups), self.columns, member @ table, member @ rates)
        else:
            curves = RDCurves(names, self.columns, table, rates)
        self.last_curves = curves
        if self.solver == "mckp_dp":
            alloc = SOLVERS["mckp_dp"](curves, total, units=self.dp_units)
        elif self.solver == "lagrangian":
            alloc = SOLVERS["lagrangian"](curves, total, eps=self.eps)
        else:
            alloc = SOLVERS[self.solver](curves, total)
        if self.group == "type":
            alloc = Allocation(bits={n: alloc.bits[kinds[n]] for n in names}, choice=alloc.choice, rate=alloc.rate,
                               distortion=alloc.distortion, solver=f"{alloc.solver} per type",
                               info={**alloc.info, "types": {g: alloc.bits[g] for g in groups}})
        if fixed_bits:
            alloc = Allocation(bits={**alloc.bits, **fixed_bits}, choice=alloc.choice, rate=alloc.rate + fixed_rate,
                               distortion=alloc.distortion, solver=alloc.solver,
                               info={**alloc.info, "unprobed": sorted(fixed_bits)})
        if self.ranks:  # the columns -r are ranks
            rows = {n: i for i, n in enumerate(names)}
            widest = {n: self.options[int(rates[rows[n], :nb].argmax())] for n in names}
            chosen = {n: (widest[n] if n in rows and bad[rows[n], self.columns.index(b)] else b)
                      for n, b in alloc.bits.items()}
            alloc = Allocation(bits={n: b for n, b in chosen.items() if b >= 0}, choice=alloc.choice, rate=alloc.rate,
                               distortion=alloc.distortion, solver=alloc.solver, info=alloc.info,
                               ranks={n: -b for n, b in chosen.items() if b < 0})
        return alloc

    def _rate(self, name: str, b: int, param: torch.Tensor, wire_bits, factor_bits) -> float:
        """Bits per step of layer ``name`` at option ``b`` (NaN: the layer cannot take it)."""
        if self.rate == "wire" or (b < 0 and factor_bits is not None):
            r = wire_bits(name, b) if self.rate == "wire" else factor_bits(name, -b)
            return float("nan") if r is None else float(r)
        if b >= 0:
            return float(b * param.numel())
        shape = factored_shape(param.shape, -b)
        if shape is None:
            return float("nan")
        return 32.0 * -b * (shape[0] + shape[1])

    def _unprobed(self, params: dict[str, torch.Tensor]) -> tuple[str, ...]:
        """The smallest layers, together at most ``skip_share`` of the elements (never all)."""
        if not self.skip_share:
            return ()
        total = sum(p.numel() for p in params.values())
        out, held = [], 0
        for n, p in sorted(params.items(), key=lambda kv: (kv[1].numel(), kv[0])):
            if held + p.numel() > self.skip_share * total or len(out) + 1 == len(params):
                break
            out.append(n)
            held += p.numel()
        return tuple(out)

    def state_dict(self) -> dict:
        """What carries over between allocations: AMPA's schedule (bits, picks at the top level,
        taboo list). The other solvers decide afresh each time."""
        if self.ampa is None:
            return {"ampa": None}
        a = self.ampa
        return {"ampa": {"bits": dict(a.bits), "picks_at_top": dict(a.picks_at_top), "taboo": sorted(a.taboo)}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("ampa")
        if (saved is None) != (self.ampa is None):
            raise ValueError("allocator state is from an allocator with" + ("out" if saved is None else "")
                             + " an AMPA schedule; this one is " + repr(self))
        if saved is not None:
            self.ampa.bits = dict(saved["bits"])
            self.ampa.picks_at_top = dict(saved["picks_at_top"])
            self.ampa.taboo = set(saved["taboo"])

    def reset(self) -> None:
        """Forget the schedule (AMPA starts again from its lowest level)."""
        if self.ampa is not None:
            self.ampa.bits.clear()
            self.ampa.picks_at_top.clear()
            self.ampa.taboo.clear()

    def __repr__(self) -> str:
        return (f"Allocator(budget={self.budget}, metric={self.metric!r}, solver={self.solver!r}, "
                f"options={self.options}, rate={self.rate!r})")
