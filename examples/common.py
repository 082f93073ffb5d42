"""The training loop the examples share: one script, two ways to run it.

* a real Horovod job: ``horovodrun -np N -H ... python examples/<x>.py ...`` (or ``launch/hvdrun``);
* N workers simulated in one process: ``python examples/<x>.py --workers N ...``
  (``hvd_gradq.SimulatedWorkers``: the same exchange code on N micro-batches, averaged).

Both see the same data: at step s, worker r trains on micro-batch s * N + r of the epoch's order,
so a simulated run and a real one with the same seed and N start from the same aggregate.

Compressors (``--compressor``, named in ``workloads.tasks``): ``none``; ``fp16`` (Horovod's, real
jobs only); ``stock`` (the preset ``hvd_gradq.UniformCompressor``: one width on the rotated lanes,
the same lanes inside ``SimulatedWorkers``); and every codec of ``hvd_gradq.CODECS``: ``rotated``,
``shared_scale``, ``qsgd``, ``qsgdinf``, ``nuqsgd``, ``natural``, ``terngrad``, ``alq``, ``amq``,
``jointsq`` and ``topk`` (with ``--ratio``), ``lowrank`` (PowerSGD's factors, with ``--rank``), in a
job through Horovod's own ``hvd.DistributedOptimizer`` with ``compression=hvd_gradq.Compressor(...)``
(``--way stock``, the default) or through the drop-in ``hvd_gradq.DistributedOptimizer``
(``--way dropin``; the same codes and bytes), and ``SimulatedWorkers`` when simulated. The old names ``uniform`` (now
``stock``) and ``gradq-uniform`` (now ``shared_scale``) are still accepted.
``--allocator lad|lad_first_order|mse|ampa`` lets rank 0 re-decide the bits per layer under
``--budget`` (priced by ``--rate``) when the trigger fires; ``--ranks 1,2,4`` lets it send a matrix
as low-rank factors instead.

``--log-json FILE`` writes a JSON log: the arguments and the command, per-step loss, wire bytes, seconds
and normalised coding variance (sum ||Q(x) - x||^2 / sum ||x||^2 over the gather-coded layers),
every evaluation, the bits per layer at every codebook version, the allocation events.

Progress: rank 0 only; a bar on a terminal, a plain line every ~10% of the epoch otherwise (a log
file, horovodrun's prefixed output).

The examples run from a checkout (``python examples/<x>.py``): this module puts the repository
root on ``sys.path`` for ``workloads`` (models, data, the task and compressor names).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

import hvd_gradq
from hvd_gradq.alloc.layer_types import layer_types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # workloads/ lives at the repository root, next to examples/
    sys.path.insert(0, ROOT)

from workloads.progress import Progress, say  # noqa: E402
from workloads.tasks import (  # noqa: E402
    COMPRESSORS,
    DROPIN,
    EXAMPLE_COMPRESSORS,
    SOLVERS,
    Workload,
    compressor_name,
    solver_name,
)

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Task:
    """What an example defines: the model, its loss, the data and the evaluation.

    ``micro_batch(step, worker, workers, epoch)`` is worker ``worker``'s (inputs, targets) at
    ``step`` of ``epoch``; ``steps_per_epoch(workers)`` how many steps make an epoch;
    ``evaluate(model)`` a dict of metrics on held-out data (the first one is the headline);
    ``probe(k, generator)`` k random training batches for the allocator's loss probe."""

    name: str
    model: nn.Module
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    micro_batch: Callable[[int, int, int, int], Batch]
    steps_per_epoch: Callable[[int], int]
    evaluate: Callable[[nn.Module], dict[str, float]]
    probe: Callable[[int, torch.Generator], list[Batch]]
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    clip: float | None = None  # gradient-norm clipping after the exchange (language models)
    extra: dict = field(default_factory=dict)


def add_arguments(p: argparse.ArgumentParser, *, bits: int = 2, lr: float = 0.05, batch_size: int = 64,
                  epochs: int = 1) -> None:
    """The arguments every example takes (examples add their own model/data ones)."""
    p.add_argument("--compressor", type=compressor_name, choices=EXAMPLE_COMPRESSORS, default="stock",
                   help="none/fp16/stock: Horovod's optimizer with that compression (stock: "
                        "hvd_gradq.UniformCompressor's lanes); any other: that hvd_gradq codec (see --way; old names: "
                        "uniform = stock, gradq-uniform = shared_scale)")
    p.add_argument("--bits", type=int, default=bits,
                   help="bit width of every coded layer (the start with --allocator)")
    p.add_argument("--ratio", type=float, default=20.0, help="jointsq / topk: compression ratio against float32")
    p.add_argument("--rank", type=int, default=4, help="lowrank: the rank of the matrices' factors (PowerSGD)")
    p.add_argument("--factors", default="float32", choices=["float32", "float16"],
                   help="low-rank factors (lowrank, --ranks): float32, or Q (the longer side) in float16")
    p.add_argument("--bucket-size", type=int, default=1024, help="level codecs: elements per bucket (one norm each)")
    p.add_argument("--error-feedback", choices=["auto", "on", "off"], default="auto",
                   help="keep what coding drops and add it back next step (auto: for biased codecs)")
    p.add_argument("--rounding", default="nearest", choices=["nearest", "stochastic"],
                   help="stock / rotated: nearest (biased, with error feedback) or stochastic rounding")
    p.add_argument("--block-scales", default="this_step", choices=["this_step", "previous_step"],
                   help="rotated on allreduce: this step's block scales (a first small allreduce) or last step's")
    p.add_argument("--way", choices=["stock", "dropin"], default="stock",
                   help="real jobs with an hvd_gradq codec: Horovod's own hvd.DistributedOptimizer with "
                        "compression=hvd_gradq.Compressor (stock), or hvd_gradq.DistributedOptimizer (dropin)")
    p.add_argument("--show-bits", action="store_true", help="print every layer's bits at the end (always with "
                                                            "--allocator)")
    p.add_argument("--transport", default="auto", choices=["auto", "allreduce", "allgather", "two_phase"],
                   help="per-layer transport (auto: the cost model picks)")
    p.add_argument("--min-elements", type=int, default=1024, help="layers smaller than this go as float32")
    p.add_argument("--level-groups", default="layer", choices=["layer", "type", "global"],
                   help="alq/amq: one fitted level set per layer, per layer type (QODA) or one for all")
    p.add_argument("--refit-every", type=int, default=None,
                   help="alq/amq: refit the levels on rank 0 after step 0 and then every this many steps "
                        "(default 100; 0: never)")
    p.add_argument("--allocator", default="none", choices=["none", "lad", "lad_first_order", "mse", "ampa"],
                   help="re-decide per-layer bits on rank 0 with this distortion metric")
    p.add_argument("--solver", type=solver_name, default="lagrangian", choices=SOLVERS,
                   help="allocator: the solver (old name: uniform = same_bits)")
    p.add_argument("--budget", type=float, default=2.0, help="allocator: average bits per element")
    p.add_argument("--rate", default="paper", choices=["paper", "wire"],
                   help="allocator: price a layer at b bits per element (paper) or at what its transport sends (wire)")
    p.add_argument("--options", default="0,2,3,4,5,6,8", help="allocator: the bit widths a layer may get")
    p.add_argument("--ranks", default="", help="allocator: low-rank options besides the bit widths (e.g. 1,2,4)")
    p.add_argument("--group", default="layer", choices=["layer", "type"], help="allocator: a width per layer or type")
    p.add_argument("--probe-batches", type=int, default=2, help="allocator: batches of the loss probe (K)")
    p.add_argument("--trigger", default="similarity", choices=["similarity", "interval", "static"])
    p.add_argument("--tau", type=float, default=0.95)
    p.add_argument("--k-min", type=int, default=20)
    p.add_argument("--interval", type=int, default=50)
    p.add_argument("--op", choices=["sum", "average"], default="sum",
                   help="real jobs with --compressor none/fp16/stock: Horovod's allreduce op")
    p.add_argument("--workers", type=int, default=0,
                   help="simulate this many workers in one process (0: a real job; launch it with horovodrun)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: full epoch)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="per worker")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every this many steps (0: per epoch)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-json", dest="log", default="", help="write the JSON log here (rank 0)")
    p.add_argument("--summary-json", default="",
                   help="write a short JSON summary here (rank 0; with {rank} in the path, every rank its own)")
    p.add_argument("--checkpoint", default="", help="save model, optimizer and compression state here after every "
                                                    "epoch")
    p.add_argument("--resume", action="store_true", help="start from --checkpoint (same number of workers)")
    p.add_argument("--reset-compression", action="store_true",
                   help="with --resume: start the compression state afresh (e.g. another number of workers)")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad combinations before any work, with the fix."""
    if args.workers < 0:
        raise SystemExit("--workers must be >= 0 (0: a real Horovod job)")
    if args.workers and int(os.environ.get("HOROVOD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))) > 1:
        raise SystemExit("--workers N simulates N workers in one process; do not launch it with horovodrun")
    if args.workers and args.compressor == "fp16":
        raise SystemExit("--compressor fp16 is Horovod's own compression: run it under horovodrun (no --workers)")
    if args.way == "dropin" and args.compressor not in DROPIN:
        raise SystemExit(f"--way dropin needs a hvd_gradq codec (one of {list(DROPIN)}), not --compressor "
                         f"{args.compressor}")
    if args.allocator != "none" and args.compressor not in DROPIN:
        raise SystemExit(f"--allocator needs a hvd_gradq codec, e.g. --compressor shared_scale or one of "
                         f"{list(DROPIN)}")
    if args.resume and not args.checkpoint:
        raise SystemExit("--resume needs --checkpoint PATH")
    for name in ("epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")


class _Job:
    """The distributed side of a run: a Horovod job or ``SimulatedWorkers``."""

    def __init__(self, args: argparse.Namespace, task: Task) -> None:
        self.args = args
        self.task = task
        self.simulated = args.workers > 0
        model = task.model
        base = task.make_optimizer(model)
        named = list(model.named_parameters())
        if self.simulated:
            self.hvd = None
            self.rank, self.size = 0, args.workers
        else:
            import horovod.torch as hvd

            self.hvd = hvd
            self.rank, self.size = hvd.rank(), hvd.size()
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            hvd.broadcast_optimizer_state(base, root_rank=0)
        self.allocation = self._allocation()
        c = args.compressor
        spec = COMPRESSORS[c]
        #: Horovod's own optimizer in a job: Horovod's compression, or an hvd_gradq compressor (--way stock)
        self.stock = not self.simulated and (spec.stock or args.way == "stock")
        #: the hvd_gradq compressor handed to hvd.DistributedOptimizer (None: Horovod's, the drop-in, simulated)
        self.compression = None
        kw = {"bits": args.bits, "ratio": args.ratio, "rank": args.rank, "factors": args.factors,
              "bucket_size": args.bucket_size, "seed": args.seed,
              "min_elements": args.min_elements, "transport": args.transport, "refit_levels": args.refit_every,
              "level_groups": hvd_gradq.layer_types(model) if args.level_groups == "type" else args.level_groups,
              "rounding": args.rounding, "block_scales": args.block_scales,
              "error_feedback": {"auto": "auto", "on": True, "off": False}[args.error_feedback], **self.allocation}
        codec = None if c == "none" else spec.codec
        if self.stock:
            hvd = self.hvd
            if spec.path == "stock":
                self.op = hvd.Sum if args.op == "sum" else hvd.Average
                self.compression = hvd_gradq.UniformCompressor(bits=args.bits, named_parameters=named, op=self.op,
                                                               seed=args.seed, rounding=args.rounding)
            elif spec.path == "dropin":  # every hvd_gradq codec through Horovod's optimizer: the mean, as simulated
                self.op = hvd.Average
                self.compression = hvd_gradq.Compressor(named, op=self.op, codec=codec, lr=base, **kw)
            else:
                self.op = hvd.Sum if args.op == "sum" else hvd.Average
            compression = self.compression or (hvd.Compression.fp16 if c == "fp16" else hvd.Compression.none)
            self.opt = hvd.DistributedOptimizer(base, named_parameters=named, compression=compression, op=self.op)
            if spec.path == "dropin":
                self.compression.track_error = True
            return
        if spec.path == "stock":  # simulated: the lanes as UniformCompressor sends them in a job
            settings = ("bits", "ratio", "bucket_size", "seed", "min_elements", "refit_levels", "error_feedback",
                        "rounding")
            for key in ("rank", "factors", "level_groups", "transport", "block_scales"):
                kw.pop(key)
            coding = hvd_gradq.Coding(codec="rotated", transport="allreduce", block_scales="previous_step",
                                      **{k: kw.pop(k) for k in settings})
            self.opt = hvd_gradq.SimulatedWorkers(base, named, args.workers, coding=coding, **kw)
        elif self.simulated:
            self.opt = hvd_gradq.SimulatedWorkers(base, named, args.workers, codec=codec, **kw)
        else:
            self.op = self.hvd.Average  # the mean, as the simulation forms it
            self.opt = hvd_gradq.DistributedOptimizer(base, named_parameters=named, op=self.op, codec=codec, **kw)
        self.opt.track_error = True

    @property
    def coder(self):
        """What holds the coding (plans, codebook, timings, checkpoints): the compressor on the
        stock path, else the optimizer; None for Horovod's own compression."""
        return self.compression if self.stock else self.opt

    def _allocation(self) -> dict:
        args, task = self.args, self.task
        if args.allocator == "none":
            return {}
        self.probe_gen = torch.Generator().manual_seed(args.seed + 1)
        options = tuple(int(b) for b in args.options.split(","))
        probe = hvd_gradq.LossProbe(task.model, task.criterion, lambda: task.probe(args.probe_batches, self.probe_gen))
        return {"allocator": hvd_gradq.Allocator(args.budget, metric=args.allocator, solver=args.solver,
                                                 options=options, probe=probe, group=args.group,
                                                 max_grad_norm=task.clip, rate=args.rate,
                                                 ranks=tuple(int(r) for r in args.ranks.split(",") if r)),
                "trigger": hvd_gradq.Trigger(args.trigger, tau=args.tau, k_min=args.k_min, interval=args.interval)}

    # ---- one step ------------------------------------------------------------------------------------
    def step(self, step: int, epoch: int) -> float:
        """One training step; returns the mean loss over the workers."""
        task, model, opt = self.task, self.task.model, self.opt
        losses = []
        opt.zero_grad()
        if self.simulated:
            for r in range(self.size):
                x, y = task.micro_batch(step, r, self.size, epoch)
                loss = task.criterion(model(x), y)
                opt.backward(loss)
                losses.append(float(loss.detach()))
        else:
            x, y = task.micro_batch(step, self.rank, self.size, epoch)
            loss = task.criterion(model(x), y)
            scale = self.size if self.stock and self.op == self.hvd.Sum else 1  # Sum adds the ranks' gradients
            (loss / scale).backward()
            losses.append(float(loss.detach()))
        if task.clip is None:
            opt.step()
        else:
            opt.synchronize()
            nn.utils.clip_grad_norm_(model.parameters(), task.clip)
            if self.simulated:
                opt.step()
            else:
                with opt.skip_synchronize():
                    opt.step()
        if not self.simulated:  # every rank logs the mean over ranks
            losses = [float(self.hvd.allreduce(torch.tensor(losses[0]), op=self.hvd.Average, name="loss"))]
        return sum(losses) / len(losses)

    # ---- reporting -----------------------------------------------------------------------------------
    def wire(self) -> tuple[int, int]:
        """(payload bytes this rank handed to the collectives in the latest step, float32 bytes)."""
        fp32 = sum(4 * p.numel() for p in self.task.model.parameters() if p.requires_grad)
        if self.compression is not None:
            w = self.compression.wire_stats()
            return w.payload_bytes, w.fp32_bytes
        if self.stock:
            return (fp32 // 2 if self.args.compressor == "fp16" else fp32), fp32
        if self.simulated:
            return self.opt.payload_bytes()
        return sum(p.payload_bytes for p in self.opt.layer_plans()), fp32

    def coding_variance(self) -> float | None:
        """Normalised coding variance of the latest step over the gather-coded layers (all
        simulated workers, or this rank in a job); None where nothing was measured."""
        coder = self.coder
        if coder is None or isinstance(coder, hvd_gradq.UniformCompressor) or coder.codebook is None:
            return None
        return coder.coding_variance()

    def bits(self) -> dict[str, int]:
        coder = self.coder
        if coder is None:
            b = 16 if self.args.compressor == "fp16" else 32
            return {n: b for n, p in self.task.model.named_parameters() if p.requires_grad}
        plans = coder.layer_plans()
        if not plans:
            return coder.bits()
        # a layer sent as low-rank factors: its bits per element on the wire (float32 factors)
        return {p.name: (round(8 * p.predicted.payload_bytes / p.numel, 2) if p.rank else p.bits) for p in plans}

    def version(self) -> int:
        coder = self.coder
        return 0 if coder is None or coder.codebook is None else coder.codebook.version

    def events(self) -> list[dict]:
        return [asdict(e) for e in getattr(self.coder, "allocation_events", [])]

    def overhead(self) -> dict | None:
        return self.coder.allocation_overhead() if self.allocation else None

    def transports(self) -> dict[str, str]:
        coder = self.coder
        return {} if coder is None else {p.name: p.transport for p in coder.layer_plans()}

    def summary_line(self) -> str | None:
        """The coder's one line (layers per transport, bytes), in a job."""
        coder = self.coder
        return None if coder is None or self.simulated else coder.transport_summary()

    # ---- checkpoint ----------------------------------------------------------------------------------
    def compression_state(self):
        return None if self.coder is None else self.coder.compression_state_dict()

    def load_compression_state(self, state, reset: bool) -> None:
        if self.coder is not None and state is not None:
            self.coder.load_compression_state_dict(state, reset=reset)


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def run(task_factory: Callable[[argparse.Namespace], Task], args: argparse.Namespace) -> dict:
    """Train ``task_factory(args)`` as the arguments say; returns the summary (rank 0 writes the logs)."""
    check_arguments(args)
    if not args.workers:
        import horovod.torch as hvd

        hvd.init()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every mode
    task = task_factory(args)
    job = _Job(args, task)
    rank, size = job.rank, job.size
    lead = rank == 0
    if lead and job.allocation:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    model = task.model
    n_params = sum(p.numel() for p in model.parameters())
    mode = f"{size} simulated workers" if job.simulated else f"{size} Horovod workers"
    if lead:
        say(f"{task.name} ({n_params} parameters), {mode}, compressor={args.compressor}"
            + (f" ratio={args.ratio:g}" if args.compressor in ("jointsq", "topk") else
               f" bits={args.bits}" if args.compressor not in ("none", "fp16") else "")
            + (f", allocator={args.allocator}/{args.solver} budget={args.budget}" if job.allocation else ""))

    first_epoch = 0
    if args.resume:
        ckpt = torch.load(args.checkpoint, weights_only=False)  # every rank reads the same file
        model.load_state_dict(ckpt["model"])
        job.opt.load_state_dict(ckpt["optimizer"])
        job.load_compression_state(ckpt["compression"], args.reset_compression)
        if job.allocation and ckpt.get("probe_rng") is not None:
            job.probe_gen.set_state(ckpt["probe_rng"])
        if ckpt.get("torch_rng") is not None:
            torch.set_rng_state(ckpt["torch_rng"])
        first_epoch = ckpt["epoch"]
        if lead:
            say(f"resumed from {args.checkpoint} after epoch {first_epoch}")

    log = {"example": task.name, "command": command_line(), "args": vars(args), "mode": "simulated" if job.simulated
           else "horovod", "workers": size, "parameters": n_params,
           "layers": {n: p.numel() for n, p in model.named_parameters() if p.requires_grad},
           "layer_types": layer_types(model), "steps": [], "evals": [], "codebooks": [], "allocations": []}
    steps_per_epoch = task.steps_per_epoch(size)
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    global_step = first_epoch * steps_per_epoch
    seen_version = -1
    started = time.perf_counter()
    train_seconds = 0.0

    progress = Progress(0, "", enabled=False)

    def evaluate(epoch: int) -> dict:
        metrics = task.evaluate(model)
        entry = {"step": global_step, "epoch": epoch, "train_seconds": train_seconds, **metrics}
        log["evals"].append(entry)
        if lead:
            progress.write(f"step {global_step} (epoch {epoch}): "
                           + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    for epoch in range(first_epoch, args.epochs):
        progress = Progress(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", enabled=lead)
        for step in range(steps_per_epoch):
            t = time.perf_counter()
            loss = job.step(step, epoch)
            dt = time.perf_counter() - t
            train_seconds += dt
            sent, fp32 = job.wire()
            log["steps"].append({"step": global_step, "loss": loss, "wire_bytes": sent, "fp32_bytes": fp32,
                                 "seconds": dt, "coding_variance": job.coding_variance()})
            version = job.version()
            if version != seen_version or global_step == 0:
                log["codebooks"].append({"step": global_step, "version": version, "bits": job.bits()})
                seen_version = version
            global_step += 1
            if not math.isfinite(loss):
                raise SystemExit(f"the loss is {loss} at step {global_step - 1}: training diverged")
            if lead:
                progress.set_postfix(f"loss={loss:.3f}, wire={8 * sent / max(fp32 / 4, 1):.2f} b/el")
            progress.update()
            if args.eval_every and global_step % args.eval_every == 0 and step + 1 < steps_per_epoch:
                evaluate(epoch + 1)
        progress.close()
        metrics = evaluate(epoch + 1)
        if lead:
            head = next(iter(metrics))
            say(f"epoch {epoch + 1}: {head.replace('_', ' ')} {metrics[head]:.4f}")
        if args.checkpoint:  # the compression state is collective (every rank's residuals); rank 0 saves
            state = job.compression_state()
            if lead:
                torch.save({"model": model.state_dict(), "optimizer": job.opt.state_dict(), "compression": state,
                            "epoch": epoch + 1, "torch_rng": torch.get_rng_state(),
                            "probe_rng": job.probe_gen.get_state() if job.allocation else None}, args.checkpoint)

    sent, fp32 = job.wire()
    mean_sent = sum(s["wire_bytes"] for s in log["steps"]) / max(len(log["steps"]), 1)
    final = log["evals"][-1] if log["evals"] else {}
    summary = {"example": task.name, "workers": size, "mode": log["mode"], "compressor": args.compressor,
               "bits": args.bits, "op": args.op, "seconds": time.perf_counter() - started,
               "train_seconds": train_seconds, "steps": global_step,
               "payload_bytes_per_step": sent, "fp32_bytes_per_step": fp32, "wire_ratio": sent / fp32,
               "mean_wire_ratio": mean_sent / fp32, "bits_per_element": 32 * sent / fp32,
               "transports": job.transports(), "final": {k: v for k, v in final.items() if k not in ("step",)},
               "allocation": job.overhead(), "final_bits": job.bits(), "rank": rank,
               "param_digest": hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                                       for _, p in sorted(model.named_parameters()))).hexdigest()}
    head = next((k for k in final if k not in ("step", "epoch", "train_seconds")), None)
    if head is not None:
        summary[head] = [e[head] for e in log["evals"]]
    log["allocations"] = job.events()
    log["summary"] = summary
    if lead:
        if job.coder is not None:
            line = job.summary_line()
            say(f"wire per step: {sent} B vs {fp32} B fp32 ({fp32 / max(sent, 1):.1f}x fewer; mean over steps "
                f"{fp32 / max(mean_sent, 1):.1f}x)" + (f"; {line}" if line else ""))
            say(f"wire reduction: {fp32 / max(sent, 1):.1f}x fewer bytes than fp32 ({sent} vs {fp32} bytes per step)")
            if args.show_bits or job.allocation:
                say("bits per layer: " + ", ".join(f"{n} {b}" for n, b in job.bits().items()))
        if args.log:
            with open(args.log, "w") as f:
                json.dump(log, f)
    if args.summary_json and (lead or "{rank}" in args.summary_json):  # "{rank}": every rank writes its own
        with open(args.summary_json.replace("{rank}", str(rank)), "w") as f:
            json.dump(summary, f, indent=1)
    if isinstance(job.opt, hvd_gradq.SimulatedWorkers):
        job.opt.close()
    return summary


def add_language_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab", type=int, default=10_000, help="the most frequent training tokens kept (others: <unk>)")
    p.add_argument("--bptt", type=int, default=35, help="tokens per training sequence")
    p.add_argument("--eval-limit", type=int, default=0, help="score only the first N held-out tokens (0: all)")


def language_model_task(args: argparse.Namespace, workload: Workload, model: nn.Module,
                        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], clip: float) -> Task:
    """Word-level language modelling of Jane Austen's six novels (``workload.data``, i.e.
    ``workloads.datasets.austen_lm``: the first 90% of the tokens train, the next 5% validate, the
    last 5% test); the task carries ``workload.title``. Training sequences
    are the non-overlapping ``--bptt``-token windows of the training split, shuffled per epoch;
    a micro-batch is ``--batch-size`` of them. Perplexity: exp of the mean token cross-entropy over
    all windows of a held-out split."""
    data = workload.data(args.vocab)
    train, T, b = data["train"], args.bptt, args.batch_size
    starts = torch.arange(0, len(train) - T - 1, T)
    orders: dict[int, torch.Tensor] = {}

    def windows(ids: torch.Tensor, at: torch.Tensor) -> Batch:
        seq = ids[at.unsqueeze(1) + torch.arange(T + 1)]
        return seq[:, :-1], seq[:, 1:]

    def criterion(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    def micro_batch(step: int, worker: int, workers: int, epoch: int) -> Batch:
        if epoch not in orders:
            orders.clear()
            orders[epoch] = starts[torch.randperm(len(starts), generator=torch.Generator().manual_seed(
                args.seed * 1000 + epoch))]
        i = (step * workers + worker) * b
        return windows(train, orders[epoch][i:i + b])

    def perplexity(model: nn.Module, ids: torch.Tensor) -> float:
        if args.eval_limit:
            ids = ids[:args.eval_limit]
        at = torch.arange(0, len(ids) - T - 1, T)
        total, count = 0.0, 0
        model.eval()
        with torch.no_grad():
            for i in range(0, len(at), 64):
                x, y = windows(ids, at[i:i + 64])
                total += float(criterion(model(x), y)) * y.numel()
                count += y.numel()
        model.train()
        return math.exp(total / count)

    def probe(k: int, gen: torch.Generator) -> list[Batch]:
        return [windows(train, starts[torch.randint(len(starts), (b,), generator=gen)]) for _ in range(k)]

    return Task(name=workload.title, model=model, criterion=criterion, micro_batch=micro_batch,
                steps_per_epoch=lambda workers: len(starts) // (b * workers),
                evaluate=lambda m: {"valid_ppl": perplexity(m, data["valid"]), "test_ppl": perplexity(m, data["test"])},
                probe=probe, make_optimizer=make_optimizer, clip=clip, extra={"vocab": data["vocab"]})
