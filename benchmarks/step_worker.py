"""One benchmark cell: train a model for warm-up + timed steps with one compressor; one JSON per rank.

Run by ``benchmarks.bandwidth`` on the emulated cluster (horovodrun across namespaces), or alone
(one process: the compute-only step time, no communication). Counts the bytes the node's ``eth0``
put on the link during the timed steps (kernel counters) and the payload bytes handed to Horovod
per step.

Models and compressors are named in ``workloads.tasks``: none, fp16 (Horovod's), stock2/4/8
(``UniformCompressor`` on the stock optimizer, op=Sum), lad2/lad3 (``hvd_gradq.DistributedOptimizer``,
shared_scale codec, exact-LAD Lagrangian allocation at budget 2/3, similarity trigger),
jointsq20/jointsq100 (drop-in, JointSQ at 20x/100x), qsgd4 (drop-in); the old names uniform2/4/8
are still accepted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import horovod.torch as hvd
import torch

import hvd_gradq
from hvd_gradq.bits import native
from hvd_gradq.exchange.timings import summarize
from workloads.tasks import BENCH_COMPRESSORS, TASKS, bench_task, compressor_name, make_optimizer


def counters() -> tuple[int, int]:
    base = Path("/sys/class/net/eth0/statistics")
    if not base.exists():
        return 0, 0
    return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())


def timed_steps(step, warmup: int, steps: int, barrier=None):
    """Run ``warmup`` untimed steps, then ``steps`` timed ones; return the step times, the losses
    and the bytes (sent, received) the node's eth0 counted over the timed steps."""
    for i in range(warmup):
        step(i)
    if barrier is not None:
        barrier()
    tx0, rx0 = counters()
    times, losses = [], []
    for i in range(warmup, warmup + steps):
        t = time.perf_counter()
        losses.append(step(i))
        times.append(time.perf_counter() - t)
    tx1, rx1 = counters()
    return times, losses, (tx1 - tx0, rx1 - rx0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(TASKS), required=True)
    ap.add_argument("--compressor", type=compressor_name, choices=BENCH_COMPRESSORS, required=True)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", required=True, help="directory for rank<i>.json")
    ap.add_argument("--no-spread", action="store_true",
                    help="LAD rows: rank 0 evaluates the whole distortion table (Allocator(spread=False))")
    args = ap.parse_args(argv)
    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rank, size = hvd.rank(), hvd.size()
    model, batch, loss_fn = bench_task(args.model, rank, size)
    if args.model == "wgan":  # QODA, one parameter group (step size) per player
        base = hvd_gradq.QODA([{"params": list(model.gen.parameters())}, {"params": list(model.critic.parameters())}],
                              lr=0.05)
    else:
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt, comp = make_optimizer(args.compressor, model, base, batch, loss_fn, spread=not args.no_spread)
    c = args.compressor
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    breakdown: list[dict] = []  # Horovod's own compression's steps, timed here (hvd_gradq's compressor times its own)

    def step(i: int) -> float:
        t0 = time.perf_counter()
        inputs, target = batch(i)
        opt.zero_grad()
        loss = loss_fn(model(inputs), target) / size
        loss.backward()
        if comp is not None or size == 1:
            opt.step()
            return float(loss.detach()) * size
        t1 = time.perf_counter()
        opt.synchronize()  # Horovod waits for its allreduces (and fp16's decompress) here
        t2 = time.perf_counter()
        with opt.skip_synchronize():
            opt.step()
        t3 = time.perf_counter()
        breakdown.append({"compute": t1 - t0, "encode": 0.0, "decode": 0.0, "wait": t2 - t1, "allocation": 0.0,
                          "update": t3 - t2, "other": 0.0, "step": t3 - t0, "bytes": 0})
        return float(loss.detach()) * size

    times, losses, (tx, rx) = timed_steps(step, args.warmup, args.steps, hvd.barrier if size > 1 else None)
    ring = 2 * (size - 1) / size  # what a ring allreduce sends per rank, per payload byte
    if comp is not None:  # what the compressor handed to collectives (Horovod's placeholders included)
        payload = comp.wire_stats().payload_bytes
        predicted_sent = sum(p.predicted.sent_bytes for p in comp.layer_plans())
    else:
        payload = sum(p.numel() * (2 if c == "fp16" else 4) for p in model.parameters())
        predicted_sent = ring * payload
    result = {
        "model": args.model, "compressor": c, "size": size, "rank": rank,
        "params": sum(p.numel() for p in model.parameters()),
        "median_step_s": statistics.median(times), "step_s": times, "loss": losses,
        "tx_per_step": tx / args.steps, "rx_per_step": rx / args.steps,
        "payload_per_step": payload, "predicted_sent_per_step": predicted_sent,
        "fp32_bytes": 4 * sum(p.numel() for p in model.parameters()),
        "warmup": args.warmup, "steps": args.steps,
    }
    if comp is not None and comp.allocator is not None:
        result["allocation"] = comp.allocation_overhead()
        result["bits"] = {p.name: p.bits for p in comp.layer_plans()}
    if comp is not None:
        records = comp.step_timings(last=args.steps)
    else:
        records = breakdown[-args.steps:]
    if records:
        result["timings"] = records
        result["breakdown"] = summarize(records)
    result["isa"] = native.isa()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
