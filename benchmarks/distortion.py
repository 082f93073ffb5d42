"""Distortion of every code on real gradients: ``python -m benchmarks.distortion``.

For the three example models (``cnn``, ``lstm``, ``transformer`` at the benchmarks' sizes), train
with plain SGD in float32 on one process and take the gradients of every layer at a few points of
training (and of the step before each, for the scales the lanes would hold). For every code and
bit width 1..8, the normalised MSE ||Q(g) - g||^2 / ||g||^2 of one coding, per layer, and over the
model size-weighted (sum_l n_l NMSE_l / sum_l n_l) and energy-weighted (sum ||Q(g)-g||^2 /
sum ||g||^2). Codes:

* ``lanes_shared_scale``: the unrotated lanes (one scale per layer: the previous step's max|g|,
  stochastic rounding), the stock path's codes before rotation;
* ``lanes_rotated``: the rotated lanes (per-block RMS of the previous step's gradient, nearest
  rounding), the stock path's codes now; ``lanes_rotated_oracle``: the same with this step's own
  block RMS (what a same-step scale exchange would give);
* ``rotated``, ``rotated_stochastic``: the gathered rotated code (each rank's own rotation key
  and block RMS; nearest / stochastic rounding), what ``codec="rotated"`` sends over allgather and
  two-phase;
* ``N=2 ...``: two ranks, the first batch and a second one at the same weights; the NMSE of the
  decoded mean against the true mean: the rotated lanes with this step's block scales (one clip
  per block from the ranks' mean block energy, the drop-in's default) and the gathered rotated code;
* every level codec (``qsgd``, ``qsgdinf``, ``natural``, ``nuqsgd``, ``terngrad``, ``alq``, ``amq``;
  bucket 1024, stochastic, ALQ/AMQ at their initial levels), without and with the rotation
  (``+rot``: the same codec on the rotated vector);
* ``alq``/``amq`` with fitted levels, 3-8 bits: fitted on rank 0's view, the previous step's
  gradients, then coding this step's, with one level set per layer (``fitted per layer``), per
  layer type (``fitted per type``, ``hvd_gradq.layer_types``: the layer-wise quantization
  paper's sequences) or one for all layers (``fitted global``), as ``Coding(level_groups=)`` does.

Side by side: the lower bound for unbiased b-bit codes, 1/(4^b - 1), and the figures reported
for EDEN-style rotated codes (0.133 / 0.036 / 0.0096 at 2 / 3 / 4 bits).
Writes ``results.json``, ``table.md`` and ``nmse.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks import provenance
from hvd_gradq.alloc.layer_types import layer_types
from hvd_gradq.bits import rotation
from hvd_gradq.bits.dither import DitherSource
from hvd_gradq.bits.lanes import lane_layout
from hvd_gradq.codecs import LEVEL_CODECS, make_codec
from hvd_gradq.codecs import rotated as rot
from hvd_gradq.codecs.levels import fit_level_groups
from hvd_gradq.codecs.shared_scale import dequantize_lanes, quantize_to_lanes
from hvd_gradq.settings import Coding
from workloads.tasks import bench_task

EDEN = {2: 0.133, 3: 0.036, 4: 0.0096}
#: SGD settings of the examples (lr, gradient clipping)
TRAIN = {"cnn": (0.05, None), "lstm": (20.0, 0.25), "transformer": (5.0, 0.25), "wgan": (0.01, None)}
GROUPINGS = ("layer", "type", "global")
BLOCK = 4096


def gradients(task: str, points: list[int]) -> tuple[dict[int, tuple[dict, dict, dict]], dict[str, str]]:
    """{step: (gradients at step - 1, gradients at step, a second batch's gradients at step)} of
    every layer, plain float32 SGD on the first batch (the second one stands for another rank's),
    and the layers' types."""
    torch.manual_seed(0)
    model, batch, loss_fn = bench_task(task, 0, 1)
    types = layer_types(model)
    lr, clip = TRAIN[task]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out, prev = {}, None
    for step in range(max(points) + 1):
        x, y = batch(step)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        grads = {n: p.grad.detach().reshape(-1).clone() for n, p in model.named_parameters() if p.grad is not None}
        if step in points:
            x2, y2 = batch(step + 50_000)  # a batch far from the trained ones, at the same weights
            opt.zero_grad()
            loss_fn(model(x2), y2).backward()
            other = {n: p.grad.detach().reshape(-1).clone() for n, p in model.named_parameters()
                     if p.grad is not None}
            out[step] = (prev, grads, other)
            for n, p in model.named_parameters():
                if p.grad is not None:
                    p.grad.copy_(grads[n].view_as(p.grad))
        prev = grads
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return out, types


def fitted_codes(method: str, bits: int, names: list[str], prev: dict, types: dict) -> dict:
    """{grouping: {layer: codec}}: ``method`` levels fitted to the previous step's gradients per
    layer, per layer type and for all layers (``Coding(level_groups=)``)."""
    out = {}
    for grouping in GROUPINGS:
        coding = Coding(codec=method, bits=bits, level_groups=types if grouping == "type" else grouping)
        codecs = {n: make_codec(method, bits, bucket_size=1024) for n in names}
        groups: dict[str, dict] = {}
        for n in names:
            groups.setdefault(coding.level_group(n), {})[n] = codecs[n]
        fit_level_groups(groups, prev)
        out[grouping] = codecs
    return out


def rotated_lanes(g: torch.Tensor, prev: torch.Tensor, bits: int, key: int) -> torch.Tensor:
    """One coding of ``g`` by the rotated lanes whose scales came from ``prev``'s blocks."""
    block = rotation.block_for(g.numel(), BLOCK)
    y = rotation.rotate(g, key, block)
    yp = rotation.rotate(prev, key, block)
    energy = rot.block_energy(yp, block)
    ref = math.sqrt(float(energy.sum()) / yp.numel()) or 1.0
    nxt = rot.rms_from_stats(rot.block_stats(energy, ref, block, 1), ref, 1)
    rms = torch.full((y.numel() // block,), ref, dtype=torch.float32) if nxt is None else nxt[1]
    clip = rot.clip_scales(rms, bits)
    layout = lane_layout(bits, 1, torch.int64)
    words = rot.quantize_blocks(y, clip, bits, layout)
    return rotation.unrotate(rot.dequantize_blocks(words, y.numel(), clip, bits, layout, 1), key, block, g.numel())


def rotated_lanes_pair(gs: list[torch.Tensor], bits: int, key: int) -> torch.Tensor:
    """The mean of ``gs`` (one gradient per rank) as the rotated lanes with this step's block scales
    decode it: one rotation and one clip per block for every rank, from the ranks' mean block energy."""
    n = gs[0].numel()
    block = rotation.block_for(n, BLOCK)
    ys = [rotation.rotate(g, key, block) for g in gs]
    rms = (sum(rot.block_energy(y, block) for y in ys) / (len(ys) * block)).sqrt()
    ref = float(rms.pow(2).mean().sqrt()) or 1.0  # the layer's RMS: the floor of a block's scale
    clip = rot.clip_scales(rms.clamp(min=ref * math.sqrt(rot.SCALE_FLOOR)).to(torch.float32), bits)
    layout = lane_layout(bits, len(gs), torch.int64)
    words = sum(rot.quantize_blocks(y, clip, bits, layout) for y in ys)
    mean = rot.dequantize_blocks(words, ys[0].numel(), clip, bits, layout, len(gs))
    return rotation.unrotate(mean, key, block, n)


def shared_scale_lanes(g: torch.Tensor, prev: torch.Tensor, bits: int, rng: DitherSource) -> torch.Tensor:
    s = float(prev.abs().max()) or 1.0
    layout = lane_layout(bits, 1, torch.int64)
    return dequantize_lanes(quantize_to_lanes(g, s, bits, layout, rng), g.numel(), s, bits, layout, 1)


def with_rotation(code, g: torch.Tensor, key: int) -> torch.Tensor:
    block = rotation.block_for(g.numel(), BLOCK)
    return rotation.unrotate(code(rotation.rotate(g, key, block)), key, block, g.numel())


def measure(task: str, step: int, prev: dict, grads: dict, other: dict, codecs: list[str], types: dict) -> list[dict]:
    rows = []
    rng = DitherSource(1)
    names = [n for n in grads if grads[n].numel() >= 1024 and float(grads[n].norm()) > 0]
    for bits in range(1, 9):
        rotated = make_codec("rotated", bits, rotation=BLOCK)
        rotated_st = make_codec("rotated", bits, rotation=BLOCK, rounding="stochastic")
        codes = {"lanes_shared_scale": lambda g, p, k, b=bits: shared_scale_lanes(g, p, b, rng),
                 "lanes_rotated": lambda g, p, k, b=bits: rotated_lanes(g, p, b, k),
                 "lanes_rotated_oracle": lambda g, p, k, b=bits: rotated_lanes(g, g, b, k),
                 "rotated": lambda g, p, k, c=rotated: c.roundtrip(g, rng),
                 "rotated_stochastic": lambda g, p, k, c=rotated_st: c.roundtrip(g, rng),
                 # two ranks (the second batch as the other rank), the mean against the true mean
                 "N=2 lanes_rotated_this_step": lambda g, p, k, b=bits: rotated_lanes_pair(list(g), b, k),
                 "N=2 rotated": lambda g, p, k, c=rotated: sum(c.roundtrip(x, rng) for x in g) / len(g)}
        for name in codecs:
            try:
                codec = make_codec(name, bits, bucket_size=1024)
            except ValueError:
                continue  # e.g. terngrad at other than 2 bits
            codes[name] = lambda g, p, k, c=codec: c.roundtrip(g, rng)
            codes[name + "+rot"] = lambda g, p, k, c=codec: with_rotation(lambda y: c.roundtrip(y, rng), g, k)
        for method in ("alq", "amq"):
            if bits < 3 or method not in codecs:
                continue
            for grouping, fitted in fitted_codes(method, bits, names, prev, types).items():
                codes[f"{method} fitted {'global' if grouping == 'global' else 'per ' + grouping}"] = \
                    lambda g, p, k, fitted=fitted: fitted[k[1]].roundtrip(g, rng)
        for code_name, code in codes.items():
            per_layer, err, energy, size = {}, 0.0, 0.0, 0
            for i, n in enumerate(names):
                g = grads[n]
                if code_name.startswith("N=2"):
                    pair = (grads[n], other[n])
                    q, g = code(pair, None, 1_000_003 * (i + 1) + step), (pair[0] + pair[1]) / 2
                elif " fitted " in code_name:
                    q = code(g, prev[n], (1_000_003 * (i + 1) + step, n))
                else:
                    q = code(g, prev[n], 1_000_003 * (i + 1) + step)
                e, s = float(((q - g) ** 2).sum()), float((g**2).sum())
                per_layer[n] = e / s
                err, energy, size = err + e, energy + s, size + g.numel()
            weighted = sum(grads[n].numel() * per_layer[n] for n in names) / size
            rows.append({"task": task, "step": step, "code": code_name, "bits": bits, "size_weighted": weighted,
                         "energy_weighted": err / energy, "per_layer": per_layer})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: per task, the size-weighted NMSE at the last point of training, 1..8 bits."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        last = max(r["step"] for r in rows if r["task"] == task)
        sel = [r for r in rows if r["task"] == task and r["step"] == last]
        out += [f"### {task}, gradients of step {last} (size-weighted NMSE; in brackets: / EDEN figure)", "",
                "| code | " + " | ".join(f"{b} bits" for b in range(1, 9)) + " |",
                "|---|" + "---|" * 8]
        for code in dict.fromkeys(r["code"] for r in sel):
            cells = []
            for b in range(1, 9):
                hit = [r for r in sel if r["code"] == code and r["bits"] == b]
                if not hit:
                    cells.append("")
                    continue
                v = hit[0]["size_weighted"]
                cells.append(f"{v:.3g}" + (f" ({v / EDEN[b]:.2g}x)" if b in EDEN else ""))
            out.append(f"| {code} | " + " | ".join(cells) + " |")
        out.append("| unbiased bound 1/(4^b-1) | " + " | ".join(f"{1 / (4**b - 1):.3g}" for b in range(1, 9)) + " |")
        out.append("| EDEN (reported) | " + " | ".join(f"{EDEN[b]}" if b in EDEN else "" for b in range(1, 9)) + " |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    show = ["lanes_shared_scale", "lanes_rotated", "N=2 lanes_rotated_this_step", "rotated", "qsgdinf",
            "qsgdinf+rot", "qsgd", "natural"]
    for ax, task in zip(axes[0], tasks):
        last = max(r["step"] for r in rows if r["task"] == task)
        for code in show:
            pts = sorted((r["bits"], r["size_weighted"]) for r in rows
                         if r["task"] == task and r["step"] == last and r["code"] == code)
            if pts:
                ax.semilogy(*zip(*pts), marker="o", label=code)
        ax.semilogy(range(1, 9), [1 / (4**b - 1) for b in range(1, 9)], "k--", label="1/(4^b-1)")
        ax.semilogy(list(EDEN), list(EDEN.values()), "k*", markersize=10, label="EDEN (reported)")
        ax.set_title(f"{task}, step {last}")
        ax.set_xlabel("bits per element")
        ax.set_ylabel("size-weighted NMSE")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="cnn,lstm,transformer")
    ap.add_argument("--points", default="5,100", help="training steps whose gradients are coded")
    ap.add_argument("--codecs", default=",".join(sorted(LEVEL_CODECS)))
    ap.add_argument("--out", default="docs/results/distortion")
    provenance.add_argument(ap)
    args = ap.parse_args()
    out = Path(args.out)
    commit = provenance.commit(args.allow_dirty, outputs=[out])
    torch.set_num_threads(1)
    points = [int(p) for p in args.points.split(",")]
    rows, started = [], time.time()
    for task in args.tasks.split(","):
        points_grads, types = gradients(task, points)
        for step, (prev, grads, other) in points_grads.items():
            rows += measure(task, step, prev, grads, other, args.codecs.split(","), types)
            print(f"{task} step {step}: done ({time.time() - started:.0f} s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"commit": commit, "points": points, "rows": rows}, indent=1))
    (out / "table.md").write_text(f"# Distortion on real gradients (commit {commit})\n\n"
                                  "Made by `python -m benchmarks.distortion`; see its docstring.\n\n" + table(rows))
    plot(rows, out / "nmse.png")
    print(table(rows))


if __name__ == "__main__":
    main()
