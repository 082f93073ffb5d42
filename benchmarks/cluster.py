"""The emulated cluster (``launch/cluster.sh``) and who holds it.

The cluster's namespaces, bridge and sshds are one per machine, and ``cluster.sh up`` / ``down``
tear down whatever is there, so two users at once break each other (a test suite started beside a
benchmark sweep tore the sweep's cluster down half-way). A sweep or a test therefore holds
``lock_path()`` (``flock``) for as long as it uses the cluster and marks its children with
``HVD_GRADQ_CLUSTER_HELD=1``; ``cluster.sh`` refuses ``up``, ``down`` and ``run`` from anyone else
while the lock is held (exit status 75, naming the holder).
"""
from __future__ import annotations

import fcntl
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from benchmarks.procs import ROOT

CLUSTER = ROOT / "launch" / "cluster.sh"
HELD = "HVD_GRADQ_CLUSTER_HELD"  # set to "1" in the holder's environment, so its children pass
BUSY = 75  # cluster.sh's exit status when another job holds the cluster


class ClusterBusy(RuntimeError):
    """Another job holds the emulated cluster."""


def lock_path() -> Path:
    """The lock ``cluster.sh`` checks (the same default: ``/run/lock/hvdgq-cluster.lock``)."""
    return Path(os.environ.get("HVD_GRADQ_CLUSTER_LOCK", "/run/lock/hvdgq-cluster.lock"))


@contextmanager
def held(wait: bool = True, say=print):
    """Hold the cluster for the ``with`` block: wait for another holder to finish (``wait``) or raise
    ``ClusterBusy`` naming it. Nested holds (a driver started by a test that holds it) pass through."""
    if os.environ.get(HELD) == "1":
        yield
        return
    path = lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:  # closing it releases the lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            if not wait:
                raise ClusterBusy(f"the emulated cluster is in use ({path}: {holder}); "
                                  "wait for that job to end") from None
            say(f"the emulated cluster is in use ({holder}); waiting for it")
            started = time.monotonic()
            fcntl.flock(f, fcntl.LOCK_EX)
            say(f"the cluster is free after {time.monotonic() - started:.0f} s")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}: {' '.join(sys.argv)[:200]}\n")
        f.flush()
        os.environ[HELD] = "1"
        try:
            yield
        finally:
            os.environ.pop(HELD, None)
            f.seek(0)
            f.truncate()
            f.flush()
