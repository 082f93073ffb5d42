"""Bandwidth-limited speedup benchmark on the emulated cluster (root; see launch/cluster.sh).

    sudo .venv/bin/python -m benchmarks.bandwidth --rates 1gbit,200mbit,50mbit --np 2 \\
        --models cnn,lstm --out docs/results/bandwidth

For every link rate it brings the cluster up, and for every model x compressor runs one cell
(``step_worker`` under horovodrun across the nodes; ``ddp_worker`` for DDP + PowerSGD), then tears
the cluster down. Per cell: median step time over the timed steps, the compute-only step time
(one process, no communication), bytes per step and rank counted by the kernel on the node's
eth0 against the cost model's prediction, speedup against ``none`` at the same rate, and the
ratio of that speedup to the ideal bound T_none / (T_compute + T_comm_none * wire_ratio). A cell
that fails is recorded with its error and the sweep goes on. Writes results.json, BANDWIDTH.md
(table + the exact command + the commit) and PNG plots into ``--out``; every cell's raw files
(rank<i>.json, its output) go into ``--out``/cells.jsonl.gz (``benchmarks.archive``).
Model and compressor names: ``workloads.tasks`` (old names uniform2/4/8 still accepted).
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

from benchmarks import procs, provenance
from benchmarks.archive import Archive
from benchmarks.cluster import CLUSTER, held
from hvd_gradq.exchange.timings import PHASES
from workloads.progress import Progress
from workloads.tasks import TASKS, compressor_name

ROOT = procs.ROOT
DEFAULT_COMPRESSORS = "none,fp16,stock2,stock4,stock8,rotated2,rotated3,lad2,lad3,jointsq20,jointsq100,powersgd"


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
    """(exit status, output) of ``cmd`` run in its own process group (``benchmarks.procs``)."""
    res = procs.run(cmd, timeout=timeout, env=env)
    return res.returncode, res.output


def run_on_nodes(module: str, module_args: list[str], size: int, timeout: float, env: dict) -> tuple[int, str]:
    """Start ``python -m module`` once per node (``ip netns exec hvdgq<i>``) with ``--rank i --world
    size --master <node 1>:29511`` appended, as a DDP job needs; wait for all, killing any that run
    past ``timeout``. Returns (first non-zero exit status or 0, the outputs)."""
    cmds = [["ip", "netns", "exec", f"hvdgq{r + 1}", sys.executable, "-m", module, *module_args,
             "--rank", str(r), "--world", str(size), "--master", "10.77.0.1:29511"] for r in range(size)]
    results = procs.run_all(cmds, timeout=timeout, env=env)
    rc = next((r.returncode for r in results if r.returncode), 0)
    return rc, "".join(r.output for r in results)


def keep_cell(out: Path, cell_dir: Path) -> None:
    """Fold a finished cell's raw files into ``out``/cells.jsonl.gz and remove its scratch directory."""
    archive = Archive(out / "cells.jsonl.gz")
    archive.drop(cell_dir.name)
    archive.put_dir(cell_dir.name, cell_dir)
    archive.save()
    shutil.rmtree(cell_dir)
    with_cells = cell_dir.parent
    if with_cells.is_dir() and not any(with_cells.iterdir()):
        with_cells.rmdir()


def _collect(cell_dir: Path, size: int) -> dict:
    ranks = [json.loads((cell_dir / f"rank{r}.json").read_text()) for r in range(size)]
    head = dict(ranks[0])
    head["median_step_s"] = max(r["median_step_s"] for r in ranks)  # ranks wait for each other
    head["tx_per_step"] = sum(r["tx_per_step"] for r in ranks) / size
    return head


def run_cell(model: str, compressor: str, size: int, args, out: Path) -> dict:
    cell_dir = out / "cells" / f"{args.rate_label}-{model}-{compressor}-np{size}"
    if cell_dir.exists():
        shutil.rmtree(cell_dir)
    cell_dir.mkdir(parents=True)
    py = sys.executable
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if compressor == "powersgd":
        ddp_args = ["--model", model, "--warmup", str(args.warmup), "--steps", str(args.steps), "--out", str(cell_dir)]
        if args.ddp_bucket_mb:
            ddp_args += ["--bucket-cap-mb", str(args.ddp_bucket_mb)]
        rc, text = run_on_nodes("benchmarks.ddp_worker", ddp_args, size, args.cell_timeout, env)
    else:
        cmd = [str(CLUSTER), "run", "-np", str(size), py, "-m", "benchmarks.step_worker", "--model", model,
               "--compressor", compressor, "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--out", str(cell_dir)]
        rc, text = _run(cmd, args.cell_timeout, env)
    (cell_dir / "log.txt").write_text(text)
    row = {"model": model, "compressor": compressor, "size": size, "error": text[-1500:]} if rc != 0 \
        else _collect(cell_dir, size)
    keep_cell(out, cell_dir)
    return row


def compute_only(model: str, args, out: Path) -> float:
    cell_dir = out / "cells" / f"compute-{model}"
    cmd = [sys.executable, "-m", "benchmarks.step_worker", "--model", model, "--compressor", "none",
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--out", str(cell_dir)]
    rc, text = _run(cmd, args.cell_timeout, dict(os.environ, OMP_NUM_THREADS="1"))
    if rc != 0:
        raise RuntimeError(f"compute-only run of {model} failed:\n{text[-2000:]}")
    seconds = json.loads((cell_dir / "rank0.json").read_text())["median_step_s"]
    keep_cell(out, cell_dir)
    return seconds


def derive(rows: list[dict], compute: dict[str, float]) -> None:
    """Speedup vs none and the ratio to the ideal bound, in place."""
    base = {(r["rate"], r["model"], r["size"]): r for r in rows if r["compressor"] == "none" and "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        r["compute_s"] = compute[r["model"]]
        b = base.get((r["rate"], r["model"], r["size"]))
        if b is None:
            continue
        r["speedup"] = b["median_step_s"] / r["median_step_s"]
        wire_ratio = r["tx_per_step"] / max(b["tx_per_step"], 1.0)
        comm_none = max(b["median_step_s"] - r["compute_s"], 0.0)
        ideal = b["median_step_s"] / (r["compute_s"] + comm_none * wire_ratio)
        r["wire_ratio"] = wire_ratio
        r["ideal_speedup"] = ideal
        r["of_ideal"] = r["speedup"] / ideal if ideal > 0 else float("nan")


def write_report(rows: list[dict], compute: dict[str, float], args, out: Path, seconds: float,
                 kept: list[str] = (), commit: str = provenance.NOT_RECORDED) -> None:
    (out / "results.json").write_text(json.dumps({"rows": rows, "compute_s": compute, "args": vars(args),
                                                  "seconds": seconds, "kept": list(kept), "commit": commit}, indent=1))
    cmd = "sudo .venv/bin/python -m benchmarks.bandwidth " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items()
        if k not in ("rate_label", "merge", "allow_dirty"))
    lines = ["# Bandwidth-limited speedups (measured on the emulated cluster)", "",
             f"Command: `{cmd}` ({seconds / 60:.0f} min; commit {commit})."
             + (f" Rows kept from an earlier run of this directory (`--merge`): {', '.join(kept)}." if kept else ""),
             "",
             "Cluster: `launch/cluster.sh` namespaces on one 2-core machine, 1 process per node and 1 thread "
             "per process, links shaped with tc tbf in both directions, MTU 9000. Step time: the slowest rank's "
             f"median over {args.steps} timed steps after {args.warmup} warm-up steps. Bytes: sent per step and "
             "rank, counted by the kernel on the node's eth0; predicted: the cost model's network bytes "
             "(ring allreduce 2(N-1)/N x payload; allgather (N-1) x frame; two-phase both phases). "
             "Ideal: T_none / (T_compute + T_comm_none x wire ratio).", "",
             "Compute-only step time (1 process): " + ", ".join(f"{m} {s:.3f} s" for m, s in compute.items()), "",
             "Breakdown (rank 0, mean s per timed step; `opt.step_timings()` for the drop-in, the worker's timers "
             "around the stock optimizer): compute / encode / decode / wait in collectives; - where not measured "
             "(DDP).", "",
             "| rate | model | N | compressor | step s | speedup | ideal | of ideal | sent B/step | predicted B/step "
             "| kernel/predicted | wire ratio | compute | encode | decode | wait |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            first = r["error"].strip().splitlines()[-1][:80] if r["error"].strip() else "failed"
            lines.append(f"| {r['rate']} | {r['model']} | {r['size']} | {r['compressor']} | failed: {first} "
                         "| | | | | | | | | | | |")
            continue
        pred = r.get("predicted_sent_per_step")
        kp = f"{r['tx_per_step'] / pred:.3f}" if pred else "-"
        lines.append(
            f"| {r['rate']} | {r['model']} | {r['size']} | {r['compressor']} | {r['median_step_s']:.3f} | "
            f"{r.get('speedup', float('nan')):.2f} | {r.get('ideal_speedup', float('nan')):.2f} | "
            f"{r.get('of_ideal', float('nan')):.2f} | {r['tx_per_step']:.0f} | "
            f"{'-' if pred is None else f'{pred:.0f}'} | {kp} | {r.get('wire_ratio', float('nan')):.3f} | "
            + " | ".join(f"{r['breakdown'][k]:.3f}" if r.get("breakdown") else "-"
                         for k in ("compute", "encode", "decode", "wait")) + " |")
    lines += ["", "![speedup](speedup.png)", "", "![breakdown](breakdown.png)", ""]
    (out / "BANDWIDTH.md").write_text("\n".join(lines))
    _plots(rows, compute, out)


def _rate_mbit(rate: str) -> float:
    r = rate.lower()
    for unit, f in (("gbit", 1000.0), ("mbit", 1.0), ("kbit", 1e-3)):
        if r.endswith(unit):
            return float(r[: -len(unit)]) * f
    return float(r)


def _plots(rows: list[dict], compute: dict[str, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r and "speedup" in r]
    models = sorted({r["model"] for r in ok})
    if not ok:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for comp in sorted({r["compressor"] for r in ok if r["model"] == model}):
            pts = sorted((_rate_mbit(r["rate"]), r["speedup"]) for r in ok if r["model"] == model
                         and r["compressor"] == comp)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=comp)
        ax.set_xscale("log")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel("link rate (Mbit/s)")
        ax.set_ylabel("speedup vs none")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=110)
    plt.close(fig)
    rates = sorted({r["rate"] for r in ok}, key=_rate_mbit)
    fig, axes = plt.subplots(len(models), len(rates), figsize=(4.2 * len(rates), 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, rate in enumerate(rates):
            ax = axes[i][j]
            sel = [r for r in ok if r["model"] == model and r["rate"] == rate]
            names = [r["compressor"] for r in sel]
            bottom = [0.0] * len(sel)
            for phase in PHASES:  # rank 0's measured phases; a row without them (DDP): compute + the rest
                vals = []
                for r in sel:
                    b = r.get("breakdown")
                    if b:
                        vals.append(b[phase] * r["median_step_s"] / max(b["step"], 1e-9))
                    elif phase == "compute":
                        vals.append(compute[model])
                    elif phase == "other":
                        vals.append(max(r["median_step_s"] - compute[model], 0.0))
                    else:
                        vals.append(0.0)
                ax.bar(names, vals, bottom=bottom, label=phase)
                bottom = [b + v for b, v in zip(bottom, vals)]
            base = next((r["median_step_s"] for r in sel if r["compressor"] == "none"), None)
            if base is not None:
                ideal = [base / r["ideal_speedup"] if r.get("ideal_speedup") else float("nan") for r in sel]
                ax.scatter(names, ideal, color="k", marker="_", s=300, zorder=3, label="ideal bound")
            ax.set_title(f"{model} @ {rate}")
            ax.set_ylabel("s per step")
            ax.tick_params(axis="x", rotation=60, labelsize=7)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "breakdown.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="1gbit,200mbit,50mbit")
    ap.add_argument("--np", default="2", help="comma-separated process counts (one per node)")
    ap.add_argument("--models", default="cnn,lstm", help=f"comma-separated, of {','.join(TASKS)}")
    ap.add_argument("--compressors", default=DEFAULT_COMPRESSORS,
                    help="comma-separated names of workloads.tasks (step_worker's, and powersgd)")
    ap.add_argument("--delay", default="0")
    ap.add_argument("--warmup", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cell-timeout", type=float, default=600)
    ap.add_argument("--ddp-bucket-mb", type=float, default=0,
                    help="DDP + PowerSGD: DDP's bucket size, MB (0: DDP's default; larger than the model: one bucket)")
    ap.add_argument("--out", default="docs/results/bandwidth")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of --out/results.json that this run does not redo (e.g. a failed cell)")
    provenance.add_argument(ap)
    args = ap.parse_args(argv)
    args.compressors = ",".join(compressor_name(c) for c in args.compressors.split(","))
    if os.geteuid() != 0:
        raise SystemExit("the benchmark brings up network namespaces: run it as root")
    out = Path(args.out)
    commit = provenance.commit(args.allow_dirty, outputs=[out])
    out.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    sizes = [int(n) for n in args.np.split(",")]
    cells = [(rate, m, c, n) for rate in args.rates.split(",") for m in models
             for c in args.compressors.split(",") for n in sizes]

    started = time.perf_counter()
    rows: list[dict] = []
    kept: list[str] = []
    compute: dict[str, float] = {}
    if args.merge and (out / "results.json").exists():
        old = json.loads((out / "results.json").read_text())
        redo = {(c[0], c[1], c[2], c[3]) for c in cells}
        rows = [r for r in old["rows"] if (r["rate"], r["model"], compressor_name(r["compressor"].replace("ddp-", "")),
                                           r["size"]) not in redo]
        kept = [f"{r['rate']} {r['model']} {r['compressor']} np{r['size']}" for r in rows]
        compute = dict(old["compute_s"])
    compute.update({m: compute_only(m, args, out) for m in models if m not in compute})
    bar = Progress(len(cells), "cells")
    with held(say=bar.write):
        try:
            for rate in args.rates.split(","):
                args.rate_label = rate
                rc, text = _run([str(CLUSTER), "up", "--nodes", str(max(sizes)), "--rate", rate, "--delay", args.delay],
                                180)
                if rc != 0:
                    for cell in [c for c in cells if c[0] == rate]:
                        rows.append({"rate": rate, "model": cell[1], "compressor": cell[2], "size": cell[3],
                                     "error": f"cluster up failed: {text[-500:]}"})
                        bar.update()
                    continue
                for _, m, c, n in [cell for cell in cells if cell[0] == rate]:
                    bar.set_postfix(f"{rate} {m} {c} np{n}")
                    row = run_cell(m, c, n, args, out)
                    row["rate"] = rate
                    rows.append(row)
                    if "error" in row:
                        bar.write(f"cell {rate} {m} {c} np{n} failed; going on")
                    else:
                        bar.write(f"{rate} {m} {c} np{n}: {row['median_step_s']:.3f} s/step, "
                                  f"{row['tx_per_step'] / 1e6:.2f} MB/step sent")
                    bar.update()
                    derive(rows, compute)
                    write_report(rows, compute, args, out, time.perf_counter() - started, kept, commit)
        finally:
            _run([str(CLUSTER), "down"], 120)
            bar.close()
    derive(rows, compute)
    write_report(rows, compute, args, out, time.perf_counter() - started, kept, commit)
    print(f"wrote {out / 'BANDWIDTH.md'}, {out / 'results.json'}, {out / 'speedup.png'}, {out / 'breakdown.png'}")


if __name__ == "__main__":
    main()
