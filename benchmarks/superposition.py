"""Linear superposition check (LAD paper, Fig. 1) and first-order vs exact LAD, on the demo model.

    .venv/bin/python -m benchmarks.superposition --out docs/results/superposition

For the Fashion-MNIST CNN at a few points of plain SGD training, for pairs of layers and bit
widths 2..8 (QSGDinf codes, bucket 512): the joint loss change of coding both layers,
D_ij = L(W_orig + dW_i + dW_j) - L(W_orig), against the sum of the individual changes D_i + D_j
(Eq. 4-6), averaged over K batches. Writes ``superposition.png`` (scatter, y = x line, R^2 about
that line), ``results.json`` (the points) and ``SUPERPOSITION.md`` (figures, the Spearman
rank correlation between first-order LAD (Eq. 7-8) and exact LAD (Eq. 2-3) per stage, the
exact command and the commit). Single process, CPU; about a minute.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import provenance
from hvd_gradq import LossProbe
from hvd_gradq.alloc import distortion as D
from hvd_gradq.alloc.distortion import LossEvaluator
from hvd_gradq.codecs import DitherSource, make_codec
from workloads.tasks import TASKS

CNN = TASKS["cnn"]

BITS = (2, 3, 4, 5, 6, 7, 8)


def _ranks(v: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(a.ravel()), _ranks(b.ravel())
    return float(np.corrcoef(ra, rb)[0, 1])


def r2_identity(x: np.ndarray, y: np.ndarray) -> float:
    """R^2 of y against the line y = x."""
    ss_res = float(((y - x) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def measure(probe: LossProbe, params: dict, pairs: list[tuple[str, str]], lr: float, seed: int):
    """Joint vs summed loss changes for ``pairs`` at every bit width, and the rank correlation of
    first-order with exact LAD, at the probe model's current weights."""
    grads, _ = D.probe_gradients(probe, params)
    codes = {(n, b): make_codec("qsgdinf", b, bucket_size=512).roundtrip(g, DitherSource([seed, b]))
             for n, g in grads.items() for b in BITS}
    ev = LossEvaluator(probe, params)
    batches = probe.get_batches()
    points = []
    with torch.no_grad():
        base = ev.stepped(grads, lr)
        ref = [ev.loss(base, bt, i) for i, bt in enumerate(batches)]

        def delta(coded: dict[str, int]) -> float:  # signed loss change, Eq. 6
            w = dict(base)
            for n, b in coded.items():
                m = ev.model_name[n]
                w[m] = ev.weights[m] - lr * codes[(n, b)].view_as(ev.weights[m])
            return float(np.mean([ev.loss(w, bt, i) - r for i, (bt, r) in enumerate(zip(batches, ref))]))

        single = {(n, b): delta({n: b}) for n in {a for p in pairs for a in p} for b in BITS}
        for a, c in pairs:
            for b in BITS:
                points.append({"a": a, "b": c, "bits": b, "sum": single[(a, b)] + single[(c, b)],
                               "joint": delta({a: b, c: b})})

    def quantize(n: str, b: int, g: torch.Tensor) -> torch.Tensor:
        return codes[(n, b)]

    exact, _ = D.lad_exact(probe, params, grads, quantize, BITS, lr)
    first, _ = D.lad_first_order(probe, params, grads, quantize, BITS, lr)
    rho = {"spearman_all": spearman(exact, first), "spearman_layers_at_2_bits": spearman(exact[:, 0], first[:, 0])}
    return points, rho


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/results/superposition")
    ap.add_argument("--stages", default="0,100,400", help="SGD steps of training at which to measure")
    ap.add_argument("--batches", type=int, default=4, help="K batches of 64 per measurement")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    provenance.add_argument(ap)
    args = ap.parse_args(argv)
    out = Path(args.out)
    commit = provenance.commit(args.allow_dirty, outputs=[out])
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    x, y = CNN.data("train")
    model = CNN.model()
    sgd = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    params = {n: p for n, p in model.named_parameters() if p.numel() >= 1024}
    names = list(params)
    pairs = [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))][:6]
    stages = [int(s) for s in args.stages.split(",")]
    gen = torch.Generator().manual_seed(args.seed + 7)
    points, rho = [], {}
    started = time.perf_counter()
    trained = 0
    for stage in stages:
        while trained < stage:  # plain single-process SGD to reach this point of training
            idx = torch.randint(len(x), (64,), generator=gen)
            sgd.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            sgd.step()
            trained += 1
        idx = torch.randint(len(x), (args.batches, 64), generator=gen)
        probe = LossProbe(model, F.cross_entropy, [(x[i], y[i]) for i in idx])
        pts, rho[stage] = measure(probe, params, pairs, args.lr, args.seed)
        points += [{"stage": stage, **p} for p in pts]
    xs = np.array([p["sum"] for p in points])
    ys = np.array([p["joint"] for p in points])
    r2 = r2_identity(xs, ys)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for stage in stages:
        sel = [p for p in points if p["stage"] == stage]
        ax.scatter([p["sum"] for p in sel], [p["joint"] for p in sel], s=14, label=f"after {stage} steps")
    lo, hi = float(min(xs.min(), ys.min())), float(max(xs.max(), ys.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlabel("D_i + D_j (sum of single-layer loss changes)")
    ax.set_ylabel("D_ij (both layers coded)")
    ax.set_title(f"FashionCNN, QSGDinf 2-8 bits: R^2 about y = x = {r2:.3f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "superposition.png", dpi=120)
    seconds = time.perf_counter() - started
    result = {"r2_identity": r2, "points": points, "spearman_first_order_vs_exact": rho, "pairs": pairs,
              "seconds": seconds, "args": vars(args), "commit": commit}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Linear superposition and first-order LAD (measured)",
        "",
        "Command: `.venv/bin/python -m benchmarks.superposition "
        f"--out {args.out} --stages {args.stages} --batches {args.batches} --lr {args.lr} --seed {args.seed}` "
        f"({seconds:.0f} s, 1 thread; commit {commit}).",
        "",
        f"FashionCNN on Fashion-MNIST, {len(pairs)} layer pairs x bits {BITS[0]}-{BITS[-1]} x {len(stages)} stages of "
        f"plain SGD (lr {args.lr}), K = {args.batches} batches of 64, QSGDinf codes with 512-element buckets.",
        "",
        f"- Joint vs summed loss change: **R^2 = {r2:.4f}** about the line y = x ({len(points)} points); "
        "see `superposition.png`.",
        "- First-order LAD (Eq. 7-8) against exact LAD (Eq. 2-3), Spearman rank correlation:",
        "",
        "| SGD steps | all (layer, bits) entries | layers at 2 bits |",
        "|---|---|---|",
        *[f"| {s} | {v['spearman_all']:.3f} | {v['spearman_layers_at_2_bits']:.3f} |" for s, v in rho.items()],
        "",
        "![superposition](superposition.png)",
        "",
    ]
    (out / "SUPERPOSITION.md").write_text("\n".join(lines))
    print(f"R^2 about y = x: {r2:.4f} over {len(points)} points; first-order vs exact LAD: "
          + ", ".join(f"step {s}: rho {v['spearman_all']:.3f}" for s, v in rho.items()))
    print(f"wrote {out / 'superposition.png'}, {out / 'results.json'}, {out / 'SUPERPOSITION.md'}")
    return result


if __name__ == "__main__":
    main()
