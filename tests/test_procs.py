"""benchmarks.procs, the one process-group runner, and benchmarks.archive, the compacted raw logs."""
import os
import sys
import time
from pathlib import Path

from benchmarks import procs
from benchmarks.archive import Archive


def test_a_command_that_times_out_is_killed_with_everything_it_started(tmp_path):
    pids = tmp_path / "pids"
    script = f"sleep 60 & echo $! > {pids}; echo started; wait"
    res = procs.run(["bash", "-c", script], timeout=2)
    assert res.timed_out and res.returncode == procs.TIMED_OUT and res.seconds < 30
    assert "started" in res.output and "process group killed" in res.output
    pid = int(pids.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)  # SIGKILL is delivered at once; allow for the scheduler
    assert not _alive(pid), "the background sleep outlived its group"


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def test_the_repository_root_goes_first_on_pythonpath():
    env = procs.environment({"PYTHONPATH": "/some/where"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(procs.ROOT), "/some/where"]
    res = procs.run([sys.executable, "-c", "import workloads.tasks, benchmarks.procs; print('ok')"], timeout=60,
                    cwd="/")
    assert res.returncode == 0 and res.output.strip() == "ok", res.output


def test_archive_round_trip(tmp_path):
    a = Archive(tmp_path / "runs.jsonl.gz")
    text = f"$ {procs.ROOT}/.venv/bin/python x.py\nbar\r50%\rdone\n"
    a.put("r1", "r1.txt", text)
    a.put("r1", "r1.json", {"loss": [1.0, 0.5], "path": f"{procs.ROOT}/docs"})
    a.save()
    first = (tmp_path / "runs.jsonl.gz").read_bytes()
    b = Archive(tmp_path / "runs.jsonl.gz")
    assert b.get("r1", "r1.txt") == "$ .venv/bin/python x.py\nbar\r50%\rdone\n"  # repository-relative, exact
    assert b.get("r1", "r1.json") == {"loss": [1.0, 0.5], "path": "docs"}
    b.save()
    assert (tmp_path / "runs.jsonl.gz").read_bytes() == first  # the same logs, the same bytes
