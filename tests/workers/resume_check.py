"""Worker for tests/test_checkpoint.py: checkpoint and resume of the compression state, under horovodrun.

--phase full     train k1 + k2 steps; after k1 steps every rank joins compression_state_dict() and
                 rank 0 saves model, optimizer and compression state to --ckpt.
--phase resume   build everything afresh, load --ckpt on every rank, train the k2 remaining steps.
Both write rank<i>.json: a digest of the parameters (bytes), the losses, the codebook version and
the allocation steps. A resumed run must end with the same digest as the uninterrupted one.
--phase resume with another -np or --width: the load must fail with StateMismatchError on every
rank (the message is written out), or, with --reset, train on from a fresh compression state.
"""
import argparse
import hashlib
import json
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

import hvd_gradq
from workloads.datasets import fashion_mnist
from workloads.models import FashionCNN

ap = argparse.ArgumentParser()
ap.add_argument("--phase", choices=["full", "resume"], required=True)
ap.add_argument("--config", choices=["lanes", "gather", "jointsq", "stock", "stock_alloc", "lowrank", "lowrank16"],
                required=True)
ap.add_argument("--ckpt", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--k1", type=int, default=5)
ap.add_argument("--k2", type=int, default=5)
ap.add_argument("--width", type=int, default=8)
ap.add_argument("--reset", action="store_true")
args = ap.parse_args()

hvd.init()
torch.set_num_threads(1)
torch.manual_seed(0)
rank, size = hvd.rank(), hvd.size()
x_all, y_all = fashion_mnist("test")
model = FashionCNN(width=args.width)
hvd.broadcast_parameters(model.state_dict(), root_rank=0)


def batch(step, r, n=32):
    i = ((step * size + r) * n) % (len(x_all) - n)
    return x_all[i:i + n], y_all[i:i + n]


base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
named = list(model.named_parameters())
if args.config == "stock":
    comp = hvd_gradq.UniformCompressor(bits=2, named_parameters=named, op=hvd.Sum, min_elements=512)
    opt = hvd.DistributedOptimizer(base, named_parameters=named, compression=comp, op=hvd.Sum)
    state_of, load_into = comp.compression_state_dict, comp.load_compression_state_dict
elif args.config == "stock_alloc":  # Horovod's optimizer + hvd_gradq.Compressor: the allocator moving bits and
    # low-rank ranks over the rotated code on lanes and allgather, one two-phase layer
    probe = hvd_gradq.LossProbe(model, F.cross_entropy, lambda: [batch(1000, 0, 64)])
    comp = hvd_gradq.Compressor(
        named, op=hvd.Sum, min_elements=512, codec="rotated", bits=4, lr=base,
        transport={"features.3.*": "two_phase", "features.1.*": "allgather"},
        allocator=hvd_gradq.Allocator(2.5, metric="lad_first_order", solver="greedy", options=(0, 2, 3, 4, 8),
                                      ranks=(1, 2), probe=probe),
        trigger=hvd_gradq.Trigger("interval", interval=3))
    opt = hvd.DistributedOptimizer(base, named_parameters=named, compression=comp, op=hvd.Sum)
    state_of, load_into = comp.compression_state_dict, comp.load_compression_state_dict
else:
    kw = {}
    if args.config == "lanes":  # uniform lanes (shared scales) + float32 layers + allocator moving bits
        probe = hvd_gradq.LossProbe(model, F.cross_entropy, lambda: [batch(1000, 0, 64)])
        kw = dict(codec="shared_scale", bits=4, allocator=hvd_gradq.Allocator(
            2.5, metric="lad_first_order", solver="greedy", options=(0, 2, 3, 4, 6, 8), probe=probe),
            trigger=hvd_gradq.Trigger("interval", interval=3))
    elif args.config == "gather":  # qsgd with error feedback over allgather and two-phase, one 0-bit layer
        kw = dict(codec="qsgd", bits={"features.1.*": 0, ".*": 3}, error_feedback=True,
                  transport={"features.[34].*": "two_phase", "features.[12].*|classifier.*": "allgather"})
    elif args.config == "lowrank":  # PowerSGD factors (warm-start Q, residuals) on the matrices
        kw = dict(codec="lowrank", rank=2, bits=3)
    elif args.config == "lowrank16":  # the same with Q in float16
        kw = dict(codec="lowrank", rank=2, bits=3, factors="float16")
    else:
        kw = dict(codec="jointsq", ratio=20, transport="two_phase")
    opt = hvd_gradq.DistributedOptimizer(base, named_parameters=named, op=hvd.Sum, min_elements=512, **kw)
    state_of, load_into = opt.compression_state_dict, opt.load_compression_state_dict

result = {"rank": rank, "size": size, "losses": [], "allocations": []}
start = 0
if args.phase == "resume":
    ckpt = torch.load(args.ckpt, weights_only=False)
    try:  # before the model, whose own load would refuse another width first
        load_into(ckpt["compression"], reset=args.reset)
    except hvd_gradq.StateMismatchError as e:
        result["error"] = str(e)
        Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
        raise
    if args.width == 8:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    start = ckpt["step"]

for step in range(start, args.k1 + args.k2):
    x, y = batch(step, rank)
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    (loss / size).backward()
    opt.step()
    result["losses"].append(loss.item())
    if args.phase == "full" and step + 1 == args.k1:
        state = state_of()  # every rank: a collective
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "compression": state,
                        "step": step + 1}, args.ckpt)
        hvd.barrier()

h = hashlib.sha256()
for _, p in sorted(model.named_parameters()):
    h.update(p.detach().numpy().tobytes())
result["digest"] = h.hexdigest()
if args.config != "stock":
    owner = comp if args.config == "stock_alloc" else opt
    result["version"] = owner.codebook.version
    result["allocations"] = [e.step for e in owner.allocation_events]
    result["bits"] = {p.name: [p.bits, p.rank, p.transport] for p in owner.layer_plans()}
Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
