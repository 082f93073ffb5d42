"""The emulated cluster (launch/cluster.sh): namespaces + sshd + tc, a 2-node horovodrun job on a
shaped link, bytes counted by the kernel, and a tear-down that leaves nothing behind."""
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from benchmarks.cluster import BUSY, CLUSTER, HELD, ClusterBusy, held
from tests.hvdrun import ROOT, WORKERS, run_command


def sh(*cmd, timeout=240, check=True) -> str:
    run = run_command(cmd, timeout=timeout)
    if check and run.returncode != 0:
        raise AssertionError(f"{cmd} exited {run.returncode}:\n{run.output[-4000:]}")
    return run.output


def namespaces_allowed() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces, bridges and tc need root; run the tests as root to include this one"
    probe = subprocess.run(["ip", "netns", "add", "hvdgq-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"this machine refuses network namespaces ({probe.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", "hvdgq-probe"], capture_output=True)
    return None


def leftovers() -> list[str]:
    found = [ln for ln in sh("ip", "netns", "list").splitlines() if ln.startswith("hvdgq")]
    if subprocess.run(["ip", "link", "show", "hvdgq-br"], capture_output=True).returncode == 0:
        found.append("bridge hvdgq-br")
    found += [str(p) for p in Path("/etc/netns").glob("hvdgq*")] if Path("/etc/netns").exists() else []
    sshd = subprocess.run(["pgrep", "-f", "cluster/host_ed25519"], capture_output=True, text=True)
    found += [f"sshd pid {p}" for p in sshd.stdout.split()]
    return found


@contextmanager
def cluster_or_skip():
    """Hold the emulated cluster for the block (as the benchmark drivers do); skip if this machine
    cannot make namespaces or another job (a benchmark sweep) holds the cluster."""
    reason = namespaces_allowed()
    if reason:
        pytest.skip(reason)
    try:
        with held(wait=False):
            yield
    except ClusterBusy as e:
        pytest.skip(str(e))


def test_two_node_job_on_a_shaped_link_sends_the_predicted_compressed_bytes(tmp_path):
    with cluster_or_skip():
        try:
            sh(CLUSTER, "up", "--nodes", "2", "--rate", "500mbit", timeout=180)
            status = sh(CLUSTER, "status")
            assert "hvdgq1 hvdgq2" in status and "rate=500mbit" in status
            sh(CLUSTER, "run", "-np", "2", ROOT / ".venv" / "bin" / "python", WORKERS / "cluster_check.py",
               "--out", tmp_path, timeout=300)
            ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
        finally:
            sh(CLUSTER, "down", timeout=60, check=False)
    assert leftovers() == [], "tear-down left things behind"
    for res in ranks:
        comp, fp32 = res["uniform2"], res["fp32"]
        # ring allreduce at N = 2: each rank sends its payload once; the kernel counts headers too
        assert comp["tx_per_step"] <= 1.05 * comp["payload_per_step"], res
        assert comp["tx_per_step"] <= fp32["tx_per_step"] / 4, res
        assert comp["payload_per_step"] * 8 < fp32["payload_per_step"], res


def test_a_held_cluster_is_refused_to_every_other_job():
    """While a job holds the cluster, up / down / run from another one exit 75 naming the holder and
    touch nothing; the holder's children pass; a second holder fails fast; status still answers."""
    with cluster_or_skip():
        other = {k: v for k, v in os.environ.items() if k != HELD}
        for cmd in (["up", "--nodes", "2", "--rate", "500mbit"], ["down"], ["run", "-np", "2", "true"]):
            run = subprocess.run([CLUSTER, *cmd], env=other, capture_output=True, text=True, timeout=60)
            assert run.returncode == BUSY, (cmd, run.returncode, run.stderr)
            assert "busy" in run.stderr and f"pid {os.getpid()}" in run.stderr, run.stderr
        assert leftovers() == [], "a refused command brought pieces up"
        assert subprocess.run([CLUSTER, "status"], env=other, capture_output=True, timeout=60).returncode == 0
        second = [sys.executable, "-c", "from benchmarks.cluster import held\nwith held(wait=False): pass"]
        run = subprocess.run(second, env=other, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert run.returncode != 0 and "ClusterBusy" in run.stderr, run.stderr
        assert subprocess.run([CLUSTER, "down"], capture_output=True, timeout=60).returncode == 0  # ours pass
    run = subprocess.run(second, env=other, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr  # released: the next job takes it
