"""Soak: many steps on 4 ranks with the codebook changing every few steps, then the health checks.

    .venv/bin/python -m benchmarks.soak --np 4 --steps 500 --out docs/results/soak

Runs ``soak_worker`` under ``horovodrun -np N -H localhost:N`` (``benchmarks.procs``) and checks: the job
ends cleanly; no codebook mismatch (the frames' version/digest check would have stopped it) and the
per-step codebook digests agree on every rank; parameters identical on every rank; losses finite;
resident memory after warm-up grows by less than ``--rss-margin-mb``; open file descriptors and
threads are the same at the end as after warm-up. Writes results.json and SOAK.md (with the
commit) into ``--out``, the job's raw output and rank<i>.json into ``--out``/run.jsonl.gz; exits
non-zero when a check fails.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from benchmarks import procs, provenance
from benchmarks.archive import Archive


def run(np: int, steps: int, interval: int, out: Path, timeout: float, mode: str = "mpi") -> dict:
    scratch = out / "ranks"  # the ranks' files while the job runs; then in out/run.jsonl.gz
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    cmd, env = procs.horovodrun_command(["-m", "benchmarks.soak_worker"], "--steps", steps, "--interval", interval,
                                        "--out", scratch, np=np, mode=mode)
    env["OMP_NUM_THREADS"] = "1"
    res = procs.run(cmd, timeout=timeout, env=env)  # the whole job (horovodrun, mpirun, the ranks) in one group
    (scratch / "log.txt").write_text(res.output)
    archive = Archive(out / "run.jsonl.gz")
    archive.drop("soak")
    archive.put_dir("soak", scratch)
    archive.save()
    if res.timed_out:
        raise RuntimeError(f"the soak job did not finish within {timeout:.0f} s (killed):\n{res.output[-4000:]}")
    if res.returncode != 0:
        raise RuntimeError(f"the soak job failed (exit {res.returncode}):\n{res.output[-4000:]}")
    ranks = [json.loads((scratch / f"rank{r}.json").read_text()) for r in range(np)]
    shutil.rmtree(scratch)
    return {"ranks": ranks, "wall_s": res.seconds, "np": np, "steps": steps, "mode": mode}


def checks(res: dict, warm_fraction: float = 0.2, rss_margin_mb: float = 16.0) -> dict:
    """Pass/fail of each health check, with the figures behind it."""
    ranks = res["ranks"]
    out = {
        "codebook_disagreements": sum(r["codebook_disagreements"] for r in ranks),
        "param_digests_equal": all(r["param_digests_equal"] for r in ranks),
        "losses_finite": all(r["finite"] for r in ranks),
        "codebook_versions": ranks[0]["codebook_versions"],
        "allocations": ranks[0]["allocations"],
        "bits_seen": ranks[0]["bits_seen"],
        "memory": [],
    }
    growth_ok, handles_ok = True, True
    for r in ranks:
        samples = r["samples"]
        warm = next(s for s in samples if s["step"] >= warm_fraction * r["steps"]) if len(samples) > 1 else samples[0]
        last = samples[-1]
        peak = max(s["rss_kb"] for s in samples if s["step"] >= warm["step"])
        growth = (peak - warm["rss_kb"]) / 1024
        out["memory"].append({"rank": r["rank"], "warm_step": warm["step"], "rss_warm_mb": warm["rss_kb"] / 1024,
                              "rss_end_mb": last["rss_kb"] / 1024, "rss_peak_growth_mb": growth,
                              "fds": [warm["fds"], last["fds"]], "threads": [warm["threads"], last["threads"]]})
        growth_ok &= growth < rss_margin_mb
        handles_ok &= warm["fds"] == last["fds"] and warm["threads"] == last["threads"]
    out["passed"] = {
        "no codebook disagreement": out["codebook_disagreements"] == 0,
        "identical parameters": out["param_digests_equal"],
        "finite losses": out["losses_finite"],
        "codebook changed": out["codebook_versions"] >= res["steps"] // (2 * ranks[0]["interval"]),
        f"resident memory growth after warm-up < {rss_margin_mb:g} MB": growth_ok,
        "no leaked file descriptors or threads": handles_ok,
    }
    return out


def write_report(res: dict, chk: dict, out: Path, argv: list[str], commit: str = provenance.NOT_RECORDED) -> None:
    (out / "results.json").write_text(json.dumps({"run": res, "checks": chk, "argv": argv, "commit": commit},
                                                 indent=1))
    r0 = res["ranks"][0]
    shown = [a for a in argv if a != "--allow-dirty"]
    lines = ["# Soak (measured)", "", f"Command: `.venv/bin/python -m benchmarks.soak {' '.join(shown)}` "
             f"({res['wall_s']:.0f} s wall; commit {commit}).", "",
             f"{res['np']} ranks (`horovodrun --{res['mode']}` on this machine), {res['steps']} steps of "
             f"hvd_gradq.DistributedOptimizer (shared_scale codec, op=Sum) on an MLP with float32, float64 and float16 "
             f"layers; transports drawn at random per layer: {r0['transports']}; rank 0's allocator (MSE, greedy) "
             f"every {r0['interval']} steps with a budget drawn from 0.5-6 bits/element.", "",
             "| check | result |", "|---|---|"]
    lines += [f"| {k} | {'pass' if v else 'FAIL'} |" for k, v in chk["passed"].items()]
    lines += ["", f"Codebook versions: {chk['codebook_versions']} ({chk['allocations']} allocations); bit widths "
              f"used: {chk['bits_seen']}; codebook disagreements between ranks: {chk['codebook_disagreements']}; "
              f"loss {r0['first_loss']:.3f} -> {r0['last_loss']:.3f} (mean of the last 20 steps).", "",
              "| rank | RSS after warm-up (MB) | RSS at end (MB) | peak growth (MB) | fds warm/end "
              "| threads warm/end |",
              "|---|---|---|---|---|---|"]
    for m in chk["memory"]:
        lines.append(f"| {m['rank']} | {m['rss_warm_mb']:.1f} (step {m['warm_step']}) | {m['rss_end_mb']:.1f} | "
                     f"{m['rss_peak_growth_mb']:.2f} | {m['fds'][0]}/{m['fds'][1]} | "
                     f"{m['threads'][0]}/{m['threads'][1]} |")
    (out / "SOAK.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--np", type=int, default=4)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--interval", type=int, default=3)
    ap.add_argument("--mode", choices=["mpi", "gloo"], default="mpi")
    ap.add_argument("--rss-margin-mb", type=float, default=16.0)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", default="docs/results/soak")
    provenance.add_argument(ap)
    args = ap.parse_args(argv)
    if args.np < 2:
        raise SystemExit("--np must be at least 2 (Horovod registers no hooks in a 1-process job)")
    out = Path(args.out)
    commit = provenance.commit(args.allow_dirty, outputs=[out])
    res = run(args.np, args.steps, args.interval, out, args.timeout, args.mode)
    chk = checks(res, rss_margin_mb=args.rss_margin_mb)
    write_report(res, chk, out, sys.argv[1:] if argv is None else list(argv), commit)
    for k, v in chk["passed"].items():
        print(f"{'pass' if v else 'FAIL'}: {k}")
    print(f"wrote {out / 'SOAK.md'}")
    return 0 if all(chk["passed"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
