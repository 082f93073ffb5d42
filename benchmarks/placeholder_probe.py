"""What the stock path's placeholders cost on their own: ``--count`` tensors of 8 words (64 bytes,
one per layer that Horovod's allreduce does not carry itself) allreduced through Horovod, all
submitted at once and then waited for, as a step hands them over, ``--repeats`` times; one JSON per
rank with the times. Run by ``benchmarks.stock_path --probe`` under horovodrun on the emulated
cluster.

In a training step the placeholders share Horovod's cycles and fusion buffer with the lanes and
the float32 layers, so this is an upper bound of their cost: the time they take with nothing to
hide behind.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import horovod.torch as hvd
import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, required=True, help="placeholders per step")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--op", choices=("sum", "average"), default="sum")
    ap.add_argument("--out", required=True, help="directory for rank<i>.json")
    args = ap.parse_args(argv)
    if args.count < 1:
        raise SystemExit("--count must be at least 1")
    hvd.init()
    op, dtype = (hvd.Sum, torch.int64) if args.op == "sum" else (hvd.Average, torch.float64)
    headers = [torch.zeros(8, dtype=dtype) for _ in range(args.count)]
    times = []
    for i in range(args.warmup + args.repeats):
        hvd.allreduce(torch.zeros(1), name="probe.barrier")  # start every repeat together
        started = time.perf_counter()
        handles = [hvd.allreduce_async(h, name=f"probe.placeholder.{j}", op=op) for j, h in enumerate(headers)]
        for handle in handles:
            hvd.synchronize(handle)
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    cuts = statistics.quantiles(times, n=10)
    result = {"rank": hvd.rank(), "size": hvd.size(), "count": args.count, "bytes": 64 * args.count,
              "op": args.op, "repeats": args.repeats, "median_s": statistics.median(times), "p10_s": cuts[0],
              "p90_s": cuts[-1], "min_s": min(times)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{hvd.rank()}.json").write_text(json.dumps(result))
    hvd.shutdown()


if __name__ == "__main__":
    main()
