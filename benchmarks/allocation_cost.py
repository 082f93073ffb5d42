"""What an allocation costs in a job: exact LAD with the table split over the ranks against rank 0
evaluating all of it, side by side in one run.

    .venv/bin/python -m benchmarks.allocation_cost --models lstm cnn --np 2 --steps 40 \\
        --out docs/results/allocation_cost

Runs ``benchmarks.step_worker`` (loopback, ``horovodrun -np N``) for the LAD rows (``lad2r`` by
default: budget 2 over the rotated code, ``Trigger(tau=0.95, k_min=20)``, one probe batch) with
``Allocator(spread=True)`` and ``spread=False``, interleaved over ``--rounds``; per cell: the
allocations, seconds deciding bits (trigger verdicts, allocations, codebook broadcasts) and that
time as a fraction of the wall clock since the first step, and the forward passes (all ranks).
The bits decided are recorded so that the two rows can be compared: they are the same table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks import procs, provenance


def run_cell(model: str, compressor: str, spread: bool, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        worker = ["-m", "benchmarks.step_worker", "--model", model, "--compressor", compressor,
                  "--warmup", "0", "--steps", str(args.steps), "--out", tmp, *([] if spread else ["--no-spread"])]
        cmd, env = procs.horovodrun_command(worker, np=args.np)
        res = procs.run(cmd, timeout=args.cell_timeout, env=env)
        if res.returncode != 0 or res.timed_out:
            return {"error": res.output[-1500:]}
        head = json.loads(Path(tmp, "rank0.json").read_text())
    a = head["allocation"]
    return {"allocations": a["allocations"], "seconds": a["seconds"], "fraction": a["fraction"],
            "forwards": a["forwards"], "step_s": head["median_step_s"], "bits": head["bits"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lstm", "cnn"])
    ap.add_argument("--compressor", default="lad2r")
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cell-timeout", type=float, default=900)
    ap.add_argument("--out", required=True)
    provenance.add_argument(ap)
    args = ap.parse_args(argv)
    out = Path(args.out)
    commit = provenance.commit(args.allow_dirty, outputs=[out])
    cells = []
    for rnd in range(args.rounds):
        for model in args.models:
            for spread in ((True, False) if rnd % 2 == 0 else (False, True)):
                cell = {"model": model, "spread": spread, "round": rnd,
                        **run_cell(model, args.compressor, spread, args)}
                print(json.dumps({k: v for k, v in cell.items() if k != "bits"}), flush=True)
                cells.append(cell)
    lines = [f"# Allocation cost: exact LAD spread over {args.np} ranks vs rank 0 alone", "",
             f"`python -m benchmarks.allocation_cost --models {' '.join(args.models)} --np {args.np} --steps "
             f"{args.steps} --rounds {args.rounds} --out {args.out}` (commit {commit}); loopback, "
             f"`{args.compressor}`, {args.steps} steps from step 0; medians over rounds.", "",
             "| model | table | allocations | s per allocation | forwards per allocation (all ranks) | "
             "share of wall clock | step s | same bits |", "|---|---|---|---|---|---|---|---|"]
    for model in args.models:
        bits = {}
        for spread in (True, False):
            ok = [c for c in cells if c["model"] == model and c["spread"] == spread and "error" not in c]
            if not ok:
                lines.append(f"| {model} | {'spread' if spread else 'rank 0'} | failed | | | | | |")
                continue
            bits[spread] = [c["bits"] for c in ok]
            per = statistics.median(c["seconds"] / max(1, c["allocations"]) for c in ok)
            fwd = statistics.median(c["forwards"] / max(1, c["allocations"]) for c in ok)
            frac = statistics.median(c["fraction"] for c in ok)
            step = statistics.median(c["step_s"] for c in ok)
            same = "yes" if len(bits) == 2 and bits[True][0] == bits[False][0] else ("" if len(bits) < 2 else "no")
            lines.append(f"| {model} | {'spread over ' + str(args.np) if spread else 'rank 0 alone'} | "
                         f"{ok[0]['allocations']} | {per:.2f} | {fwd:.0f} | {100 * frac:.1f}% | {step:.3f} | {same} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"commit": commit, "args": vars(args), "cells": cells}, indent=1))
    (out / "ALLOCATION_COST.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
