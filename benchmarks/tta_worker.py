"""One time-to-accuracy run: train the Fashion-MNIST CNN data-parallel with one compressor until the
test accuracy reaches ``--target`` (or ``--max-steps``); one JSON per rank.

Run by ``benchmarks.time_to_accuracy`` on the emulated cluster: Horovod compressors under
horovodrun across the nodes, ``powersgd`` as PyTorch DDP (gloo) with the PowerSGD hook, one process
per node started with ``ip netns exec``. The clock counts training steps only: every
``--eval-every`` steps the ranks stop it, score the whole test set (each rank a shard, counts
summed) and start it again, so both backends are charged the same for evaluation (nothing).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from workloads.tasks import BENCH_COMPRESSORS, TASKS, compressor_name, make_optimizer

CNN = TASKS["cnn"]


def _accuracy(model, x, y, rank: int, size: int, allreduce_sum) -> float:
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        xs, ys = x[rank::size], y[rank::size]
        for i in range(0, len(xs), 1000):
            counts[0] += (model(xs[i:i + 1000]).argmax(1) == ys[i:i + 1000]).sum().item()
        counts[1] = len(xs)
    total = allreduce_sum(counts)
    model.train()
    return float(total[0] / total[1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compressor", type=compressor_name, choices=[*BENCH_COMPRESSORS, "powersgd"], required=True,
                    help="a name of workloads.tasks (old names uniform2/4/8 still accepted)")
    ap.add_argument("--target", type=float, default=0.85, help="test accuracy to reach")
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=64, help="per worker")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="directory for rank<i>.json")
    ap.add_argument("--rank", type=int, help="powersgd: this process's rank")
    ap.add_argument("--world", type=int, help="powersgd: number of processes")
    ap.add_argument("--master", help="powersgd: address:port of rank 0")
    ap.add_argument("--powersgd-rank", type=int, default=4)
    ap.add_argument("--start-iter", type=int, default=4, help="powersgd: compressed from this step on")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    x_train, y_train = CNN.data("train")
    x_test, y_test = CNN.data("test")
    model = CNN.model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)

    if args.compressor == "powersgd":
        if args.rank is None or args.world is None or not args.master:
            raise SystemExit("--compressor powersgd needs --rank, --world and --master")
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
        from torch.nn.parallel import DistributedDataParallel

        from benchmarks.ddp_worker import gloo_group

        allreduce_sum, finish = gloo_group(args.rank, args.world, args.master)
        rank, size = args.rank, args.world
        net = DistributedDataParallel(model)
        net.register_comm_hook(powersgd.PowerSGDState(process_group=None,
                                                      matrix_approximation_rank=args.powersgd_rank,
                                                      start_powerSGD_iter=args.start_iter), powersgd.powerSGD_hook)
        loss_scale = 1.0  # DDP averages
    else:
        import horovod.torch as hvd

        hvd.init()
        rank, size = hvd.rank(), hvd.size()
        net = model

        def probe_batch(_):
            g = torch.Generator().manual_seed(args.seed + 1)
            idx = torch.randint(len(x_train), (args.batch_size,), generator=g)
            return x_train[idx], y_train[idx]

        opt, _ = make_optimizer(args.compressor, model, opt, probe_batch, F.cross_entropy)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        loss_scale = 1.0 / size  # op=Sum

        def allreduce_sum(t):
            return hvd.allreduce(t, op=hvd.Sum, name="tta_eval")

        def finish():
            pass

    gen = torch.Generator().manual_seed(args.seed)
    per_epoch = len(x_train) // (args.batch_size * size)
    curve = [{"step": 0, "train_s": 0.0, "accuracy": _accuracy(model, x_test, y_test, rank, size, allreduce_sum)}]
    train_s, losses, reached = 0.0, [], None
    order = None
    for step in range(args.max_steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(x_train), generator=gen)[rank::size]
        idx = order[(step % per_epoch) * args.batch_size:(step % per_epoch + 1) * args.batch_size]
        t = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
        (loss * loss_scale).backward()
        opt.step()
        train_s += time.perf_counter() - t
        losses.append(float(loss.detach()))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
            acc = _accuracy(model, x_test, y_test, rank, size, allreduce_sum)
            curve.append({"step": step + 1, "train_s": train_s, "accuracy": acc})
            if rank == 0:
                print(f"{args.compressor} step {step + 1}: {train_s:.1f} s, accuracy {acc:.4f}", flush=True)
            if acc >= args.target:
                reached = curve[-1]
                break
    finish()
    result = {"compressor": args.compressor, "size": size, "rank": rank, "target": args.target,
              "reached": reached, "curve": curve, "loss": losses, "steps": len(losses), "train_s": train_s,
              "s_per_step": train_s / max(len(losses), 1), "eval_every": args.eval_every,
              "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    if hasattr(opt, "allocation_overhead") and getattr(opt, "allocator", None) is not None:
        result["allocation"] = opt.allocation_overhead()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
