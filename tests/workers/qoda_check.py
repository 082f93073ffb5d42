"""Worker for tests/test_qoda.py: the bilinear game min_x max_y x^T A y with QODA under horovodrun,
through hvd_gradq.DistributedOptimizer (rotated codes, 4 bits) and through Horovod's own
DistributedOptimizer with fp16 compression. Each rank adds its own noise to the operator (zero
mean over the ranks). Writes rank{r}.json: start and end norms, a digest of the parameters."""
import argparse
import hashlib
import json
from pathlib import Path

import horovod.torch as hvd
import torch

import hvd_gradq

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
args = ap.parse_args()
hvd.init()
torch.set_num_threads(1)
rank, size = hvd.rank(), hvd.size()
d = 64
g = torch.Generator().manual_seed(0)
u, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
v, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
a = u @ torch.diag(torch.linspace(0.5, 1.0, d)) @ v.t()


def play(name: str) -> dict:
    torch.manual_seed(1)
    x, y = torch.nn.Parameter(torch.randn(d)), torch.nn.Parameter(torch.randn(d))
    base = hvd_gradq.QODA([x, y], lr=10.0)
    named = [("x", x), ("y", y)]
    if name == "dropin":
        opt = hvd_gradq.DistributedOptimizer(base, named_parameters=named, codec="rotated", bits=4, min_elements=32)
    else:
        opt = hvd.DistributedOptimizer(base, named_parameters=named, compression=hvd.Compression.fp16)
    start = float(torch.cat([x.detach(), y.detach()]).norm())
    noise_gen = torch.Generator().manual_seed(7)
    for _ in range(300):
        noise = torch.randn(size, 2, d, generator=noise_gen) * 0.05
        noise -= noise.mean(0)
        opt.zero_grad()
        loss = x @ (a @ y.detach()) - x.detach() @ (a @ y) + noise[rank, 0] @ x + noise[rank, 1] @ y
        loss.backward()
        opt.step()
    digest = hashlib.sha256(torch.cat([x.detach(), y.detach()]).numpy().tobytes()).hexdigest()
    return {"start": start, "end": float(torch.cat([x.detach(), y.detach()]).norm()), "digest": digest,
            "steps": base.param_groups[0]["steps"], "skipped": base.param_groups[0]["skipped"]}


result = {"dropin": play("dropin"), "horovod_fp16": play("horovod_fp16")}
Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
