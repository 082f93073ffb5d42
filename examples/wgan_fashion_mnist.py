"""Distributed WGAN-GP on Fashion-MNIST with QODA and layer-wise quantization (the experiment of
the layer-wise quantization paper, offline and small).

    python examples/wgan_fashion_mnist.py --workers 4 --compressor alq --bits 4 --level-groups type
    launch/hvdrun -np 2 -H localhost:2 .venv/bin/python examples/wgan_fashion_mnist.py --compressor alq ...

The generator and the critic are two players of one game; every step each worker computes both
players' gradients of their own losses at the current point (``workloads.gan.game_losses``) in one
backward pass, the gradients are exchanged once (``hvd_gradq.DistributedOptimizer`` with the
chosen codec, or Horovod's own for ``none``/``fp16``; ``--workers N`` simulates N workers in one
process), and ``hvd_gradq.QODA`` steps both players, one parameter group (and adaptive step size)
each (``--optimizer adam`` for the usual WGAN-GP Adam instead). ``--level-groups type`` fits one
ALQ/AMQ level set per layer type (conv, linear, bias) instead of one per layer (``layer``) or one
for all (``global``: the global quantizer the paper compares with). Quality, scored every
``--eval-every`` steps with the clock stopped: the Frechet distance between generated and test
images in the features of the project's Fashion-MNIST classifier (``workloads.gan``; not Inception
features, so only comparable across runs of this example) and the critic's Wasserstein estimate
on held-out images. ``--samples`` writes a grid of generated images (PNG); ``--log-json`` the log.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # workloads (models, data)

import hvd_gradq
from workloads.datasets import fashion_mnist
from workloads.gan import (
    LATENT,
    GANGame,
    feature_net,
    features,
    frechet_distance,
    game_losses,
    save_grid,
    to_gan_range,
)

COMPRESSORS = ("none", "fp16", *hvd_gradq.CODECS)


def arguments(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=0, help="simulate this many workers in one process (0: a job)")
    p.add_argument("--compressor", default="alq", choices=COMPRESSORS)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--level-groups", default="type", choices=["layer", "type", "global"],
                   help="alq/amq: one fitted level set per layer, per layer type, or one for all")
    p.add_argument("--refit-every", type=int, default=50, help="alq/amq: steps between level fits")
    p.add_argument("--min-elements", type=int, default=1024, help="layers smaller than this go as float32")
    p.add_argument("--optimizer", default="qoda", choices=["qoda", "adam"])
    p.add_argument("--lr", type=float, default=None, help="QODA: 0.05 (the scale of its step sizes); Adam: 1e-4")
    p.add_argument("--width", type=int, default=64, help="channels of the first layers of both players")
    p.add_argument("--batch-size", type=int, default=64, help="per worker")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", default="", help="write a PNG grid of 64 generated images here (rank 0)")
    p.add_argument("--log-json", default="", help="write the JSON log here (rank 0)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "eval_every", "eval_samples", "width", "threads", "bits"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        raise SystemExit("--workers must be >= 0 (0: a real Horovod job)")
    if args.workers and args.compressor == "fp16":
        raise SystemExit("--compressor fp16 is Horovod's own compression: run it under horovodrun (no --workers)")
    if args.workers and int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("HOROVOD_SIZE", "1"))) > 1:
        raise SystemExit("--workers N simulates N workers in one process; do not launch it with horovodrun")
    if args.lr is None:
        args.lr = 0.05 if args.optimizer == "qoda" else 1e-4
    return args


def main(argv=None) -> dict:
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    players = GANGame(args.width)
    groups = [{"params": list(players.gen.parameters())}, {"params": list(players.critic.parameters())}]
    base = hvd_gradq.QODA(groups, lr=args.lr) if args.optimizer == "qoda" else \
        torch.optim.Adam(groups, lr=args.lr, betas=(0.5, 0.9))
    named = list(players.named_parameters())
    coding = {}
    if args.compressor not in ("none", "fp16"):
        coding = {"codec": args.compressor, "bits": args.bits, "min_elements": args.min_elements,
                  "level_groups": hvd_gradq.layer_types(players) if args.level_groups == "type" else args.level_groups}
        if args.compressor in ("alq", "amq"):
            coding["refit_levels"] = args.refit_every
    if args.workers:
        rank, size, hvd = 0, args.workers, None
        opt = hvd_gradq.SimulatedWorkers(base, named, size, **(coding or {"codec": None}))
    else:
        import horovod.torch as hvd

        hvd.init()
        rank, size = hvd.rank(), hvd.size()
        hvd.broadcast_parameters(players.state_dict(), root_rank=0)
        if coding:
            opt = hvd_gradq.DistributedOptimizer(base, named_parameters=named, op=hvd.Average, **coding)
        else:
            compression = hvd.Compression.fp16 if args.compressor == "fp16" else hvd.Compression.none
            opt = hvd.DistributedOptimizer(base, named_parameters=named, compression=compression, op=hvd.Average)
    x_train, _ = fashion_mnist("train")
    x_train = to_gan_range(x_train)
    x_test, _ = fashion_mnist("test")
    x_test = to_gan_range(x_test[:args.eval_samples])
    net = feature_net() if rank == 0 else None
    real_features = features(net, x_test) if rank == 0 else None
    fixed_z = torch.randn(max(64, args.eval_samples), LATENT, generator=torch.Generator().manual_seed(12345))
    log = {"example": "wgan_fashion_mnist", "command": " ".join(sys.argv), "args": vars(args),
           "mode": "simulated" if args.workers else "horovod", "workers": size,
           "parameters": {"gen": sum(p.numel() for p in players.gen.parameters()),
                          "critic": sum(p.numel() for p in players.critic.parameters())},
           "steps": [], "evals": []}
    wall = 0.0

    def batch(step: int, worker: int):
        """Worker ``worker``'s images, latent codes and gradient-penalty draws at ``step`` (the same
        in a job and in the simulation)."""
        i = ((step * size + worker) * args.batch_size) % (len(x_train) - args.batch_size)
        g = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 4096 + worker)
        return x_train[i:i + args.batch_size], torch.randn(args.batch_size, LATENT, generator=g), g

    def evaluate(step: int) -> None:
        if rank != 0:
            return
        with torch.no_grad():
            fake = players.gen(fixed_z[:args.eval_samples])
            held = x_test[:512]
            w = float(players.critic(held).mean() - players.critic(fake[:512]).mean())
        fid = frechet_distance(real_features, features(net, fake))
        log["evals"].append({"step": step, "fid": fid, "wasserstein": w, "wall": wall})
        print(f"step {step}: frechet distance {fid:.3f}, wasserstein {w:.4f}, {wall:.1f} s", flush=True)

    for step in range(args.steps):
        start = time.perf_counter()
        opt.zero_grad()
        figures = []
        for worker in ([*range(size)] if args.workers else [rank]):
            real, z, g = batch(step, worker)
            loss, fig = game_losses(players.gen, players.critic, real, z, generator=g)
            (opt.backward(loss) if args.workers else loss.backward())
            figures.append(fig)
        opt.step()
        wall += time.perf_counter() - start
        if rank == 0:
            rec = {k: sum(f[k] for f in figures) / len(figures) for k in figures[0]}
            log["steps"].append({"step": step, **rec})
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evaluate(step + 1)
    if rank == 0:
        if hasattr(opt, "payload_bytes"):
            log["payload_bytes"] = list(opt.payload_bytes())
        level_fit = getattr(opt, "gradient_exchange", None) or (opt.exchanges[0] if args.workers and coding else None)
        if level_fit is not None:
            log["level_fit"] = level_fit.level_fit
        log["summary"] = {"final_fid": log["evals"][-1]["fid"], "wall": wall, "steps": args.steps}
        if args.samples:
            with torch.no_grad():
                save_grid(players.gen(fixed_z[:64]), args.samples)
        if args.log_json:
            Path(args.log_json).write_text(json.dumps(log, indent=1))
    return log


if __name__ == "__main__":
    main()
