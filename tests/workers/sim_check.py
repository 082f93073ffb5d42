"""Worker for tests/test_simulate.py: the real side. Under horovodrun, trains tests/sim_cases.py's
set-up for STEPS steps with hvd_gradq.DistributedOptimizer (op=Average) and saves, on rank 0, the
aggregated gradient of every step (after synchronize, before the update); every other rank saves
its own aggregates beside it (real_r{rank}.pt), which must be the same."""
import argparse
from pathlib import Path

import horovod.torch as hvd
import torch
from sim_cases import STEPS, flat_grads, setup  # tests/workers/sim_cases.py, next to this script

import hvd_gradq

ap = argparse.ArgumentParser()
ap.add_argument("--case", required=True)
ap.add_argument("--out", required=True)
args = ap.parse_args()

hvd.init()
torch.set_num_threads(1)
rank, size = hvd.rank(), hvd.size()
model, base, kw, micro_batch = setup(args.case)
opt = hvd_gradq.DistributedOptimizer(base, named_parameters=model.named_parameters(), op=hvd.Average, **kw)
aggregates = []
for step in range(STEPS):
    opt.zero_grad()
    x, y = micro_batch(step, rank, size)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.synchronize()
    aggregates.append(flat_grads(model).clone())
    with opt.skip_synchronize():
        opt.step()
if rank:
    torch.save(aggregates, Path(args.out) / f"real_r{rank}.pt")
else:
    torch.save({"aggregates": aggregates, "bits": {p.name: p.bits for p in opt.layer_plans()},
                "transports": {p.name: p.transport for p in opt.layer_plans()},
                "versions": [e.version for e in opt.allocation_events],
                "payload": [p.payload_bytes for p in opt.layer_plans()],
                "levels": {n: c.codec.levels.tolist() for n, c in opt.gradient_exchange.coders.items()
                           if kw["codec"] == "alq"},
                "level_fit": opt.gradient_exchange.level_fit}, Path(args.out) / "real.pt")
