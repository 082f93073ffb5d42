"""Launch real ``horovodrun`` jobs from pytest, with a hard timeout so a hang fails fast."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "workers"


@dataclass
class Run:
    returncode: int
    output: str
    seconds: float


def horovodrun(script: str | Path, *args: str, np: int = 2, mode: str = "mpi", timeout: float = 180) -> Run:
    """Run ``horovodrun -np N -H localhost:N --<mode> python script args`` and return its result.

    Uses the horovodrun and python of the running interpreter's environment. As root, sets the
    two variables Open MPI needs. On timeout the whole process group is killed and the test fails.
    """
    cmd, env = horovodrun_command(script, *args, np=np, mode=mode)
    return run_command(cmd, timeout=timeout, env=env)


def horovodrun_command(script: str | Path, *args: str, np: int = 2, mode: str = "mpi") -> tuple[list[str], dict]:
    """The command line and environment ``horovodrun`` uses (for tests that start it themselves)."""
    bindir = Path(sys.executable).parent
    env = dict(os.environ)
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [str(bindir / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", f"--{mode}",
           sys.executable, str(script), *map(str, args)]
    return cmd, env


def run_command(cmd, *, timeout: float, env: dict | None = None) -> Run:
    """Run ``cmd`` in its own process group from the repository root; on timeout kill the whole
    group and fail the test. Nothing it started outlives it."""
    start = time.monotonic()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{cmd[0]} did not finish within {timeout}s (killed):\n{out[-6000:]}") from exc
    finally:
        with contextlib.suppress(ProcessLookupError):  # leave no stray workers behind
            os.killpg(proc.pid, signal.SIGKILL)
    return Run(proc.returncode, out, time.monotonic() - start)
