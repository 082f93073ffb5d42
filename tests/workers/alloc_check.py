"""Worker for tests/test_allocation.py: trigger + allocator on rank 0 + broadcast, under horovodrun.

Trains a small CNN on Fashion-MNIST with hvd_gradq.DistributedOptimizer(allocator=..., trigger=...)
and records, per step and rank: the codebook version, a digest of the codebook (bits, transport,
codec per layer), the step's loss, and the allocation events. ``--fail`` makes rank 0's allocation
raise, to check that every rank ends with the error instead of waiting in the broadcast.
"""
import argparse
import json
import zlib
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

import hvd_gradq
from hvd_gradq.horovod.channel import channel_name
from workloads.datasets import fashion_mnist
from workloads.models import FashionCNN

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--steps", type=int, default=12)
ap.add_argument("--metric", default="lad")
ap.add_argument("--solver", default="lagrangian")
ap.add_argument("--trigger", default="interval")
ap.add_argument("--codec", default="shared_scale")
ap.add_argument("--transport", default="auto")
ap.add_argument("--fail", action="store_true")
ap.add_argument("--spread-check", action="store_true",
                help="after training: the allocation with the LAD table spread over the ranks against rank 0 alone")
args = ap.parse_args()

hvd.init()
torch.set_num_threads(1)
torch.manual_seed(0)
rank, size = hvd.rank(), hvd.size()
x_all, y_all = fashion_mnist("test")
model = FashionCNN(width=8)
hvd.broadcast_parameters(model.state_dict(), root_rank=0)


def batch(step, r, n=32):
    i = ((step * size + r) * n) % (len(x_all) - n)
    return x_all[i:i + n], y_all[i:i + n]


probe = hvd_gradq.LossProbe(model, F.cross_entropy, lambda: [batch(1000 + k, 0, 64) for k in range(2)])
allocator = hvd_gradq.Allocator(1e9 if args.fail else 2.5, metric=args.metric, solver=args.solver,
                                options=(0, 2, 3, 4, 6, 8), probe=probe)
if args.fail:
    allocator.budget = -1.0  # passes construction, fails inside allocate() on rank 0
trigger = (hvd_gradq.Trigger("interval", interval=4) if args.trigger == "interval"
           else hvd_gradq.Trigger(tau=0.999, k_min=3))
opt = hvd_gradq.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                     named_parameters=model.named_parameters(), codec=args.codec, bits=4,
                                     transport=args.transport, allocator=allocator, trigger=trigger, min_elements=512)


def codebook_digest():
    rows = sorted((c.name, c.bits, c.transport, c.codec) for c in opt.codebook)
    return zlib.crc32(json.dumps(rows).encode())


steps = []
out = Path(args.out) / f"rank{rank}.json"
try:
    for step in range(args.steps):
        xb, yb = batch(step, rank)
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        steps.append({"version": opt.codebook.version, "digest": codebook_digest(), "loss": float(loss.detach()),
                      "bits": {c.name: c.bits for c in opt.codebook if c.transport != "float32"}})
except Exception as e:
    out.write_text(json.dumps({"rank": rank, "error": type(e).__name__, "message": str(e), "step": len(steps)}))
    raise
spread = None
if args.spread_check:  # the same inputs: fixed probe batches, the quantizer of one step, the same weights
    from hvd_gradq.exchange.reallocation import decide_bits, decide_bits_spread
    from hvd_gradq.horovod.channel import HorovodChannel
    ex = opt.gradient_exchange
    layers = {n: dict(model.named_parameters())[n] for n in ex.allocatable}
    payload = decide_bits_spread(allocator, ex, layers, 99, 0.05, HorovodChannel(hvd.global_process_set))
    if rank == 0:
        spread_table = allocator.last_curves.distortion.tolist()
        alone = decide_bits(allocator, ex, layers, 99, 0.05)
        spread = {"spread": payload, "alone": alone, "spread_table": spread_table,
                  "alone_table": allocator.last_curves.distortion.tolist()}
params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
digest = hvd.allgather(torch.tensor([[float(params.double().sum()), float(params.double().abs().sum())]]),
                       name="check.params").tolist()
out.write_text(json.dumps({
    "rank": rank, "steps": steps, "param_digests": digest,
    "events": [{"step": e.step, "version": e.version, "summary": e.summary, "forwards": e.forwards,
                "seconds": e.seconds} for e in opt.allocation_events],
    "overhead": opt.allocation_overhead(), "summary": opt.transport_summary(),
    "channel": channel_name(hvd.global_process_set), "spread_check": spread,
}))
