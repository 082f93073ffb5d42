"""Worker for tests/test_timings.py: runs under horovodrun, writes one JSON file per rank.

Every rank's forward sleeps ``--sleep`` seconds (known compute); on odd steps rank 1 sleeps
``--delay`` more before its backward, so that rank 0 waits for it in the collectives. Records the
optimizer's ``step_timings()`` next to this worker's own wall clock of each step (from the end of
one ``opt.step()`` to the end of the next); for the stock path the compressor's (whose steps end at
their last decompress, before Horovod's update).
"""
import argparse
import json
import time
from pathlib import Path

import horovod.torch as hvd
import torch
from torch import nn

import hvd_gradq

ap = argparse.ArgumentParser()
ap.add_argument("--codec", default="rotated")
ap.add_argument("--transport", default="auto")
ap.add_argument("--sleep", type=float, default=0.05)
ap.add_argument("--delay", type=float, default=0.25)
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--out", required=True)
args = ap.parse_args()

hvd.init()
torch.set_num_threads(1)
torch.manual_seed(0)
rank = hvd.rank()


class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(256, 512), nn.Linear(512, 64)

    def forward(self, x):
        time.sleep(args.sleep)
        return self.b(torch.relu(self.a(x)))


model = Slow()
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
out = {"rank": rank}
if args.codec == "stock":
    comp = hvd_gradq.UniformCompressor(bits=2, named_parameters=model.named_parameters(), op=hvd.Sum)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters(), compression=comp, op=hvd.Sum)
else:
    kw = {} if args.transport == "auto" else {"transport": args.transport}
    opt = hvd_gradq.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                         named_parameters=model.named_parameters(), codec=args.codec, bits=2,
                                         min_elements=16, **kw)
walls = []
prev = None
for step in range(args.steps):
    x = torch.randn(32, 256)
    opt.zero_grad()
    loss = model(x).square().mean()
    if rank == 1 and step % 2 == 1:
        time.sleep(args.delay)
    loss.backward()
    opt.step()
    now = time.perf_counter()
    if prev is not None:
        walls.append(now - prev)
    prev = now
out["walls"] = walls
coder = comp if args.codec == "stock" else opt
out["timings"] = coder.step_timings()
out["payload"] = coder.wire_stats().payload_bytes  # what the step handed to collectives, placeholders included
out["transports"] = sorted({p.transport for p in coder.layer_plans()})
Path(args.out, f"rank{rank}.json").write_text(json.dumps(out))
