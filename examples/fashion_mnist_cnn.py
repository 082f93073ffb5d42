"""Fashion-MNIST CNN trained data-parallel with Horovod and hvd_gradq's compressor.

    horovodrun -np 2 -H localhost:2 python examples/fashion_mnist_cnn.py --bits 2

Prints a progress bar, test accuracy after every epoch and the measured wire reduction (bytes
handed to Horovod's allreduce per step, against float32). Data: Debian's dataset-fashion-mnist.
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from tqdm import tqdm

import hvd_gradq
from hvd_gradq.datasets import fashion_mnist
from hvd_gradq.models import FashionCNN
from hvd_gradq.optimizer import CODECS

#: codecs run through hvd_gradq.DistributedOptimizer
DROPIN = ["gradq-uniform", *[c for c in CODECS if c != "uniform"]]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressor", choices=["uniform", "fp16", "none", *DROPIN], default="uniform",
                   help="uniform/fp16/none: the stock hvd.DistributedOptimizer with that compression; "
                        "any other: hvd_gradq.DistributedOptimizer with that codec ('gradq-uniform': the "
                        "uniform codec, which may also ride allreduce)")
    p.add_argument("--bits", type=int, default=2, help="bit width of every compressed layer")
    p.add_argument("--ratio", type=float, default=20.0, help="jointsq: compression ratio against float32")
    p.add_argument("--error-feedback", choices=["auto", "on", "off"], default="auto",
                   help="hvd_gradq.DistributedOptimizer: keep what coding drops (auto: for biased codecs)")
    p.add_argument("--allocator", default="none", choices=["none", "lad", "lad_first_order", "mse", "ampa"],
                   help="hvd_gradq.DistributedOptimizer: re-decide per-layer bits on rank 0 with this metric")
    p.add_argument("--solver", default="lagrangian", choices=["lagrangian", "greedy", "uniform", "mckp_dp", "ampa"])
    p.add_argument("--budget", type=float, default=2.0, help="allocator: average bits per element")
    p.add_argument("--trigger", default="similarity", choices=["similarity", "interval", "static"])
    p.add_argument("--tau", type=float, default=0.95)
    p.add_argument("--k-min", type=int, default=20)
    p.add_argument("--interval", type=int, default=50)
    p.add_argument("--transport", default="auto", choices=["auto", "allreduce", "allgather", "two_phase"],
                   help="hvd_gradq.DistributedOptimizer: per-layer transport (auto: the cost model picks)")
    p.add_argument("--op", choices=["sum", "average"], default="sum",
                   help="allreduce op given to both the optimizer and the compressor")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per worker")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (0: full epoch)")
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N training images (0: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summary-json", default="", help="rank 0 writes a JSON summary here")
    p.add_argument("--checkpoint", default="", help="rank 0 saves model, optimizer and compression state here "
                                                    "after every epoch")
    p.add_argument("--resume", action="store_true", help="start from --checkpoint (same number of workers)")
    p.add_argument("--reset-compression", action="store_true",
                   help="with --resume: start the compression state afresh (e.g. another number of workers)")
    return p.parse_args(argv)


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy over the whole test set; each rank scores its shard, counts are summed."""
    model.eval()
    shard = slice(hvd.rank(), None, hvd.size())
    correct = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        xs, ys = x[shard], y[shard]
        for i in range(0, len(xs), 1000):
            pred = model(xs[i:i + 1000]).argmax(1)
            correct[0] += (pred == ys[i:i + 1000]).sum().item()
        correct[1] = len(xs)
    total = hvd.allreduce(correct, op=hvd.Sum, name="eval_counts")
    model.train()
    return float(total[0] / total[1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    hvd.init()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rank, size = hvd.rank(), hvd.size()

    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    if args.train_limit:
        x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]

    model = FashionCNN()
    # op=Sum sums the gradients over workers (Horovod's meaning); the loss is divided by N below so
    # that the update is the same as with op=Average. Sum lets UniformCompressor use int64 lanes.
    op = hvd.Sum if args.op == "sum" else hvd.Average
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    dropin = args.compressor in DROPIN
    if args.allocator != "none" and not dropin:
        raise SystemExit(f"--allocator needs a hvd_gradq.DistributedOptimizer codec, e.g. --compressor gradq-uniform "
                         f"or one of {DROPIN}")
    compression = None
    allocation = {}
    if args.allocator != "none":
        probe_gen = torch.Generator().manual_seed(args.seed + 1)

        def probe_batches():  # rank 0 draws K = 2 fresh training batches per allocation
            idx = torch.randint(len(x_train), (2, args.batch_size), generator=probe_gen)
            return [(x_train[i], y_train[i]) for i in idx]

        allocation = {
            "allocator": hvd_gradq.Allocator(args.budget, metric=args.allocator, solver=args.solver,
                                             options=(0, 2, 3, 4, 5, 6, 8),
                                             probe=hvd_gradq.LossProbe(model, F.cross_entropy, probe_batches)),
            "trigger": hvd_gradq.Trigger(args.trigger, tau=args.tau, k_min=args.k_min, interval=args.interval),
        }
        if rank == 0:
            logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if dropin:
        codec = "uniform" if args.compressor == "gradq-uniform" else args.compressor
        opt = hvd_gradq.DistributedOptimizer(opt, named_parameters=model.named_parameters(), op=op, codec=codec,
                                             bits=args.bits, ratio=args.ratio, transport=args.transport,
                                             error_feedback={"auto": "auto", "on": True, "off": False}[
                                                 args.error_feedback], **allocation)
    else:
        if args.compressor == "uniform":
            compression = hvd_gradq.UniformCompressor(bits=args.bits, named_parameters=model.named_parameters(),
                                                      op=op)
        elif args.compressor == "fp16":
            compression = hvd.Compression.fp16
        else:
            compression = hvd.Compression.none
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=compression,
                                       op=op)

    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"FashionCNN ({n_params} parameters), {size} workers, compressor={args.compressor}"
              f"{f' bits={args.bits}' if args.compressor not in ('fp16', 'none') else ''}, "
              f"op={'sum' if op == hvd.Sum else 'average'}", flush=True)
        if dropin:
            for plan in opt.layer_plans():
                print(f"  {plan.name}: {plan.numel} elements, {plan.bits} bits, {plan.transport} "
                      f"(predicted {plan.predicted.payload_bytes} B, {plan.predicted.seconds * 1e3:.3f} ms)")

    gen = torch.Generator().manual_seed(args.seed)
    compression_state = (opt if dropin else compression if args.compressor == "uniform" else None)
    first_epoch = 0
    if args.resume:
        if not args.checkpoint:
            raise SystemExit("--resume needs --checkpoint PATH")
        ckpt = torch.load(args.checkpoint, weights_only=False)  # every rank reads the same file
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if compression_state is not None:
            compression_state.load_compression_state_dict(ckpt["compression"], reset=args.reset_compression)
        gen.set_state(ckpt["shuffle_rng"])
        if allocation:
            probe_gen.set_state(ckpt["probe_rng"])
        first_epoch = ckpt["epoch"]
        if rank == 0:
            print(f"resumed from {args.checkpoint} after epoch {first_epoch}", flush=True)
    steps_per_epoch = len(x_train) // (args.batch_size * size)
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    history = []
    t0 = time.perf_counter()
    for epoch in range(first_epoch, args.epochs):
        order = torch.randperm(len(x_train), generator=gen)[rank::size]
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0,
                   dynamic_ncols=True, mininterval=2.0)
        for step in bar:
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            (loss / size if op == hvd.Sum else loss).backward()
            opt.step()
            if rank == 0 and step % 20 == 0:
                post = {"loss": f"{loss.item():.3f}"}
                if args.compressor == "uniform":
                    post["wire"] = f"{compression.wire_stats().bits_per_element:.2f} b/elem"
                elif dropin:
                    plans = opt.layer_plans()
                    sent, n_el = sum(p.payload_bytes for p in plans), sum(p.numel for p in plans)
                    post["wire"] = f"{8 * sent / n_el:.2f} b/elem"
                    kinds = {}
                    for plan in plans:
                        kinds[plan.transport] = kinds.get(plan.transport, 0) + 1
                    post["layers"] = " ".join(f"{k}:{v}" for k, v in sorted(kinds.items()))
                bar.set_postfix(post)
        acc = evaluate(model, x_test, y_test)
        history.append(acc)
        if rank == 0:
            print(f"epoch {epoch + 1}: test accuracy {acc:.4f}", flush=True)
        if args.checkpoint:  # the compression state is collective (every rank's residuals); rank 0 saves
            state = compression_state.compression_state_dict() if compression_state is not None else None
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "compression": state,
                            "epoch": epoch + 1, "shuffle_rng": gen.get_state(),
                            "probe_rng": probe_gen.get_state() if allocation else None}, args.checkpoint)

    summary = {"workers": size, "compressor": args.compressor, "bits": args.bits, "op": args.op,
               "test_accuracy": history, "seconds": time.perf_counter() - t0}
    if dropin:
        plans = opt.layer_plans()
        sent, fp32 = sum(p.payload_bytes for p in plans), sum(4 * p.numel for p in plans)
        summary.update(payload_bytes_per_step=sent, fp32_bytes_per_step=fp32, wire_ratio=sent / fp32,
                       bits_per_element=8 * sent / (fp32 / 4),
                       transports={p.name: p.transport for p in plans})
        if allocation:
            summary["allocation"] = opt.allocation_overhead()
            summary["bits"] = {p.name: p.bits for p in plans}
        if rank == 0:
            print(f"wire per step: {opt.transport_summary()}", flush=True)
            print(f"wire reduction: {fp32 / sent:.1f}x fewer bytes than fp32 ({sent} vs {fp32} bytes per step)",
                  flush=True)
    if args.compressor == "uniform":
        w = compression.wire_stats()
        summary.update(payload_bytes_per_step=w.payload_bytes, fp32_bytes_per_step=w.fp32_bytes,
                       bits_per_element=w.bits_per_element, wire_ratio=w.ratio)
        if rank == 0:
            print(f"wire per step: {w}", flush=True)
            print(f"wire reduction: {1 / w.ratio:.1f}x fewer bytes than fp32 "
                  f"({w.payload_bytes} vs {w.fp32_bytes} bytes per step)", flush=True)
    if rank == 0 and args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
