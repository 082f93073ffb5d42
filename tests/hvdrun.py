"""Launch real ``horovodrun`` jobs from pytest, with a hard timeout so a hang fails fast.

The process-group runner and the horovodrun command are the project's one copy,
``benchmarks.procs`` (the repository root goes first on PYTHONPATH, so the workers under
``tests/workers/`` import ``workloads``); this module adds the test's rule: a timeout fails.
"""
from __future__ import annotations

import json
import os
import stat
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks.procs import ROOT, horovodrun_command, run
from benchmarks.procs import Result as Run

WORKERS = ROOT / "tests" / "workers"
__all__ = ["ROOT", "WORKERS", "Run", "elastic_horovodrun", "horovodrun", "horovodrun_command", "run_command",
           "worker_records"]


def horovodrun(script: str | Path, *args: str, np: int = 2, mode: str = "mpi", timeout: float = 180) -> Run:
    """Run ``horovodrun -np N -H localhost:N --<mode> python script args`` and return its result.

    Uses the horovodrun and python of the running interpreter's environment. As root, sets the
    two variables Open MPI needs. On timeout the whole process group is killed and the test fails.
    """
    cmd, env = horovodrun_command(script, *args, np=np, mode=mode)
    return run_command(cmd, timeout=timeout, env=env)


def run_command(cmd, *, timeout: float, env: dict | None = None) -> Run:
    """Run ``cmd`` in its own process group from the repository root; on timeout kill the whole
    group and fail the test. Nothing it started outlives it."""
    res = run(cmd, timeout=timeout, env=env)
    if res.timed_out:
        raise AssertionError(f"{cmd[0]} did not finish within {timeout}s (killed):\n{res.output[-6000:]}")
    return res


def elastic_horovodrun(tmp_path: Path, script: str | Path, *args: str, np: int, min_np: int, max_np: int,
                       timeout: float) -> Run:
    """An elastic job (``--min-np``/``--max-np`` with a host discovery script that prints
    ``tmp_path/hosts``, which the worker rewrites to resize the job) of ``script --out tmp_path
    --hosts tmp_path/hosts`` (then ``args``). Elastic runs on Gloo; on this machine its interface probe hangs
    unless told the interface."""
    hosts = tmp_path / "hosts"
    hosts.write_text(f"localhost:{np}\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(discover.stat().st_mode | stat.S_IEXEC)
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")
    cmd = [bindir / "horovodrun", "-np", str(np), "--min-np", str(min_np), "--max-np", str(max_np),
           "--host-discovery-script", discover, "--network-interface", "lo", sys.executable, script,
           "--out", tmp_path, "--hosts", hosts, *args]
    return run_command(cmd, timeout=timeout, env=env)


def worker_records(tmp_path: Path) -> dict[int, list[dict]]:
    """The JSON lines every elastic worker appended to its ``worker-<pid>.jsonl``, by step."""
    by_step = defaultdict(list)
    for f in tmp_path.glob("worker-*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            by_step[rec["step"]].append(rec)
    return by_step
