#!/usr/bin/env bash
# The test suite: set up (if needed), then pytest, including the tests that launch horovodrun
# with 2 processes (--mpi and --gloo). Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HVD_GRADQ_VENV:-$ROOT/.venv}
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest tests "$@"
