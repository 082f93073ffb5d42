"""Running the study's rows: each a process group of ``benchmarks.procs``, ``jobs`` at a time (a
real horovodrun row alone), killed at the timeout; when a row ends its log, status and output go
into the archive (``<out>/runs.jsonl.gz``) and the report is rewritten."""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from benchmarks import procs
from benchmarks.archive import Archive
from benchmarks.provenance import NOT_RECORDED
from benchmarks.study.grid import ARCHIVE, SCRATCH, Grid, Row, log_arg
from benchmarks.study.report import write_report
from workloads.progress import Progress


@dataclass
class _Job:
    row: Row
    group: procs.Group | None  # None: it could not be started
    started: float
    text: IO[str]


def _scratch(out: Path, row_id: str) -> dict[str, Path]:
    return {suffix: out / SCRATCH / f"{row_id}{suffix}" for suffix in (".json", ".txt")}


def _start(row: Row, out: Path, smoke: bool) -> _Job:
    files = _scratch(out, row.id)
    files[".json"].parent.mkdir(parents=True, exist_ok=True)
    for path in files.values():
        path.unlink(missing_ok=True)
    cmd = row.command(log_arg(out, row.id), python=sys.executable, smoke=smoke)
    text = open(files[".txt"], "w")  # noqa: SIM115 (closed when the job ends)
    text.write("$ " + " ".join(shlex.quote(a) for a in cmd) + "\n")
    text.flush()
    try:
        group = procs.start(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=text)
    except OSError as e:  # e.g. no launcher: the row fails, the run goes on
        text.write(f"could not start: {e}\n")
        group = None
    return _Job(row, group, time.monotonic(), text)


def _kill(job: _Job) -> None:
    if job.group is not None:
        job.group.kill()


def _finish(job: _Job, rc: int, out: Path, smoke: bool, timed_out: bool, commit: str) -> dict:
    """Close the row's output, fold its files into the archive, remove them; its status."""
    seconds = time.monotonic() - job.started
    if timed_out:
        job.text.write(f"\n[timed out after {seconds:.0f} s: process group killed]\n")
    job.text.close()
    if job.group is not None:
        job.group.kill()  # anything the row left behind
    rid, files = job.row.id, _scratch(out, job.row.id)
    ok = rc == 0 and files[".json"].exists()
    status = {"id": rid, "rc": rc, "ok": ok, "seconds": seconds, "timed_out": timed_out, "smoke": smoke,
              "commit": commit}
    archive = Archive(out / ARCHIVE)
    archive.drop(rid)
    if files[".txt"].exists():
        archive.put(rid, f"{rid}.txt", files[".txt"].read_text(errors="replace"))
    if files[".json"].exists():
        text = files[".json"].read_text(errors="replace")
        try:
            archive.put(rid, f"{rid}.json", json.loads(text))
        except json.JSONDecodeError:  # cut short: kept as text (the row is not done)
            archive.put(rid, f"{rid}.json", text)
    archive.put(rid, f"{rid}.status.json", status)
    archive.save()
    for path in files.values():
        path.unlink(missing_ok=True)
    with_runs = out / SCRATCH
    if with_runs.is_dir() and not any(with_runs.iterdir()):
        with_runs.rmdir()
    return status


def run_rows(rows: list[Row], out: Path, results: Path, *, jobs: int = 2, timeout: float = 3600,
             redo: bool = False, smoke: bool = False, grid: Grid | None = None,
             commit: str = NOT_RECORDED) -> list[dict]:
    """Run the rows not done yet (all of them with ``redo``), ``jobs`` at a time in the given order,
    a real job alone; rewrite the report after each. Returns the status of every finished row."""
    if jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    archive = Archive(out / ARCHIVE)
    queue = [r for r in rows if redo or archive.get(r.id, f"{r.id}.json") is None]
    if len(queue) < len(rows):
        print(f"{len(rows) - len(queue)} of {len(rows)} rows already done (--redo runs them again)")
    running: list[_Job] = []
    finished: list[dict] = []
    bar = Progress(len(queue), "rows")
    try:
        while queue or running:
            while queue and len(running) < jobs and not any(j.row.exclusive for j in running):
                if queue[0].exclusive and running:
                    break
                running.append(_start(queue.pop(0), out, smoke))
            now = " ".join(j.row.id for j in running)
            if now != bar.postfix:
                bar.set_postfix(now)
            time.sleep(1.0)
            for job in list(running):
                rc = job.group.poll() if job.group is not None else 127
                timed_out = rc is None and time.monotonic() - job.started > timeout
                if timed_out:
                    _kill(job)
                    rc = procs.TIMED_OUT
                if rc is None:
                    continue
                running.remove(job)
                status = _finish(job, rc, out, smoke, timed_out, commit)
                finished.append(status)
                bar.write(f"{job.row.id}: {'done' if status['ok'] else 'FAILED (rc ' + str(rc) + ')'} "
                          f"in {status['seconds']:.0f} s")
                bar.update()
                try:
                    write_report(out, results, grid, commit)
                except Exception as e:  # a report bug must not stop the runs; `report` shows it again
                    bar.write(f"report failed: {type(e).__name__}: {e}")
    finally:
        for job in running:  # interrupted: leave no training behind
            _kill(job)
            job.text.close()
        bar.close()
    return finished
