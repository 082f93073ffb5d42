"""One soak job (run under horovodrun by ``benchmarks.soak``): many steps of
``hvd_gradq.DistributedOptimizer`` with the codebook changing every few steps.

The model mixes float32, float64 and float16 layers and one layer too small to code (float32
path). Every layer's transport is drawn at random (same seed on every rank) from those its codec
allows; rank 0's allocator runs every ``--interval`` steps with a budget drawn at random, so bits
(0 included) and the codebook version keep moving. Per step every rank records a digest of its
codebook; every ``--sample-every`` steps its resident memory, open file descriptors and threads.
At the end the ranks compare codebook digests and parameter digests; each writes rank<i>.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
import zlib
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

import hvd_gradq
from workloads.datasets import fashion_mnist


class MixedMLP(torch.nn.Module):
    """784 -> 96 (float32) -> 64 (float64) -> 48 (float16) -> 10 (float32). (Horovod 0.28 has no bfloat16.)"""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 96)
        self.fc2 = torch.nn.Linear(96, 64).double()
        self.fc3 = torch.nn.Linear(64, 48).half()
        self.head = torch.nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x.double()))
        x = F.relu(self.fc3(x.half()))
        return self.head(x.float())


def _usage() -> dict:
    status = Path("/proc/self/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir("/proc/self/fd"))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--interval", type=int, default=3, help="the allocator runs every this many steps")
    ap.add_argument("--sample-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rank, size = hvd.rank(), hvd.size()
    x_all, y_all = fashion_mnist("test")
    model = MixedMLP()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    shared = random.Random(args.seed)  # same draws on every rank
    names = [n for n, _ in model.named_parameters()]
    transports = {n: shared.choice(["allreduce", "allgather", "two_phase", "auto"]) for n in names}
    budgets = random.Random(args.seed + 1)  # drawn on rank 0 only (only rank 0 allocates)

    def probe_batches():
        return [(x_all[:64], y_all[:64])]

    allocator = hvd_gradq.Allocator(3.0, metric="mse", solver="greedy", options=(0, 2, 3, 4, 6, 8),
                                    probe=hvd_gradq.LossProbe(model, F.cross_entropy, probe_batches))
    opt = hvd_gradq.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9), named_parameters=model.named_parameters(),
        codec="shared_scale", bits=4, min_elements=64, transport={n: t for n, t in transports.items()}, op=hvd.Sum,
        allocator=allocator, trigger=hvd_gradq.Trigger("interval", interval=args.interval))
    digests, samples, losses = [], [], []
    started = time.perf_counter()
    for step in range(args.steps):
        if rank == 0:
            allocator.budget = budgets.choice([0.5, 1.0, 2.0, 3.0, 4.0, 6.0])
        i = ((step * size + rank) * 32) % (len(x_all) - 32)
        opt.zero_grad()
        loss = F.cross_entropy(model(x_all[i:i + 32]), y_all[i:i + 32])
        (loss / size).backward()
        opt.step()
        losses.append(float(loss))
        rows = sorted((c.name, c.bits, c.transport, c.codec) for c in opt.codebook)
        digests.append(zlib.crc32(json.dumps([opt.codebook.version, rows]).encode()))
        if step % args.sample_every == 0 or step + 1 == args.steps:
            samples.append({"step": step, **_usage()})
    seconds = time.perf_counter() - started
    all_digests = hvd.allgather_object(digests, name="soak.digests")
    h = hashlib.sha256()
    for _, p in sorted(model.named_parameters()):
        h.update(p.detach().float().numpy().tobytes())
    param_digests = hvd.allgather_object(h.hexdigest(), name="soak.params")
    overhead = opt.allocation_overhead()
    result = {
        "rank": rank, "size": size, "steps": args.steps, "seconds": seconds, "interval": args.interval,
        "codebook_versions": opt.codebook.version, "allocations": overhead["allocations"],
        "codebook_disagreements": sum(1 for s in range(args.steps) if len({d[s] for d in all_digests}) > 1),
        "param_digests_equal": len(set(param_digests)) == 1,
        "bits_seen": sorted({b for e in opt.allocation_events for b in e.bits.values()}),
        "transports": transports, "dtypes": {n: str(p.dtype) for n, p in model.named_parameters()},
        "plans": {p.name: [p.bits, p.transport] for p in opt.layer_plans()},
        "first_loss": losses[0], "last_loss": sum(losses[-20:]) / min(20, len(losses)),
        "finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
        "samples": samples,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
