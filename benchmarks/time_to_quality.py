"""Time to quality on a communication-bound model, on the emulated cluster (root; launch/cluster.sh).

    sudo .venv/bin/python -m benchmarks.time_to_quality --np 2 --rate 100mbit --seeds 0,1 \\
        --ref-steps 400 --out docs/results/time_to_quality

The Austen LSTM language model (``benchmarks.tq_worker``) trained data-parallel from the same seed
by every row until its validation perplexity reaches the target or ``--max-steps`` pass, scored
every ``--eval-every`` steps with the clock stopped. For every N of ``--np``:

1. **The unconstrained reference**: uncompressed Horovod on unshaped links (``cluster.sh up --rate
   none``), ``--ref-steps`` steps per seed. Unless ``--target`` is given, the target is
   ``--target-factor`` x the mean over the seeds of its validation perplexity at ``--ref-steps``.
   Its time to the target is the denominator of every row's "x unconstrained" ratio.
2. **Every row** of ``--rows`` on links shaped to ``--rate``, seed by seed (all rows of one seed,
   then the next), to the target. A row that fails or diverges is recorded as such; the sweep
   goes on.

Writes results.json (every run's curve), TQ.md (tables + command + commit), perplexity_vs_time.png
(one curve per row and seed) and time_to_target.png (bars) into ``--out``; raw per-rank files go
into ``--out``/cells.jsonl.gz. ``--merge`` keeps the runs of results.json this invocation does not
redo and the targets it set (so a later seed is scored against the same target). Row names:
``workloads.tasks`` (Horovod compressors and the DDP peers).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks import provenance
from benchmarks.bandwidth import _run, keep_cell, run_on_nodes
from benchmarks.cluster import CLUSTER, held
from workloads.progress import Progress
from workloads.tasks import BENCH_COMPRESSORS, COMPRESSORS, DDP_COMPRESSORS, compressor_name

#: the issue's rows: every peer a user would pick, then ours
DEFAULT_ROWS = ("none,fp16,ddp_fp16,ddp_bf16,powersgd,powersgd8,stock4,rotated2,rotated3,lad2r,lad3r,lad2f,lad3f,"
                "jointsq20,topk20,lowrank4,mixed07h,mixed10h")
PEERS = ("fp16", "ddp_fp16", "ddp_bf16", "powersgd", "powersgd8")
REFERENCE = "reference"  # the uncompressed run on unshaped links


def time_to_target(curve: list[dict], target: float, key: str = "valid_ppl") -> dict | None:
    """The first evaluation of ``curve`` (a list of {"step", "train_s", key}) at or below ``target``,
    as {"step", "train_s", key}; None when none is (a non-finite value never counts)."""
    for point in curve:
        value = point[key]
        if math.isfinite(value) and value <= target:
            return {"step": point["step"], "train_s": point["train_s"], key: value}
    return None


def value_at(curve: list[dict], step: int, key: str = "valid_ppl") -> float:
    """``key`` at the evaluation of ``curve`` at ``step`` (ValueError when it was not scored)."""
    for point in curve:
        if point["step"] == step:
            return point[key]
    raise ValueError(f"no evaluation at step {step} in the curve (steps: {[p['step'] for p in curve]}); "
                     "--ref-steps must be a multiple of --eval-every")


def target_from(reference_runs: list[dict], ref_steps: int, factor: float) -> float:
    """``factor`` x the mean over the reference runs of their perplexity at ``ref_steps``."""
    values = [value_at(r["curve"], ref_steps) for r in reference_runs]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"the reference runs give no finite perplexity at step {ref_steps}: {values}")
    return factor * statistics.fmean(values)


def summarize(runs: list[dict]) -> list[dict]:
    """One line per (N, row): the seeds' times to target, their mean (None unless every seed
    reached it), steps, s/step, and the ratios to the unconstrained reference and to ``none``."""
    lines: dict[tuple, dict] = {}
    for r in runs:
        line = lines.setdefault((r["np"], r["row"]), {"np": r["np"], "row": r["row"], "rate": r["rate"], "seeds": {}})
        if "error" in r:
            line["seeds"][r["seed"]] = {"status": "failed", "error": r["error"][-300:]}
        elif r.get("diverged"):
            line["seeds"][r["seed"]] = {"status": "diverged", "steps": r["steps"]}
        else:
            hit = time_to_target(r["curve"], r["target"])
            line["seeds"][r["seed"]] = {"status": "reached" if hit else "not reached", "steps": r["steps"],
                                        "train_s": hit["train_s"] if hit else None,
                                        "target_step": hit["step"] if hit else None,
                                        "s_per_step": r["s_per_step"], "final_ppl": r["curve"][-1]["valid_ppl"]}
    for line in lines.values():
        seeds = line["seeds"].values()
        times = [s["train_s"] for s in seeds if s.get("train_s") is not None]
        line["mean_s"] = statistics.fmean(times) if times and len(times) == len(seeds) else None
        steps = [s["s_per_step"] for s in seeds if "s_per_step" in s]
        line["s_per_step"] = statistics.fmean(steps) if steps else None
    for line in lines.values():
        ref = lines.get((line["np"], REFERENCE), {}).get("mean_s")
        none = lines.get((line["np"], "none"), {}).get("mean_s")
        t = line["mean_s"]
        line["x_reference"] = t / ref if t and ref else None
        line["speedup_vs_none"] = none / t if t and none else None
    return list(lines.values())


def _fmt(x, spec=".1f", empty="-"):
    return empty if x is None else format(x, spec)


def _label(row: str) -> str:
    if row == REFERENCE:
        return "uncompressed, unshaped links (reference)"
    c = COMPRESSORS[row]
    return f"{row} (DDP)" if c.path == "ddp" else row


def write_report(runs: list[dict], targets: dict, args, out: Path, seconds: float, commit: str) -> None:
    lines_ = summarize(runs)
    (out / "results.json").write_text(json.dumps({"runs": runs, "summary": lines_, "targets": targets,
                                                  "args": vars(args), "seconds": seconds, "commit": commit}, indent=1))
    cmd = "sudo .venv/bin/python -m benchmarks.time_to_quality " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items()
        if k not in ("merge", "allow_dirty") and v is not None)
    text = ["# Time to quality: the LSTM language model on a slow link (measured on the emulated cluster)", "",
            f"Command: `{cmd}` ({seconds / 60:.0f} min; commit {commit}).", "",
            f"Austen LSTM ({args.size} size), batch {args.batch_size} x 35 tokens per worker, SGD lr 20, gradient norm "
            f"clipped at 0.25, seeds {args.seeds}; N nodes x 1 process x 1 thread on {os.cpu_count()} cores; links "
            f"shaped with tc tbf both ways at {args.rate} (launch/cluster.sh). Clock: training steps only (the first "
            f"{args.eval_tokens} validation tokens scored every {args.eval_every} steps with the clock stopped). "
            "Time to target: the training seconds at the first evaluation at or below the target.", ""]
    by_commit: dict[str, list[str]] = {}
    for r in runs:
        by_commit.setdefault(r.get("commit", provenance.NOT_RECORDED), []).append(f"{r['row']} np {r['np']} "
                                                                                  f"seed {r['seed']}")
    if len(by_commit) > 1:  # --merge: runs of earlier invocations kept
        text += ["Runs by commit: " + "; ".join(f"{c}: {', '.join(v)}" for c, v in by_commit.items()), ""]
    tuned = [f"{r['row']} np {r['np']} seed {r['seed']} ({r['horovod_cycle_ms']} ms)" for r in runs
             if r.get("horovod_cycle_ms")]
    if tuned:
        text += ["Horovod rows run with HOROVOD_CYCLE_TIME set (the others with Horovod's default, 1 ms): "
                 + ", ".join(tuned), ""]
    for n in sorted({line["np"] for line in lines_}):
        tgt = targets.get(str(n))
        text += [f"## N = {n}" + (" (four processes on two cores: contention as much as the code)" if n >= 4 else ""),
                 "", f"Target: validation perplexity {_fmt(tgt, '.2f')}"
                 + (f" ({args.target_factor} x the reference's mean at step {args.ref_steps} over the seeds run when "
                                    "it was set)" if not args.target else ""),
                 "", "| row | time to target (s), per seed | mean (s) | steps to target | s/step | "
                 "x unconstrained reference | speedup vs none |", "|---|---|---|---|---|---|---|"]
        for line in [x for x in lines_ if x["np"] == n]:
            per_seed, steps = [], []
            for seed, s in sorted(line["seeds"].items()):
                per_seed.append(f"{seed}: " + (_fmt(s["train_s"]) if s.get("train_s") is not None else
                                               f"{s['status']}" + (f" in {s['steps']}" if "steps" in s else "")))
                steps.append(_fmt(s.get("target_step"), "d"))
            text.append(f"| {_label(line['row'])} | {'; '.join(per_seed)} | {_fmt(line['mean_s'])} | "
                        f"{' / '.join(steps)} | {_fmt(line['s_per_step'], '.3f')} | "
                        f"{_fmt(line['x_reference'], '.2f')} | {_fmt(line['speedup_vs_none'], '.2f')} |")
        text.append("")
    text += ["![validation perplexity against training time](perplexity_vs_time.png)", "",
             "![time to target](time_to_target.png)", ""]
    (out / "TQ.md").write_text("\n".join(text))
    _plots(runs, lines_, targets, out)


def _plots(runs: list[dict], lines_: list[dict], targets: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["np"] for r in runs if "error" not in r})
    if not sizes:
        return
    fig, axes = plt.subplots(1, len(sizes), figsize=(8 * len(sizes), 6), squeeze=False)
    order = list(dict.fromkeys(r["row"] for r in runs))
    first_seed = min(r["seed"] for r in runs)
    for ax, n in zip(axes[0], sizes):
        for r in [r for r in runs if r["np"] == n and "error" not in r]:
            i = order.index(r["row"])  # 20 distinct colours; the peers and references drawn thicker
            peer = r["row"] in PEERS or r["row"] in ("none", REFERENCE)
            ax.plot([p["train_s"] for p in r["curve"]], [p["valid_ppl"] for p in r["curve"]],
                    color=plt.cm.tab20(i % 20), ls="-" if r["seed"] == first_seed else "--", lw=2.2 if peer else 1,
                    label=_label(r["row"]) if r["seed"] == first_seed else None)
        if str(n) in targets:
            ax.axhline(targets[str(n)], color="k", lw=0.8, ls=":")
            ax.set_ylim(targets[str(n)] * 0.8, targets[str(n)] * 3)
        ax.set_xscale("log")
        ax.set_xlabel("training wall-clock (s)")
        ax.set_ylabel("validation perplexity")
        ax.set_title(f"LSTM, N = {n} (dashed: later seeds; thick: peers and references)")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "perplexity_vs_time.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(sizes), figsize=(7 * len(sizes), 5), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        mine = [x for x in lines_ if x["np"] == n]
        ax.barh(range(len(mine)), [x["mean_s"] or 0 for x in mine],
                color=["0.6" if x["row"] in PEERS or x["row"] in ("none", REFERENCE) else "C0" for x in mine])
        for i, x in enumerate(mine):
            if x["mean_s"] is None:
                ax.text(0, i, " not reached / failed", va="center", fontsize=7)
        ax.set_yticks(range(len(mine)), [x["row"] for x in mine], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("mean time to target over the seeds (s); grey: peers and references")
        ax.set_title(f"LSTM, N = {n}")
    fig.tight_layout()
    fig.savefig(out / "time_to_target.png", dpi=110)
    plt.close(fig)


def run_one(row: str, n: int, seed: int, target: float, max_steps: int, args, out: Path, rate: str) -> dict:
    """One training run on the cluster as it is (up at ``rate``); its rank-0 record."""
    cell_dir = out / "cells" / f"np{n}-{row}-seed{seed}"
    if cell_dir.exists():
        shutil.rmtree(cell_dir)
    cell_dir.mkdir(parents=True)
    compressor = "none" if row == REFERENCE else row
    common = ["--compressor", compressor, "--size", args.size, "--target", str(target), "--max-steps",
              str(max_steps), "--eval-every", str(args.eval_every), "--eval-tokens", str(args.eval_tokens),
              "--batch-size", str(args.batch_size), "--seed", str(seed), "--out", str(cell_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    horovod = COMPRESSORS[compressor].path != "ddp"
    if horovod and args.horovod_cycle_ms:
        env["HOROVOD_CYCLE_TIME"] = str(args.horovod_cycle_ms)
    if horovod:
        rc, text = _run([str(CLUSTER), "run", "-np", str(n), sys.executable, "-m", "benchmarks.tq_worker", *common],
                        args.run_timeout, env)
    else:
        rc, text = run_on_nodes("benchmarks.tq_worker", common, n, args.run_timeout, env)
    (cell_dir / "log.txt").write_text(text)
    base = {"np": n, "row": row, "seed": seed, "rate": rate, "target": target,
            "horovod_cycle_ms": args.horovod_cycle_ms if horovod else None}
    if rc != 0:
        record = dict(base, error=text[-1500:] or f"exit status {rc}")
    else:
        ranks = [json.loads((cell_dir / f"rank{r}.json").read_text()) for r in range(n)]
        record = dict(ranks[0], **base)
        record["train_s_ranks"] = [r["train_s"] for r in ranks]
    keep_cell(out, cell_dir)
    return record


def _up(n: int, rate: str, delay: str) -> str | None:
    rc, text = _run([str(CLUSTER), "up", "--nodes", str(n), "--rate", rate, "--delay", delay], 180)
    return None if rc == 0 else f"cluster up failed: {text[-500:]}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--np", default="2", help="comma-separated numbers of nodes")
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--delay", default="0")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated names of workloads.tasks")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--size", choices=("study", "bench"), default="study")
    ap.add_argument("--ref-steps", type=int, default=400, help="the reference's steps (the target's step)")
    ap.add_argument("--target-factor", type=float, default=1.05)
    ap.add_argument("--target", type=float, default=None, help="a fixed target perplexity (skips the reference's)")
    ap.add_argument("--max-steps", type=int, default=1200, help="step cap of every row")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-tokens", type=int, default=20_000)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--run-timeout", type=float, default=3600)
    ap.add_argument("--horovod-cycle-ms", type=float, default=None,
                    help="HOROVOD_CYCLE_TIME of the Horovod rows (default: Horovod's, 1 ms); on nodes with fewer "
                         "cores than threads a longer cycle leaves the compute more of them")
    ap.add_argument("--out", default="docs/results/time_to_quality")
    ap.add_argument("--merge", action="store_true", help="keep the runs of --out/results.json not redone")
    provenance.add_argument(ap)
    args = ap.parse_args(argv)
    rows = [compressor_name(r) for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in (*BENCH_COMPRESSORS, *DDP_COMPRESSORS)]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join((*BENCH_COMPRESSORS, *DDP_COMPRESSORS))}")
    sizes, seeds = [int(n) for n in args.np.split(",")], [int(s) for s in args.seeds.split(",")]
    if min(sizes) < 2:
        raise SystemExit("--np must be at least 2 (Horovod registers no hooks in a 1-process job)")
    if args.ref_steps % args.eval_every:
        raise SystemExit("--ref-steps must be a multiple of --eval-every (the target is read at that evaluation)")
    if os.geteuid() != 0:
        raise SystemExit("the benchmark brings up network namespaces: run it as root")
    out = Path(args.out)
    commit = provenance.commit(args.allow_dirty, outputs=[out])
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    targets: dict[str, float] = {}
    if args.merge and (out / "results.json").exists():
        old = json.loads((out / "results.json").read_text())
        redo = {(n, r, s) for n in sizes for r in [REFERENCE, *rows] for s in seeds}
        runs = [r for r in old["runs"] if (r["np"], r["row"], r["seed"]) not in redo]
        targets = dict(old.get("targets", {}))  # a later seed is scored against the target already set
    started = time.perf_counter()
    bar = Progress(len(sizes) * len(seeds) * (len(rows) + 1), "runs")

    def record(run: dict) -> None:
        run.setdefault("commit", commit)
        runs.append(run)
        if "error" in run:
            bar.write(f"np {run['np']} {run['row']} seed {run['seed']}: failed; going on")
        else:
            hit = time_to_target(run["curve"], run["target"]) if run["target"] else None
            got = f"target in {hit['train_s']:.1f} s" if hit else ("diverged" if run.get("diverged") else
                                                                      f"{run['curve'][-1]['valid_ppl']:.1f} ppl")
            bar.write(f"np {run['np']} {run['row']} seed {run['seed']}: {got} ({run['s_per_step']:.3f} s/step)")
        bar.update()
        write_report(runs, targets, args, out, time.perf_counter() - started, commit)

    with held(say=bar.write):
        try:
            for n in sizes:
                failed = _up(n, "none", "0")
                refs = []
                for seed in seeds:
                    bar.set_postfix(f"np {n} reference seed {seed}")
                    steps = args.ref_steps if args.target is None else args.max_steps
                    ref = (run_one(REFERENCE, n, seed, args.target or 0.0, steps, args, out, "none") if not failed
                           else {"np": n, "row": REFERENCE, "seed": seed, "rate": "none", "target": 0.0,
                                 "error": failed})
                    ref.setdefault("commit", commit)
                    refs.append(ref)
                    runs.append(ref)
                    bar.update()
                if args.target is not None:
                    targets[str(n)] = args.target
                elif str(n) in targets:
                    pass  # --merge: the earlier seeds' target stays
                elif all("error" not in r for r in refs):
                    targets[str(n)] = target_from(refs, args.ref_steps, args.target_factor)
                else:
                    bar.write(f"np {n}: the reference failed, no target; skipping N = {n}")
                    write_report(runs, targets, args, out, time.perf_counter() - started, commit)
                    continue
                for r in refs:  # the reference's time to the target, from its own curve
                    r["target"] = targets[str(n)]
                bar.write(f"np {n}: target perplexity {targets[str(n)]:.2f}")
                write_report(runs, targets, args, out, time.perf_counter() - started, commit)
                failed = _up(n, args.rate, args.delay)
                for seed in seeds:
                    for row in rows:
                        bar.set_postfix(f"np {n} {row} seed {seed}")
                        record(run_one(row, n, seed, targets[str(n)], args.max_steps, args, out, args.rate)
                               if not failed else {"np": n, "row": row, "seed": seed, "rate": args.rate,
                                                   "target": targets[str(n)], "error": failed})
        finally:
            _run([str(CLUSTER), "down"], 120)
            bar.close()
    write_report(runs, targets, args, out, time.perf_counter() - started, commit)
    print(f"wrote {out / 'TQ.md'}, {out / 'results.json'}, {out / 'perplexity_vs_time.png'}, "
          f"{out / 'time_to_target.png'}")


if __name__ == "__main__":
    main()
