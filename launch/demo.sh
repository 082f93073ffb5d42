#!/usr/bin/env bash
# The main job: set up (if needed), then train the Fashion-MNIST CNN on NP=2 local workers through
# Horovod's own hvd.DistributedOptimizer with compression=hvd_gradq.Compressor: the rotated code, bit
# widths per layer chosen by the rank-0 allocator (first-order LAD, 2 bits per element on average,
# 0 = a layer is not sent), reallocated when the trigger fires; every layer's bits are printed at the
# end. Extra arguments go to examples/fashion_mnist_cnn.py (try --help); with --compressor or
# --allocator among them, these defaults are left out (e.g. --compressor none: no compression).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HVD_GRADQ_VENV:-$ROOT/.venv}
NP=${NP:-2}
DEFAULTS=(--compressor rotated --allocator lad_first_order --budget 2 --options 0,2,3,4,6,8)
for arg in "$@"; do
  case "$arg" in --compressor|--compressor=*|--allocator|--allocator=*) DEFAULTS=() ;; esac
done
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
exec "$ROOT/launch/hvdrun" -np "$NP" -H "localhost:$NP" "$VENV/bin/python" examples/fashion_mnist_cnn.py \
  ${DEFAULTS[@]+"${DEFAULTS[@]}"} "$@"
