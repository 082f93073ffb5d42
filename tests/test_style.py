"""The code base stays ruff-clean (configuration in pyproject.toml)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "hvd_gradq", "tests", "examples", "setup.py",
                          "benchmarks", "workloads"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
