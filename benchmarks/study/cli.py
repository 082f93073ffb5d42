"""The study's command line: ``python -m benchmarks.study {list,run,report}``."""
from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from benchmarks import provenance
from benchmarks.study import __doc__ as study_doc
from benchmarks.study.grid import ARCHIVE, DEFAULT_OUT, RESULTS, ROOT, TABLES, build_grid, log_arg, plan
from benchmarks.study.report import write_report
from benchmarks.study.results import Results
from benchmarks.study.runner import run_rows


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _paths(args: argparse.Namespace) -> tuple[Path, Path]:
    out = Path(args.out)
    return out, Path(args.results) if args.results else out / RESULTS  # the report beside its runs and plots


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.study", description=study_doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("list", "run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--out", default=DEFAULT_OUT, help=f"logs go to OUT/{ARCHIVE}, plots and the report to OUT")
        if name != "report":
            p.add_argument("--tables", default="", help=f"comma-separated, of {','.join(TABLES)} (default: all)")
            p.add_argument("--seeds", default="", help="also run every selected row at these seeds (after all "
                                                      "rows at their table's own seed)")
            p.add_argument("--extra-seeds", default="", help="also run Table A's rows at these seeds (last)")
            p.add_argument("--only", default="", help="comma-separated row ids")
            p.add_argument("--smoke", action="store_true",
                           help="append a few-step limit to every command (plumbing check; not with the default "
                                "--out)")
        if name != "list":
            p.add_argument("--results", default="", help=f"the markdown report (default: OUT/{RESULTS})")
            provenance.add_argument(p)
        if name == "run":
            p.add_argument("--jobs", type=int, default=2, help="rows at a time (a real horovodrun row runs alone)")
            p.add_argument("--timeout", type=float, default=3600, help="seconds per row before it is killed")
            p.add_argument("--redo", action="store_true", help="run selected rows even if their log exists")
    args = ap.parse_args(argv)
    grid = build_grid()
    out, results = _paths(args) if args.cmd != "list" else (Path(args.out), None)
    if args.cmd == "report":
        commit = provenance.commit(args.allow_dirty, outputs=[out, results])
        write_report(out, results, grid, commit)
        print(f"wrote {results} and the plots in {out}")
        return
    rows = plan(grid, set(_names(args.tables)) or None, _ints(args.seeds), _ints(args.extra_seeds),
                _names(args.only) or None)
    if args.cmd == "list":
        res = Results(out, grid)
        for r in rows:
            print(f"{r.id}  [{','.join(r.tables)}]  {res.status(r.id)}\n    "
                  + " ".join(shlex.quote(a) for a in r.command(log_arg(out, r.id), smoke=args.smoke)))
        return
    if args.smoke and out.resolve() == (ROOT / DEFAULT_OUT).resolve():
        raise SystemExit(f"--smoke runs must not land in {DEFAULT_OUT}: give a scratch --out")
    commit = provenance.commit(args.allow_dirty, outputs=[out, results])
    started = time.monotonic()
    finished = run_rows(rows, out, results, jobs=args.jobs, timeout=args.timeout, redo=args.redo, smoke=args.smoke,
                        grid=grid, commit=commit)
    write_report(out, results, grid, commit)
    bad = [s["id"] for s in finished if not s["ok"]]
    print(f"{len(finished)} rows in {(time.monotonic() - started) / 60:.1f} min"
          + (f"; failed: {', '.join(bad)}" if bad else "") + f"; wrote {results}")
