"""Time-to-accuracy on the emulated cluster (root; see launch/cluster.sh).

    sudo .venv/bin/python -m benchmarks.time_to_accuracy --rates 100mbit,10mbit --np 2 \\
        --target 0.85 --out docs/results/tta

For every link rate it brings the cluster up and trains the Fashion-MNIST CNN from the same seed
with each compressor (``tta_worker``: Horovod compressors under horovodrun across the nodes, DDP +
PowerSGD with one process per node) until the test accuracy reaches ``--target`` or
``--max-steps`` pass, scoring the test set every ``--eval-every`` steps with the clock stopped.
Writes results.json, TTA.md (table + the exact command + the commit) and accuracy_vs_time.png
into ``--out``; every run's raw files go into ``--out``/cells.jsonl.gz. A run that fails is
recorded with its error and the sweep goes on. Compressor names: ``workloads.tasks`` (old names
uniform2/4/8 still accepted).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from benchmarks import provenance
from benchmarks.bandwidth import _rate_mbit, _run, keep_cell, run_on_nodes
from benchmarks.cluster import CLUSTER, held
from workloads.progress import Progress
from workloads.tasks import compressor_name

DEFAULT_COMPRESSORS = "none,fp16,stock2,lad2,jointsq20,powersgd"


def run_one(rate: str, compressor: str, args, out: Path) -> dict:
    cell_dir = out / "cells" / f"{rate}-{compressor}-np{args.np}"
    if cell_dir.exists():
        shutil.rmtree(cell_dir)
    cell_dir.mkdir(parents=True)
    common = ["--compressor", compressor, "--target", str(args.target), "--max-steps", str(args.max_steps),
              "--eval-every", str(args.eval_every), "--seed", str(args.seed), "--out", str(cell_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if compressor == "powersgd":
        rc, text = run_on_nodes("benchmarks.tta_worker", common, args.np, args.run_timeout, env)
    else:
        rc, text = _run([str(CLUSTER), "run", "-np", str(args.np), sys.executable, "-m",
                         "benchmarks.tta_worker", *common], args.run_timeout, env)
    (cell_dir / "log.txt").write_text(text)
    if rc != 0:
        row = {"rate": rate, "compressor": compressor, "error": text[-1500:]}
    else:
        ranks = [json.loads((cell_dir / f"rank{r}.json").read_text()) for r in range(args.np)]
        row = dict(ranks[0], rate=rate)
        row["train_s"] = max(r["train_s"] for r in ranks)  # the ranks wait for each other every step
    keep_cell(out, cell_dir)
    return row


def write_report(rows: list[dict], args, out: Path, seconds: float, commit: str = provenance.NOT_RECORDED) -> None:
    (out / "results.json").write_text(json.dumps({"rows": rows, "args": vars(args), "seconds": seconds,
                                                  "commit": commit}, indent=1))
    cmd = "sudo .venv/bin/python -m benchmarks.time_to_accuracy " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items()
        if k not in ("merge", "allow_dirty"))
    lines = ["# Time to accuracy (measured on the emulated cluster)", "",
             f"Command: `{cmd}` ({seconds / 60:.0f} min; commit {commit}).", "",
             f"Fashion-MNIST CNN (116,602 parameters), {args.np} nodes x 1 process x 1 thread, batch 64 per worker, "
             f"SGD lr 0.05 momentum 0.9, seed {args.seed}; links shaped with tc tbf both ways (launch/cluster.sh). "
             f"Clock: training steps only (evaluation of the full 10k test set every {args.eval_every} steps runs "
             "with the clock stopped). Allocation time of the LAD run is inside its clock.", "",
             f"| rate | compressor | time to {args.target:.2f} (s) | steps | speedup vs none | s/step "
             "| best accuracy | accuracy at end |",
             "|---|---|---|---|---|---|---|---|"]
    base = {r["rate"]: r for r in rows if r["compressor"] == "none" and "error" not in r}
    for r in rows:
        if "error" in r:
            last = r["error"].strip().splitlines()[-1][:80] if r["error"].strip() else "failed"
            lines.append(f"| {r['rate']} | {r['compressor']} | failed: {last} | | | | | |")
            continue
        best = max(p["accuracy"] for p in r["curve"])
        if r["reached"]:
            t, steps = f"{r['reached']['train_s']:.1f}", str(r["reached"]["step"])
            b = base.get(r["rate"])
            sp = f"{b['reached']['train_s'] / r['reached']['train_s']:.2f}" if b and b["reached"] else "-"
        else:
            t, steps, sp = f"not reached in {r['steps']} steps", "-", "-"
        lines.append(f"| {r['rate']} | {r['compressor']} | {t} | {steps} | {sp} | {r['s_per_step']:.3f} | "
                     f"{best:.4f} | {r['curve'][-1]['accuracy']:.4f} |")
    lines += ["", "![accuracy vs wall-clock](accuracy_vs_time.png)", ""]
    (out / "TTA.md").write_text("\n".join(lines))
    _plot(rows, args, out)


def _plot(rows: list[dict], args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    rates = sorted({r["rate"] for r in ok}, key=_rate_mbit, reverse=True)
    if not ok:
        return
    fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 4.2), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for r in [r for r in ok if r["rate"] == rate]:
            ax.plot([p["train_s"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]], marker=".",
                    label=r["compressor"])
        ax.axhline(args.target, color="k", lw=0.8, ls="--")
        ax.set_ylim(max(0.0, args.target - 0.15), min(1.0, args.target + 0.06))
        ax.set_xlabel("training wall-clock (s)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"CNN, {args.np} nodes @ {rate}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_time.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="100mbit,10mbit")
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--compressors", default=DEFAULT_COMPRESSORS,
                    help="comma-separated names of workloads.tasks (tta_worker's)")
    ap.add_argument("--target", type=float, default=0.85)
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--delay", default="0")
    ap.add_argument("--run-timeout", type=float, default=1200)
    ap.add_argument("--out", default="docs/results/tta")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of --out/results.json that this run does not redo (e.g. to redo a failed run)")
    provenance.add_argument(ap)
    args = ap.parse_args(argv)
    args.compressors = ",".join(compressor_name(c) for c in args.compressors.split(","))
    if os.geteuid() != 0:
        raise SystemExit("the benchmark brings up network namespaces: run it as root")
    if args.np < 2:
        raise SystemExit("--np must be at least 2 (Horovod registers no hooks in a 1-process job)")
    out = Path(args.out)
    commit = provenance.commit(args.allow_dirty, outputs=[out])
    out.mkdir(parents=True, exist_ok=True)

    comps = args.compressors.split(",")
    started = time.perf_counter()
    rows: list[dict] = []
    if args.merge and (out / "results.json").exists():
        redo = {(r, c) for r in args.rates.split(",") for c in comps}
        rows = [r for r in json.loads((out / "results.json").read_text())["rows"]
                if (r["rate"], compressor_name(r["compressor"])) not in redo]
    bar = Progress(len(comps) * len(args.rates.split(",")), "runs")
    with held(say=bar.write):
        try:
            for rate in args.rates.split(","):
                rc, text = _run([str(CLUSTER), "up", "--nodes", str(args.np), "--rate", rate, "--delay", args.delay],
                                180)
                for comp in comps:
                    bar.set_postfix(f"{rate} {comp}")
                    row = (run_one(rate, comp, args, out) if rc == 0 else
                           {"rate": rate, "compressor": comp, "error": f"cluster up failed: {text[-500:]}"})
                    rows.append(row)
                    if "error" in row:
                        bar.write(f"{rate} {comp} failed; going on")
                    else:
                        got = f"reached {args.target} in {row['reached']['train_s']:.1f} s" if row["reached"] else \
                            f"did not reach {args.target} in {row['steps']} steps"
                        bar.write(f"{rate} {comp}: {got} ({row['s_per_step']:.3f} s/step)")
                    bar.update()
                    write_report(rows, args, out, time.perf_counter() - started, commit)
        finally:
            _run([str(CLUSTER), "down"], 120)
            bar.close()
    write_report(rows, args, out, time.perf_counter() - started, commit)
    print(f"wrote {out / 'TTA.md'}, {out / 'results.json'}, {out / 'accuracy_vs_time.png'}")


if __name__ == "__main__":
    main()
