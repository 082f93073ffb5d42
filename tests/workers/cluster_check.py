"""Worker for tests/test_cluster.py: runs on the emulated cluster (one rank per namespace node).

Trains a wide MLP (784-2048-10, 1.6M parameters, so that gradients rather than Horovod's per-step
coordination messages dominate the link) on Fashion-MNIST for a few steps uncompressed and with
UniformCompressor at 2 bits (op=Sum) and records, per rank, the bytes the node's eth0 put on the
link per step (kernel counters) next to the payload bytes handed to Horovod per step."""
import argparse
import json
import time
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

import hvd_gradq
from workloads.datasets import fashion_mnist

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--steps", type=int, default=6)
args = ap.parse_args()
hvd.init()
torch.set_num_threads(1)
rank, size = hvd.rank(), hvd.size()
x, y = fashion_mnist("test")


def counters():
    base = Path("/sys/class/net/eth0/statistics")
    return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())


def run(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 2048), torch.nn.ReLU(),
                                torch.nn.Linear(2048, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    comp = None
    if kind == "uniform2":
        comp = hvd_gradq.UniformCompressor(bits=2, named_parameters=model.named_parameters(), op=hvd.Sum)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), op=hvd.Sum,
                                   compression=comp or hvd.Compression.none)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def step(i):
        lo = (i * size + rank) * 32
        xb, yb = x[lo:lo + 32], y[lo:lo + 32]
        opt.zero_grad()
        (F.cross_entropy(model(xb), yb) / size).backward()
        opt.step()

    for i in range(2):  # warm-up: the first compressed step is float32 (scale calibration)
        step(i)
    hvd.barrier()
    tx0, rx0 = counters()
    start = time.perf_counter()
    for i in range(2, 2 + args.steps):
        step(i)
    seconds = (time.perf_counter() - start) / args.steps
    tx1, rx1 = counters()
    hvd.barrier()
    payload = comp.wire_stats().payload_bytes if comp else sum(4 * p.numel() for p in model.parameters())
    return {"tx_per_step": (tx1 - tx0) / args.steps, "rx_per_step": (rx1 - rx0) / args.steps,
            "payload_per_step": payload, "seconds_per_step": seconds}


result = {"rank": rank, "size": size, "fp32": run("fp32"), "uniform2": run("uniform2")}
Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
