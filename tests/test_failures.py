"""A worker killed mid-training ends the whole horovodrun job quickly, with the failed rank named;
nothing in hvd_gradq (a pending codebook broadcast, a two-phase exchange) keeps the others waiting."""
import os
import signal
import subprocess
import time

import pytest

from benchmarks import procs
from tests.hvdrun import WORKERS, horovodrun_command

WORKER = WORKERS / "kill_check.py"


@pytest.mark.parametrize("mode", ["mpi", "gloo"])
def test_a_killed_worker_ends_the_job_within_60_s_naming_its_rank(tmp_path, mode):
    cmd, env = horovodrun_command(WORKER, "--out", tmp_path, np=2, mode=mode)
    with procs.start(cmd, env=env) as job:  # its process group is killed on the way out
        deadline = time.monotonic() + 120
        pid_file = tmp_path / "pid1"
        while not pid_file.exists():
            assert job.poll() is None, "the job ended before the kill:\n" + job.communicate()[-4000:]
            assert time.monotonic() < deadline, "rank 1 never reached its third step"
            time.sleep(0.2)
        time.sleep(1.0)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        killed = time.monotonic()
        try:
            out = job.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"horovodrun --{mode} still running 90 s after rank 1 was killed")
        took = time.monotonic() - killed
    assert job.returncode != 0, out[-4000:]
    assert took < 60, f"the job took {took:.0f} s to end after the kill"
    # the launcher names the dead rank: mpirun "process rank 1 ... exited on signal 9", Horovod's
    # Gloo launcher "Process 1 exit with status code 137"
    named = "process rank 1 with PID" if mode == "mpi" else "Process 1 exit with status code"
    assert named in out, out[-4000:]
    print(f"--{mode}: job ended {took:.1f} s after the kill, rc={job.returncode}")
