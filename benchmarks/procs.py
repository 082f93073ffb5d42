"""The one way this project starts a command it must be able to stop: the tests' horovodrun jobs,
every benchmark's cells and the study's rows.

A command runs in its own session (so in its own process group) from the repository root, with
the repository root first on ``PYTHONPATH`` (``workloads`` and ``benchmarks`` import from a
checkout, also in the ranks horovodrun starts: it forwards the variable). When it ends, times
out or its caller gives up, the whole group is killed with SIGKILL: horovodrun, mpirun, the
ranks and anything they started. Nothing outlives it.

    res = run([...], timeout=600)               # Result(returncode, output, seconds, timed_out)
    with start([...]) as job:                   # the group, to poll or kill; killed on exit
        ...
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
#: the returncode ``run`` gives a command it killed at its timeout (as coreutils' timeout does)
TIMED_OUT = 124


@dataclass
class Result:
    returncode: int
    output: str
    seconds: float
    timed_out: bool = False


def environment(env: dict | None = None) -> dict:
    """``env`` (default: this process's) with the repository root first on PYTHONPATH; a
    PYTHONPATH already set is kept after it."""
    env = dict(os.environ if env is None else env)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if parts[:1] != [str(ROOT)]:
        parts.insert(0, str(ROOT))
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


class Group:
    """A command started in its own session; ``kill()`` ends the whole process group. Use it as a
    context manager so that the group is killed whatever happens (a finished job's stray
    children included)."""

    def __init__(self, cmd, *, env: dict | None = None, cwd: Path | str = ROOT,
                 stdout: int | IO[str] = subprocess.PIPE) -> None:
        self.cmd = [str(c) for c in cmd]
        self.started = time.monotonic()
        self._output: str | None = None if stdout == subprocess.PIPE else ""
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=environment(env), stdout=stdout,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def poll(self) -> int | None:
        return self.proc.poll()

    def communicate(self, timeout: float | None = None) -> str:
        """Wait for the command to end and return its output (stdout and stderr together);
        raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds, leaving it running."""
        out, _ = self.proc.communicate(timeout=timeout)
        if self._output is None:
            self._output = out or ""
        return self._output

    def kill(self) -> str:
        """SIGKILL to every process of the group; returns whatever output was not read yet."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self._output is None:
            return self.communicate()
        self.proc.wait()
        return ""

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def start(cmd, *, env: dict | None = None, cwd: Path | str = ROOT, stdout: int | IO[str] = subprocess.PIPE) -> Group:
    """Start ``cmd`` in its own process group (output collected, or written to ``stdout``)."""
    return Group(cmd, env=env, cwd=cwd, stdout=stdout)


def run(cmd, *, timeout: float, env: dict | None = None, cwd: Path | str = ROOT) -> Result:
    """Run ``cmd`` to its end or for at most ``timeout`` seconds, then kill its process group.
    A command that timed out gets returncode 124, ``timed_out`` and a last line saying so."""
    with start(cmd, env=env, cwd=cwd) as job:
        try:
            out = job.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out = job.kill() + f"\n[timed out after {timeout:.0f} s: process group killed]\n"
            return Result(TIMED_OUT, out, job.seconds, timed_out=True)
    return Result(job.returncode, out, job.seconds)


def run_all(cmds: list[list], *, timeout: float, env: dict | None = None) -> list[Result]:
    """Run several commands at once (e.g. one per node), each in its own group, all within one
    ``timeout``; a command still running at the deadline is killed (returncode 124)."""
    with contextlib.ExitStack() as stack:
        jobs = [stack.enter_context(start(c, env=env)) for c in cmds]
        deadline = time.monotonic() + timeout
        results = []
        for job in jobs:
            try:
                out = job.communicate(timeout=max(1.0, deadline - time.monotonic()))
                results.append(Result(job.returncode, out, job.seconds))
            except subprocess.TimeoutExpired:
                out = job.kill() + f"\n[timed out after {timeout:.0f} s: process group killed]\n"
                results.append(Result(TIMED_OUT, out, job.seconds, timed_out=True))
    return results


def horovodrun_command(script: str | Path | list[str], *args, np: int = 2, mode: str = "mpi") -> tuple[list[str], dict]:
    """``horovodrun -np N -H localhost:N --<mode> python script args`` and its environment.

    Uses the horovodrun and python of the running interpreter's environment; the repository root
    goes first on PYTHONPATH. As root, sets the two variables Open MPI needs. ``script`` may also
    be what follows python as a list, e.g. ``["-m", "benchmarks.soak_worker"]``."""
    bindir = Path(sys.executable).parent
    env = environment()
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")  # as launch/hvdrun: ranks share cores here
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    program = [*map(str, script)] if isinstance(script, (list, tuple)) else [str(script)]
    cmd = [str(bindir / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", f"--{mode}", sys.executable, *program,
           *map(str, args)]
    return cmd, env
