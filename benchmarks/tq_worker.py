"""One time-to-quality run: train the Austen LSTM language model data-parallel with one compressor
until the validation perplexity reaches ``--target`` (or ``--max-steps`` pass); one JSON per rank.

Run by ``benchmarks.time_to_quality`` on the emulated cluster: Horovod compressors under horovodrun
across the nodes, the DDP peers (``workloads.tasks.DDP_COMPRESSORS``: PowerSGD at rank 4/8, the
fp16 hook, a bfloat16 hook, plain DDP) with one process per node started by ``ip netns exec``. Training is
the LSTM example's: the non-overlapping 35-token windows of the training split, shuffled per epoch
from the seed, 20 per rank and step; SGD at lr 20 with the gradient norm clipped at 0.25 after the
exchange. The clock counts training steps only: every ``--eval-every`` steps the ranks stop it,
score the first ``--eval-tokens`` validation tokens (each rank a share of the windows, the summed
losses allreduced) and start it again, so every backend is charged the same for evaluation
(nothing).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hvd_gradq.exchange.timings import summarize
from workloads.tasks import BENCH_COMPRESSORS, COMPRESSORS, DDP_COMPRESSORS, TASKS, compressor_name, make_optimizer

LSTM = TASKS["lstm"]
#: model sizes: the study's (4.8M parameters) and the step-time benchmarks' (11.4M)
SIZES = {"study": {"emb": 128, "hidden": 256}, "bench": {"emb": 256, "hidden": 512}}
BPTT = 35


class LMData:
    """The training windows (shuffled per epoch from the seed) and the held-out windows."""

    def __init__(self, seed: int, batch_size: int, eval_tokens: int) -> None:
        data = LSTM.data(10_000)
        self.train, self.batch_size, self.seed = data["train"], batch_size, seed
        self.starts = torch.arange(0, len(self.train) - BPTT - 1, BPTT)
        valid = data["valid"][:eval_tokens] if eval_tokens else data["valid"]
        self.valid = valid
        self.valid_starts = torch.arange(0, len(valid) - BPTT - 1, BPTT)
        self._order: tuple[int, torch.Tensor] | None = None

    def windows(self, ids: torch.Tensor, at: torch.Tensor):
        seq = ids[at.unsqueeze(1) + torch.arange(BPTT + 1)]
        return seq[:, :-1], seq[:, 1:]

    def steps_per_epoch(self, size: int) -> int:
        return len(self.starts) // (self.batch_size * size)

    def batch(self, step: int, rank: int, size: int):
        epoch, within = divmod(step, self.steps_per_epoch(size))
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._order = (epoch, self.starts[torch.randperm(len(self.starts), generator=gen)])
        i = (within * size + rank) * self.batch_size
        return self.windows(self.train, self._order[1][i:i + self.batch_size])

    def perplexity(self, model, rank: int, size: int, allreduce_sum) -> float:
        """exp of the mean token cross-entropy over the held-out windows (rank r scores every
        size-th window; the sums are allreduced)."""
        sums = torch.zeros(2, dtype=torch.float64)
        model.eval()
        with torch.no_grad():
            mine = self.valid_starts[rank::size]
            for i in range(0, len(mine), 64):
                x, y = self.windows(self.valid, mine[i:i + 64])
                logits = model(x)
                sums[0] += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                 reduction="sum"))
                sums[1] += y.numel()
        model.train()
        total = allreduce_sum(sums)
        return math.exp(float(total[0] / total[1]))


def _bf16_hook(world: int, bucket):
    """A DDP communication hook that sends the bucket in bfloat16: divide by the number of ranks,
    cast, allreduce (gloo), cast back into the bucket."""
    import torch.distributed as dist

    flat = bucket.buffer()
    sent = flat.div(world).to(torch.bfloat16)
    done = dist.all_reduce(sent, async_op=True).get_future()

    def unpack(fut):
        flat.copy_(fut.value()[0])
        return flat

    return done.then(unpack)


def _ddp(args, model):
    """(network, allreduce_sum, finish) of a DDP peer: gloo across the nodes, one bucket (PowerSGD's
    chained collectives of different buckets cannot interleave), the row's hook."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
    from torch.nn.parallel import DistributedDataParallel

    from benchmarks.ddp_worker import gloo_group

    if args.rank is None or args.world is None or not args.master:
        raise SystemExit(f"--compressor {args.compressor} needs --rank, --world and --master")
    allreduce_sum, finish = gloo_group(args.rank, args.world, args.master)
    c = COMPRESSORS[args.compressor]
    net = DistributedDataParallel(model, bucket_cap_mb=args.ddp_bucket_mb)
    if c.hook == "powersgd":
        state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=c.rank,
                                       start_powerSGD_iter=args.start_iter)
        net.register_comm_hook(state, powersgd.powerSGD_hook)
    elif c.hook == "fp16":
        net.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif c.hook == "bf16":  # torch's bf16_compress_hook refuses to run without CUDA/NCCL (gloo sums bfloat16)
        net.register_comm_hook(args.world, _bf16_hook)
    return net, allreduce_sum, finish


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compressor", type=compressor_name, choices=[*BENCH_COMPRESSORS, *DDP_COMPRESSORS],
                    required=True, help="a name of workloads.tasks")
    ap.add_argument("--size", choices=list(SIZES), default="study",
                    help="the LSTM: the study's (emb 128, hidden 256: 4.8M parameters) or the step-time "
                         "benchmarks' (emb 256, hidden 512: 11.4M)")
    ap.add_argument("--target", type=float, default=0.0, help="validation perplexity to reach (0: run --max-steps)")
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-tokens", type=int, default=20_000, help="validation tokens scored (0: all)")
    ap.add_argument("--batch-size", type=int, default=20, help="35-token windows per rank and step")
    ap.add_argument("--lr", type=float, default=20.0)
    ap.add_argument("--clip", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="directory for rank<i>.json")
    ap.add_argument("--rank", type=int, help="DDP: this process's rank")
    ap.add_argument("--world", type=int, help="DDP: number of processes")
    ap.add_argument("--master", help="DDP: address:port of rank 0")
    ap.add_argument("--start-iter", type=int, default=10, help="PowerSGD: compressed from this step on")
    ap.add_argument("--ddp-bucket-mb", type=float, default=1000.0, help="DDP's bucket (default: one bucket)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = LMData(args.seed, args.batch_size, args.eval_tokens)
    model = LSTM.model(vocab=10_000, **SIZES[args.size])
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    ddp = COMPRESSORS[args.compressor].path == "ddp"
    coder = None  # hvd_gradq's compressor, on the Horovod rows
    if ddp:
        net, allreduce_sum, finish = _ddp(args, model)
        rank, size = args.rank, args.world
        loss_scale = 1.0  # DDP averages

        def exchange_and_step():
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
    else:
        import horovod.torch as hvd

        hvd.init()
        rank, size = hvd.rank(), hvd.size()
        net = model

        def loss_fn(logits, target):
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

        def probe_batch(_):
            gen = torch.Generator().manual_seed(args.seed + 1)
            return data.windows(data.train, data.starts[torch.randint(len(data.starts), (args.batch_size,),
                                                                      generator=gen)])

        opt, coder = make_optimizer(args.compressor, model, opt, probe_batch, loss_fn, max_grad_norm=args.clip)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        loss_scale = 1.0 / size  # op=Sum

        def allreduce_sum(t):
            return hvd.allreduce(t, op=hvd.Sum, name="tq_eval")

        def finish():
            pass

        def exchange_and_step():
            opt.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            with opt.skip_synchronize():
                opt.step()

    started = time.perf_counter()
    curve = [{"step": 0, "train_s": 0.0, "valid_ppl": data.perplexity(model, rank, size, allreduce_sum)}]
    train_s, losses, reached, diverged = 0.0, [], None, False
    for step in range(args.max_steps):
        x, y = data.batch(step, rank, size)
        t = time.perf_counter()
        opt.zero_grad()
        logits = net(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        (loss * loss_scale).backward()
        exchange_and_step()
        train_s += time.perf_counter() - t
        losses.append(float(loss.detach()))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
            ppl = data.perplexity(model, rank, size, allreduce_sum)
            curve.append({"step": step + 1, "train_s": train_s, "valid_ppl": ppl})
            if rank == 0:
                print(f"{args.compressor} step {step + 1}: {train_s:.1f} s, valid ppl {ppl:.2f}", flush=True)
            if not math.isfinite(ppl):
                diverged = True  # the same answer on every rank: the perplexity is allreduced
                break
            if args.target and ppl <= args.target:
                reached = curve[-1]
                break
    finish()
    result = {"compressor": args.compressor, "size": size, "rank": rank, "model_size": args.size,
              "parameters": sum(p.numel() for p in model.parameters()), "target": args.target,
              "reached": reached, "diverged": diverged, "curve": curve, "loss": losses, "steps": len(losses),
              "train_s": train_s, "wall_s": time.perf_counter() - started,
              "s_per_step": train_s / max(len(losses), 1), "eval_every": args.eval_every,
              "eval_tokens": args.eval_tokens, "batch_size": args.batch_size, "lr": args.lr, "clip": args.clip,
              "seed": args.seed}
    if coder is not None:  # hvd_gradq's compressor (stock or drop-in): bytes per step, placeholders included
        result["payload_per_step"] = coder.wire_stats().payload_bytes
        # where the steps went; not the first one, nor those after an evaluation (their clock runs from
        # the end of the step before, so they hold the evaluation)
        records = coder.step_timings()
        result["breakdown"] = summarize([r for i, r in enumerate(records) if i % args.eval_every])
        if coder.allocator is not None:
            result["allocation"] = coder.allocation_overhead()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
