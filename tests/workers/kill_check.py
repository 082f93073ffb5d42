"""Worker for tests/test_failures.py: trains until killed. Every rank writes its PID once it has
taken --ready steps; the rank-0 allocator fires every other step, so a codebook broadcast over
mpi4py (--mpi) or Horovod (--gloo) is often pending when a peer dies."""
import argparse
import os
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

import hvd_gradq
from workloads.datasets import fashion_mnist
from workloads.models import FashionCNN

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--ready", type=int, default=3)
ap.add_argument("--steps", type=int, default=100_000)
args = ap.parse_args()

hvd.init()
torch.set_num_threads(1)
torch.manual_seed(0)
rank, size = hvd.rank(), hvd.size()
x_all, y_all = fashion_mnist("test")
model = FashionCNN(width=8)
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
probe = hvd_gradq.LossProbe(model, F.cross_entropy, lambda: [(x_all[:32], y_all[:32])])
opt = hvd_gradq.DistributedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.05), named_parameters=model.named_parameters(), codec="shared_scale",
    bits=4, min_elements=512, transport={"features.[34].*": "two_phase"},
    allocator=hvd_gradq.Allocator(3.0, metric="mse", solver="greedy", options=(2, 3, 4, 8), probe=probe),
    trigger=hvd_gradq.Trigger("interval", interval=2))
for step in range(args.steps):
    i = ((step * size + rank) * 32) % (len(x_all) - 32)
    opt.zero_grad()
    (F.cross_entropy(model(x_all[i:i + 32]), y_all[i:i + 32]) / size).backward()
    opt.step()
    if step + 1 == args.ready:
        Path(args.out, f"pid{rank}").write_text(str(os.getpid()))
