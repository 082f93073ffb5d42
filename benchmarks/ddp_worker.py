"""The peer a user would pick instead: PyTorch DDP (gloo backend) with the PowerSGD communication
hook, on the same model, data and link as ``step_worker``. One process per node, started by
``benchmarks.bandwidth`` with ``ip netns exec``; writes rank<i>.json like ``step_worker``."""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.nn.parallel import DistributedDataParallel

from benchmarks.step_worker import timed_steps
from workloads.tasks import TASKS, bench_task


def gloo_group(rank: int, world: int, master: str):
    """Join the peers' gloo process group over the nodes' eth0; returns (allreduce_sum(t) -> t
    summed in place, finish() that meets every rank and tears the group down)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0")
    dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=rank, world_size=world)

    def allreduce_sum(t):
        dist.all_reduce(t)
        return t

    def finish():
        dist.barrier()  # no rank tears the group down under a peer still in its last collective
        dist.destroy_process_group()

    return allreduce_sum, finish


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=list(TASKS), required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--master", required=True, help="address:port of rank 0")
    ap.add_argument("--hook", choices=["none", "powersgd"], default="powersgd")
    ap.add_argument("--powersgd-rank", type=int, default=4)
    ap.add_argument("--start-iter", type=int, default=4, help="PowerSGD starts after DDP's bucket rebuild")
    ap.add_argument("--bucket-cap-mb", type=float, default=None,
                    help="DDP's bucket size (default: DDP's own, 25 MB; a value larger than the model makes one "
                         "bucket, so that PowerSGD's chained gloo collectives of different buckets cannot interleave)")
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.warmup <= args.start_iter:
        raise SystemExit("--warmup must exceed --start-iter so that the timed steps are compressed")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank, world_size=args.world)
    model, batch, loss_fn = bench_task(args.model, args.rank, args.world)
    ddp = DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
    if args.hook == "powersgd":
        state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=args.powersgd_rank,
                                       start_powerSGD_iter=args.start_iter)
        ddp.register_comm_hook(state, powersgd.powerSGD_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)

    def step(i: int) -> float:
        inputs, target = batch(i)
        opt.zero_grad()
        loss = loss_fn(ddp(inputs), target)
        loss.backward()
        opt.step()
        return float(loss.detach())

    times, losses, (tx, rx) = timed_steps(step, args.warmup, args.steps, dist.barrier)
    dist.barrier()
    dist.destroy_process_group()
    result = {"model": args.model, "compressor": f"ddp-{args.hook}", "size": args.world, "rank": args.rank,
              "params": sum(p.numel() for p in model.parameters()), "median_step_s": statistics.median(times),
              "step_s": times, "loss": losses, "tx_per_step": tx / args.steps,
              "rx_per_step": rx / args.steps, "payload_per_step": None,
              "fp32_bytes": 4 * sum(p.numel() for p in model.parameters()), "warmup": args.warmup, "steps": args.steps}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{args.rank}.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
