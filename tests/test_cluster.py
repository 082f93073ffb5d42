"""The emulated cluster (launch/cluster.sh): namespaces + sshd + tc, a 2-node horovodrun job on a
shaped link, bytes counted by the kernel, and a tear-down that leaves nothing behind."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.hvdrun import ROOT, WORKERS, run_command

CLUSTER = ROOT / "launch" / "cluster.sh"


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


def test_two_node_job_on_a_shaped_link_sends_the_predicted_compressed_bytes(tmp_path):
    reason = namespaces_allowed()
    if reason:
        pytest.skip(reason)
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
