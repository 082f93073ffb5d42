"""Where the step time goes when the wire is nearly free: loopback, side by side in one run.

    .venv/bin/python -m benchmarks.overhead --model lstm --np 2 \\
        --compressors none,fp16,stock2,rotated2 --rounds 2 --out docs/results/overhead

Runs ``benchmarks.step_worker`` under ``horovodrun -np N -H localhost:N`` (no shaping: bytes cost
almost nothing, so what a compressed step costs over an uncompressed one is the coding path), and
the same model in one process with no communication at all. The rows are interleaved: every round
runs every row once, in an order that alternates between rounds, and a row's figure is the median
over rounds of its cells' median step (the slowest rank's); this machine is shared and noisy, so
read the ratios, which are taken within one run. Per row: seconds per step, the ratio to the
uncompressed Horovod step and to the no-communication step, bytes handed to the collectives, and
the mean breakdown of rank 0's timed steps (``opt.step_timings()`` for the drop-in; for the stock
optimizer the worker times the compressor's encode/decode and Horovod's synchronize). Writes
results.json, OVERHEAD.md and breakdown.png into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import procs, provenance
from hvd_gradq.bits import native
from hvd_gradq.exchange.timings import PHASES
from workloads.tasks import TASKS, compressor_name

COMPUTE_ONLY = "no communication (1 process)"


def run_cell(model: str, compressor: str, size: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        worker = ["-m", "benchmarks.step_worker", "--model", model, "--compressor", compressor,
                  "--warmup", str(args.warmup), "--steps", str(args.steps), "--out", tmp]
        if compressor == COMPUTE_ONLY:
            cmd, env = [sys.executable, *worker[:5], "none", *worker[6:]], dict(procs.environment(),
                                                                                 OMP_NUM_THREADS="1")
            size = 1
        else:
            cmd, env = procs.horovodrun_command(worker, np=size)
        res = procs.run(cmd, timeout=args.cell_timeout, env=env)
        if res.returncode != 0 or res.timed_out:
            return {"compressor": compressor, "error": res.output[-1500:]}
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(size)]
    head = ranks[0]
    return {"compressor": compressor, "step_s": max(r["median_step_s"] for r in ranks),
            "payload": head["payload_per_step"], "breakdown": head.get("breakdown"), "isa": head.get("isa")}


def summarize_rows(cells: list[dict], order: list[str]) -> list[dict]:
    rows = []
    for name in order:
        ok = [c for c in cells if c["compressor"] == name and "error" not in c]
        if not ok:
            err = next((c["error"] for c in cells if c["compressor"] == name), "not run")
            rows.append({"compressor": name, "error": err})
            continue
        parts = [c["breakdown"] for c in ok if c.get("breakdown")]
        breakdown = {k: statistics.fmean(p[k] for p in parts) for k in (*PHASES, "step")} if parts else None
        rows.append({"compressor": name, "step_s": statistics.median(c["step_s"] for c in ok),
                     "cells": [c["step_s"] for c in ok], "payload": ok[0]["payload"], "breakdown": breakdown})
    base = next((r for r in rows if r["compressor"] == "none" and "error" not in r), None)
    alone = next((r for r in rows if r["compressor"] == COMPUTE_ONLY and "error" not in r), None)
    for r in rows:
        if "error" in r:
            continue
        r["vs_none"] = r["step_s"] / base["step_s"] if base else None
        r["vs_no_comm"] = r["step_s"] / alone["step_s"] if alone else None
    return rows


def plot_breakdown(rows: list[dict], path: Path, title: str) -> None:
    """Stacked bars of the mean step breakdown per row (rows without one: the step time alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(1.3 * len(ok) + 4.5, 4.2))
    names = [r["compressor"] for r in ok]
    bottom = [0.0] * len(ok)
    for phase in PHASES:
        vals = [(r["breakdown"] or {}).get(phase, r["step_s"] if phase == "compute" and not r["breakdown"] else 0.0)
                for r in ok]
        ax.bar(names, vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.scatter(names, [r["step_s"] for r in ok], color="k", marker="_", s=400, zorder=3, label="median step")
    ax.set_ylabel("s per step (rank 0, mean of timed steps)")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def redraw(out: Path) -> None:
    """Draw ``out``/breakdown.png again from ``out``/results.json."""
    data = json.loads((out / "results.json").read_text())
    args = data["args"]
    plot_breakdown(data["rows"], out / "breakdown.png", f"{args['model']}, loopback, np = {args['np']}")


def write_report(rows: list[dict], args, out: Path, commit: str, seconds: float) -> None:
    (out / "results.json").write_text(json.dumps({"rows": rows, "args": vars(args), "commit": commit,
                                                  "seconds": seconds, "isa": native.isa()}, indent=1))
    cmd = ".venv/bin/python -m benchmarks.overhead " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "allow_dirty")
    lines = [f"# Step overhead on loopback: {args.model}, np = {args.np}", "",
             f"Command: `{cmd}` ({seconds / 60:.0f} min; commit {commit}; kernels: {native.isa()} path).", "",
             f"np = {args.np} processes on this 2-core machine, 1 thread each, loopback (no shaping); "
             f"{args.rounds} interleaved rounds, each cell {args.steps} timed steps after {args.warmup} warm-up "
             "steps; step: the median over rounds of the slowest rank's median step. Breakdown: rank 0's mean "
             "seconds per timed step (compute = forward, backward and everything outside the optimizer; for the "
             "stock optimizer, wait includes Horovod's own bookkeeping in synchronize).", "",
             "| row | step s | vs none | vs no communication | bytes/step | compute | encode | decode | wait "
             "| allocation | update | other |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            last = r["error"].strip().splitlines()[-1][:80] if r["error"].strip() else "failed"
            lines.append(f"| {r['compressor']} | failed: {last} | | | | | | | | | | |")
            continue
        b = r["breakdown"] or {}
        cols = " | ".join(f"{b[k]:.3f}" if k in b else "-" for k in PHASES)
        vs = " | ".join("-" if r[k] is None else f"{r[k]:.2f}" for k in ("vs_none", "vs_no_comm"))
        lines.append(f"| {r['compressor']} | {r['step_s']:.3f} | {vs} | {r['payload']} | {cols} |")
    lines += ["", "![breakdown](breakdown.png)", ""]
    (out / "OVERHEAD.md").write_text("\n".join(lines))
    plot_breakdown(rows, out / "breakdown.png", f"{args.model}, loopback, np = {args.np}")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(TASKS), default="lstm")
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--compressors", default="none,fp16,stock2,rotated2,stock4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cell-timeout", type=float, default=600)
    ap.add_argument("--out", default="docs/results/overhead")
    ap.add_argument("--redraw", action="store_true", help="only draw --out/breakdown.png again from its results.json")
    provenance.add_argument(ap)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.redraw:
        redraw(out)
        return json.loads((out / "results.json").read_text())["rows"]
    commit = provenance.commit(args.allow_dirty, outputs=[out])
    order = [compressor_name(c) for c in args.compressors.split(",") if c] + [COMPUTE_ONLY]
    cells, t0 = [], time.time()
    for k in range(args.rounds):
        for name in (order if k % 2 == 0 else order[::-1]):
            cell = run_cell(args.model, name, args.np, args)
            cells.append(cell)
            print(f"round {k + 1}/{args.rounds} {name}: "
                  + (f"{cell['step_s']:.3f} s/step" if "error" not in cell else "FAILED"), flush=True)
    rows = summarize_rows(cells, order)
    out.mkdir(parents=True, exist_ok=True)
    write_report(rows, args, out, commit, time.time() - t0)
    print((out / "OVERHEAD.md").read_text())
    return rows


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
