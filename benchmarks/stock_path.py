"""Step time of the stock path (``hvd.DistributedOptimizer`` + ``hvd_gradq.Compressor``) against the
drop-in, on the emulated cluster, rows interleaved and repeated (root; see launch/cluster.sh).

    sudo .venv/bin/python -m benchmarks.stock_path --rate 100mbit --np 2,4 --model lstm --repeats 3 \\
        --rows lowrank4,lowrank4-stock,rotated2,rotated2-stock,stock2 \\
        --baseline /path/to/an/older/checkout --baseline-rows lowrank4,rotated2,stock2 \\
        --out docs/results/stock_path

Every repeat runs every row once, in the same order, for each N (``step_worker`` under horovodrun
across the nodes, ``--warmup`` then ``--steps`` timed steps); so slow drift of the shared machine
falls on every row alike. ``--baseline`` runs its rows from another checkout of the project (the
same virtual environment), e.g. the commit before the drop-in ran on Horovod's optimizer, whose
exchanges sent no placeholders: its rows are labelled ``<row>@baseline``. Per row: the median
over repeats of the cell's median step (the slower rank's), the range, the ratio to the first row
of the list, and rank 0's mean wait per step. Writes results.json and STOCK_PATH.md into ``--out``.
``--probe K`` also times K placeholders alone once per repeat (``benchmarks.placeholder_probe``:
what they cost with nothing else in flight, an upper bound of their share of a step).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks import procs, provenance
from benchmarks.cluster import CLUSTER, held
from workloads.progress import Progress


def launch(tree: Path, size: int, worker: list[str], args, cell: Path) -> list[dict] | str:
    """``python -m <worker...> --out cell`` under horovodrun across the nodes from ``tree``: every
    rank's JSON, or the end of the output where the job failed."""
    cell.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HVD_GRADQ_VENV=str(Path(sys.executable).parent.parent))
    if args.cycle_ms:
        env["HOROVOD_CYCLE_TIME"] = str(args.cycle_ms)
    cmd = [str(tree / "launch" / "cluster.sh"), "run", "-np", str(size), sys.executable, "-m", *worker,
           "--out", str(cell)]
    res = procs.run(cmd, timeout=args.cell_timeout, env=env, cwd=tree)
    if res.returncode != 0:
        return res.output[-1500:]
    return [json.loads((cell / f"rank{r}.json").read_text()) for r in range(size)]


def run_cell(tree: Path, model: str, row: str, size: int, args, cell: Path) -> dict:
    ranks = launch(tree, size, ["benchmarks.step_worker", "--model", model, "--compressor", row, "--warmup",
                                str(args.warmup), "--steps", str(args.steps)], args, cell)
    if isinstance(ranks, str):
        return {"error": ranks}
    head = ranks[0]
    return {"median_step_s": max(r["median_step_s"] for r in ranks), "payload_per_step": head["payload_per_step"],
            "wait_s": head.get("breakdown", {}).get("wait"), "tx_per_step": head["tx_per_step"]}


def run_probe(size: int, args, cell: Path) -> dict:
    """The placeholders alone (``benchmarks.placeholder_probe``): the slower rank's median and p90."""
    ranks = launch(procs.ROOT, size, ["benchmarks.placeholder_probe", "--count", str(args.probe), "--op",
                                      args.probe_op], args, cell)
    if isinstance(ranks, str):
        return {"error": ranks}
    return {"median_s": max(r["median_s"] for r in ranks), "p90_s": max(r["p90_s"] for r in ranks),
            "bytes": ranks[0]["bytes"], "repeats": ranks[0]["repeats"]}


def summarize_rows(runs: list[dict]) -> list[dict]:
    """Per (N, row): the repeats' median steps, their median and range, and the ratio to the N's first row."""
    out = []
    keys = list(dict.fromkeys((r["size"], r["row"]) for r in runs))
    for size, row in keys:
        ok = [r for r in runs if (r["size"], r["row"]) == (size, row) and "error" not in r]
        steps = [r["median_step_s"] for r in ok]
        waits = [r["wait_s"] for r in ok if r.get("wait_s") is not None]
        out.append({"size": size, "row": row, "repeats": len(ok), "failed": sum(
            1 for r in runs if (r["size"], r["row"]) == (size, row) and "error" in r), "steps": steps,
            "median_s": statistics.median(steps) if steps else None, "min_s": min(steps, default=None),
            "max_s": max(steps, default=None), "wait_s": statistics.median(waits) if waits else None,
            "payload": ok[0]["payload_per_step"] if ok else None})
    for size in {r["size"] for r in out}:
        first = next(r for r in out if r["size"] == size)
        for r in out:
            if r["size"] == size and r["median_s"] and first["median_s"]:
                r["ratio"] = r["median_s"] / first["median_s"]
    return out


def public(args, baseline: str | None) -> dict:
    """The arguments as recorded, the baseline checkout by its commit, not its path."""
    out = {k: v for k, v in vars(args).items() if k != "out"}
    if baseline:
        out["baseline"] = baseline
    return out


def command(args, baseline: str | None) -> str:
    """The command line as a reader would type it, without this machine's paths."""
    flags = public(args, baseline)
    flags.pop("allow_dirty", None)
    if baseline:
        flags["baseline"] = f"<checkout of {baseline[:7]}>"
    parts = ["python -m benchmarks.stock_path"]
    for key, value in flags.items():
        if value not in (None, "", 0, False) and not (key == "probe_op" and not args.probe):
            parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def write_report(summary: list[dict], probes: list[dict], args, out: Path, commit: str, baseline: str | None,
                 seconds: float) -> None:
    lines = ["# Stock path against the drop-in: step time (benchmarks.stock_path)", "",
             f"Commit {commit}" + (f"; baseline rows from {baseline}" if baseline else "") +
             f". {args.model} at {args.rate} per link, {args.repeats} repeats, rows interleaved in each repeat; "
             f"{args.warmup} warm-up and {args.steps} timed steps per cell; the cell's figure is the slower rank's "
             f"median step. {seconds / 60:.0f} min. Command: `{command(args, baseline)}`", "",
             "| N | row | median s/step | range over repeats | x first row | rank 0 wait s/step | bytes/step |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        if r["median_s"] is None:
            lines.append(f"| {r['size']} | {r['row']} | failed | | | | |")
            continue
        wait = "" if r["wait_s"] is None else f"{r['wait_s']:.3f}"
        lines.append(f"| {r['size']} | {r['row']} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | "
                     f"{r.get('ratio', float('nan')):.3f} | {wait} | {r['payload']} |")
    pairs = []  # each repeat's ratio of a row to its drop-in (``x-stock``) or its current (``x@baseline``) twin
    for r in summary:
        twin = r["row"].removesuffix("-stock").split("@")[0]
        other = next((o for o in summary if o["size"] == r["size"] and o["row"] == twin and o is not r), None)
        if other and not r["failed"] and not other["failed"]:  # the same repeats, in order
            ratios = [a / b for a, b in zip(r["steps"], other["steps"])]
            pairs.append(f"| {r['size']} | {r['row']} / {twin} | {', '.join(f'{x:.3f}' for x in ratios)} | "
                         f"{statistics.median(ratios):.3f} |")
    if pairs:
        lines += ["", "Paired by repeat (both cells in the same repeat, within a few minutes of each other):", "",
                  "| N | rows | ratio per repeat | median |", "|---|---|---|---|", *pairs]
    for size in sorted({p["size"] for p in probes}):
        ok = [p for p in probes if p["size"] == size and "error" not in p]
        if not ok:
            lines += ["", f"N = {size}: the placeholder probe failed."]
            continue
        med = statistics.median(p["median_s"] for p in ok)
        medians = [p["median_s"] for p in ok]
        steps = [r["median_s"] for r in summary if r["size"] == size and r["median_s"] and r["row"].endswith("-stock")]
        share = f" = {100 * med / min(steps):.2f}% of the fastest stock row's step" if steps else ""
        cycle = f"HOROVOD_CYCLE_TIME={args.cycle_ms:g} ms" if args.cycle_ms else "Horovod's default cycle"
        lines += ["", f"N = {size}, the placeholders alone (`benchmarks.placeholder_probe`, {args.probe} x 64 B, "
                      f"op {args.probe_op}, all submitted then waited for, nothing else in flight, {cycle}; "
                      f"{len(ok)} runs of {ok[0].get('repeats', 200)}): median {1e3 * med:.2f} ms (runs' medians "
                      f"{1e3 * min(medians):.2f}-{1e3 * max(medians):.2f} ms, p90 up to "
                      f"{1e3 * max(p['p90_s'] for p in ok):.2f} ms){share}. In a step they share Horovod's cycles "
                      "with the other tensors, so this bounds their cost from above."]
    lines += ["", "N = 4 is four processes on this machine's two cores: it measures contention as much as the code.",
              ""]
    (out / "STOCK_PATH.md").write_text("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--np", default="2", help="comma-separated process counts (one per node)")
    ap.add_argument("--model", default="lstm")
    ap.add_argument("--rows", default="lowrank4,lowrank4-stock,rotated2,rotated2-stock,stock2")
    ap.add_argument("--baseline", default="", help="another checkout of the project whose --baseline-rows also run")
    ap.add_argument("--baseline-rows", default="")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--cycle-ms", type=float, default=0, help="HOROVOD_CYCLE_TIME for every row (0: Horovod's)")
    ap.add_argument("--probe", type=int, default=0,
                    help="also time this many placeholders alone once per repeat (0: no probe)")
    ap.add_argument("--probe-op", choices=("sum", "average"), default="average")
    ap.add_argument("--cell-timeout", type=float, default=600)
    ap.add_argument("--out", default="docs/results/stock_path")
    provenance.add_argument(ap)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the benchmark brings up network namespaces: run it as root")
    out = Path(args.out)
    commit = provenance.commit(args.allow_dirty, outputs=[out])
    out.mkdir(parents=True, exist_ok=True)
    trees = [(procs.ROOT, r, r) for r in args.rows.split(",")]
    baseline = None
    if args.baseline:
        base = Path(args.baseline).resolve()
        baseline = provenance.commit(args.allow_dirty, root=base)
        trees += [(base, r, f"{r}@baseline") for r in args.baseline_rows.split(",") if r]
    sizes = [int(n) for n in args.np.split(",")]
    runs: list[dict] = []
    probes: list[dict] = []
    started = time.perf_counter()
    bar = Progress(len(sizes) * args.repeats * (len(trees) + bool(args.probe)), "cells")
    with held(say=bar.write):
        try:
            res = procs.run([str(CLUSTER), "up", "--nodes", str(max(sizes)), "--rate", args.rate], timeout=180)
            if res.returncode != 0:
                raise SystemExit(f"cluster up failed: {res.output[-800:]}")
            for size in sizes:
                for rep in range(args.repeats):
                    for tree, row, label in trees:
                        bar.set_postfix(f"np{size} {label} #{rep}")
                        cell = out / "cells" / f"np{size}-{label.replace('@', '-')}-{rep}"
                        runs.append({"size": size, "row": label, "repeat": rep,
                                     **run_cell(tree, args.model, row, size, args, cell)})
                        bar.update()
                        (out / "results.json").write_text(json.dumps({"commit": commit, "baseline": baseline,
                                                                      "args": public(args, baseline), "runs": runs,
                                                                      "probes": probes}, indent=1))
                    if args.probe:
                        bar.set_postfix(f"np{size} placeholders #{rep}")
                        probes.append({"size": size, "repeat": rep,
                                       **run_probe(size, args, out / "cells" / f"np{size}-probe-{rep}")})
                        bar.update()
        finally:
            procs.run([str(CLUSTER), "down"], timeout=120)
    bar.close()
    summary = summarize_rows(runs)
    (out / "results.json").write_text(json.dumps({"commit": commit, "baseline": baseline,
                                                  "args": public(args, baseline), "runs": runs, "probes": probes,
                                                  "summary": summary}, indent=1))
    write_report(summary, probes, args, out, commit, baseline, time.perf_counter() - started)
    shutil.rmtree(out / "cells", ignore_errors=True)
    print((out / "STOCK_PATH.md").read_text())


if __name__ == "__main__":
    main()
