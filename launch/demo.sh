#!/usr/bin/env bash
# The main job: set up (if needed), then train the Fashion-MNIST CNN on NP=2 local workers with
# 2-bit compression. Extra arguments go to examples/fashion_mnist_cnn.py (try --help).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HVD_GRADQ_VENV:-$ROOT/.venv}
NP=${NP:-2}
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
exec "$ROOT/launch/hvdrun" -np "$NP" -H "localhost:$NP" "$VENV/bin/python" examples/fashion_mnist_cnn.py "$@"
