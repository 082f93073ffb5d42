"""One benchmark cell: train a model for warm-up + timed steps with one compressor; one JSON per rank.

Run by ``hvd_gradq.bench.bandwidth`` on the emulated cluster (horovodrun across namespaces), or
alone (one process: the compute-only step time, no communication). Counts the bytes the node's
``eth0`` put on the link during the timed steps (kernel counters) and the payload bytes handed to
Horovod per step.

Compressors: none, fp16 (Horovod's), uniform2/4/8 (``UniformCompressor``, op=Sum), lad2/lad3
(``hvd_gradq.DistributedOptimizer``, uniform codec, exact-LAD Lagrangian allocation at budget 2/3,
similarity trigger), jointsq20/jointsq100 (drop-in, JointSQ at 20x/100x), qsgd4 (drop-in).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

import hvd_gradq
from hvd_gradq.datasets import austen_lm, fashion_mnist
from hvd_gradq.models import FashionCNN, LSTMLanguageModel

COMPRESSORS = ("none", "fp16", "uniform2", "uniform4", "uniform8", "lad2", "lad3", "jointsq20", "jointsq100", "qsgd4")


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


def make_task(model_name: str, rank: int, size: int):
    """(model, batch(step) -> (inputs, targets), loss_fn)."""
    if model_name == "cnn":
        x, y = fashion_mnist("train")
        model = FashionCNN()

        def batch(step: int):
            lo = ((step * size + rank) * 64) % (len(x) - 64)
            return x[lo:lo + 64], y[lo:lo + 64]

        return model, batch, F.cross_entropy
    data = austen_lm()["train"]
    model = LSTMLanguageModel(vocab=10_000)

    def batch(step: int):  # 20 sequences of 35 tokens per rank
        lo = ((step * size + rank) * 20 * 36) % (len(data) - 20 * 36)
        seq = data[lo:lo + 20 * 36].view(20, 36)
        return seq[:, :-1], seq[:, 1:]

    def lm_loss(logits, target):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    return model, batch, lm_loss


def make_optimizer(c: str, model, opt, batch, loss_fn):
    """Wrap ``opt`` for compressor ``c`` (op=Sum: callers divide the loss by the number of workers).
    Returns (distributed optimizer, the UniformCompressor or None)."""
    named = list(model.named_parameters())
    comp = None
    if c in ("none", "fp16", "uniform2", "uniform4", "uniform8"):
        if c.startswith("uniform"):
            comp = hvd_gradq.UniformCompressor(bits=int(c[7:]), named_parameters=named, op=hvd.Sum)
        compression = comp or (hvd.Compression.fp16 if c == "fp16" else hvd.Compression.none)
        return hvd.DistributedOptimizer(opt, named_parameters=named, compression=compression, op=hvd.Sum), comp
    kw: dict = {}
    if c.startswith("lad"):
        probe = hvd_gradq.LossProbe(model, loss_fn, lambda: [batch(10_000)])
        kw = {"codec": "uniform", "bits": 4, "allocator": hvd_gradq.Allocator(
            float(c[3:]), metric="lad", options=(0, 2, 3, 4, 6, 8), probe=probe),
            "trigger": hvd_gradq.Trigger(tau=0.95, k_min=20)}
    elif c.startswith("jointsq"):
        kw = {"codec": "jointsq", "ratio": float(c[7:])}
    elif c == "qsgd4":
        kw = {"codec": "qsgd", "bits": 4}
    else:
        raise ValueError(f"unknown compressor {c!r}; choose one of {', '.join(COMPRESSORS)}")
    return hvd_gradq.DistributedOptimizer(opt, named_parameters=named, op=hvd.Sum, **kw), None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["cnn", "lstm"], required=True)
    ap.add_argument("--compressor", choices=COMPRESSORS, required=True)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", required=True, help="directory for rank<i>.json")
    args = ap.parse_args(argv)
    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rank, size = hvd.rank(), hvd.size()
    model, batch, loss_fn = make_task(args.model, rank, size)
    opt, comp = make_optimizer(args.compressor, model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                               batch, loss_fn)
    c = args.compressor
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def step(i: int) -> float:
        inputs, target = batch(i)
        opt.zero_grad()
        loss = loss_fn(model(inputs), target) / size
        loss.backward()
        opt.step()
        return float(loss.detach()) * size

    times, losses, (tx, rx) = timed_steps(step, args.warmup, args.steps, hvd.barrier if size > 1 else None)
    ring = 2 * (size - 1) / size  # what a ring allreduce sends per rank, per payload byte
    if comp is not None:
        payload = comp.wire_stats().payload_bytes
        predicted_sent = ring * payload
    elif hasattr(opt, "layer_plans"):
        payload = sum(p.payload_bytes for p in opt.layer_plans())
        predicted_sent = sum(p.predicted.sent_bytes for p in opt.layer_plans())
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
    if hasattr(opt, "allocation_overhead") and getattr(opt, "allocator", None) is not None:
        result["allocation"] = opt.allocation_overhead()
        result["bits"] = {p.name: p.bits for p in opt.layer_plans()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
