#!/usr/bin/env bash
# One-command, idempotent set-up of everything hvd_gradq needs on a Debian/Ubuntu machine:
#   1. Debian packages: Open MPI (libopenmpi-dev openmpi-bin), a C++ toolchain and cmake;
#   2. Fashion-MNIST from Debian's dataset-fashion-mnist (apt when root, else
#      apt-get download + dpkg -x into the cache directory);
#   3. a virtual environment (.venv in the repo, or $HVD_GRADQ_VENV) with torch==2.13.0 (CPU),
#      mpi4py, pytest, tqdm and Horovod's build dependencies;
#   4. Horovod 0.28.1 built with PyTorch + MPI + Gloo (see build_horovod below), cached as a
#      wheel so that a second set-up takes seconds;
#   5. hvd_gradq itself, editable (pip install -e .).
# Each step checks first and does nothing when its result is already there.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HVD_GRADQ_VENV:-$ROOT/.venv}
CACHE=${HVD_GRADQ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvd_gradq}
HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0

say() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

is_root() { [ "$(id -u)" = 0 ]; }

apt_install() {  # apt_install PKG...  (root only; runs apt-get update once per set-up)
  if [ -z "${_APT_UPDATED:-}" ]; then
    say "apt-get update"
    apt-get update -qq
    _APT_UPDATED=1
  fi
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---- 1. system packages ----------------------------------------------------------------------
missing=()
for pkg in libopenmpi-dev openmpi-bin; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
command -v gcc >/dev/null || missing+=(gcc)  # also builds hvd_gradq's C codec kernels
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
command -v cmake >/dev/null || missing+=(cmake)
if [ ${#missing[@]} -gt 0 ]; then
  if is_root; then
    apt_install "${missing[@]}"
  else
    die "missing system packages: ${missing[*]}. Install them with: sudo apt-get install ${missing[*]}"
  fi
else
  say "Open MPI, gcc, g++, make, cmake: present"
fi

# ---- 2. Fashion-MNIST (offline, from Debian) -------------------------------------------------
FMNIST_SYS=/usr/share/datasets/fashion-mnist
FMNIST_CACHE=$CACHE/debroot/usr/share/datasets/fashion-mnist
if [ -f "$FMNIST_SYS/t10k-labels-idx1-ubyte.gz" ] || [ -f "$FMNIST_CACHE/t10k-labels-idx1-ubyte.gz" ]; then
  say "Fashion-MNIST: present"
elif is_root; then
  apt_install dataset-fashion-mnist
else
  say "Fashion-MNIST: apt-get download dataset-fashion-mnist into $CACHE/debroot (no root needed)"
  mkdir -p "$CACHE/debs" "$CACHE/debroot"
  (cd "$CACHE/debs" && apt-get download dataset-fashion-mnist) \
    || die "apt-get download failed; try: apt-get update (as root), or sudo apt-get install dataset-fashion-mnist"
  dpkg -x "$CACHE"/debs/dataset-fashion-mnist_*.deb "$CACHE/debroot"
fi

# ---- 2b. Jane Austen's novels (offline, from Debian's r-cran-janeaustenr, without R) -----------
# Only the data file is needed; installing the package would pull in R, so it is unpacked into
# the cache with apt-get download + dpkg -x (root or not).
AUSTEN_CACHE=$CACHE/debroot/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb
if [ -f /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb ] || [ -f "$AUSTEN_CACHE" ]; then
  say "Jane Austen corpus: present"
else
  say "Jane Austen corpus: apt-get download r-cran-janeaustenr into $CACHE/debroot (the data file only)"
  mkdir -p "$CACHE/debs" "$CACHE/debroot"
  (cd "$CACHE/debs" && apt-get download r-cran-janeaustenr 2>/dev/null) \
    || die "apt-get download r-cran-janeaustenr failed; try: apt-get update (as root)"
  dpkg -x "$CACHE"/debs/r-cran-janeaustenr_*.deb "$CACHE/debroot"
fi

# ---- 3. virtual environment --------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  PY=${PYTHON:-}
  if [ -z "$PY" ]; then
    for cand in python3.11 python3; do command -v "$cand" >/dev/null && { PY=$cand; break; }; done
  fi
  [ -n "$PY" ] || die "no python3 found; install Python 3.11 (sudo apt-get install python3 python3-venv python3-dev)"
  say "creating virtual environment $VENV with $($PY --version 2>&1)"
  "$PY" -m venv "$VENV" || die "python -m venv failed; install python3-venv (sudo apt-get install python3-venv)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip)
# requirements are (re)installed whenever launch/requirements.txt differs from the last install
REQ_STAMP=$VENV/.hvd_gradq-requirements.sha256
req_hash=$(sha256sum "$ROOT/launch/requirements.txt" | cut -d' ' -f1)
if [ "$(cat "$REQ_STAMP" 2>/dev/null)" != "$req_hash" ]; then
  say "pip install -r launch/requirements.txt (torch==$TORCH_VERSION CPU, mpi4py, pytest, hypothesis, tqdm, ruff, ...)"
  "${PIP[@]}" install -q -r "$ROOT/launch/requirements.txt"
  echo "$req_hash" > "$REQ_STAMP"
else
  say "Python requirements (torch $TORCH_VERSION, mpi4py, pytest, ...): present"
fi

# ---- 4. Horovod ----------------------------------------------------------------------------------
# Horovod 0.28.1 (the newest release) hard-codes set(CMAKE_CXX_STANDARD 14) in CMakeLists.txt and
# horovod/torch/CMakeLists.txt, while PyTorch >= 2.1 headers require C++17. Upstream raised the
# standard after the release; no release carries it. We download the PyPI sdist, change exactly
# those two lines to 17, build a wheel once, and cache it by Horovod and torch version.
WHEELS=$CACHE/wheels/horovod-$HOROVOD_VERSION-torch-$TORCH_VERSION
build_horovod() {
  local work; work=$(mktemp -d)
  say "downloading the Horovod $HOROVOD_VERSION sdist"
  "${PIP[@]}" download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
  tar -xzf "$work"/horovod-"$HOROVOD_VERSION".tar.gz -C "$work"
  local src=$work/horovod-$HOROVOD_VERSION
  say "patching $src: CMAKE_CXX_STANDARD 14 -> 17 (CMakeLists.txt, horovod/torch/CMakeLists.txt)"
  for f in CMakeLists.txt horovod/torch/CMakeLists.txt; do
    grep -q 'set(CMAKE_CXX_STANDARD 14)' "$src/$f" || die "unexpected Horovod source: no C++14 line in $f"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/$f"
  done
  say "building the Horovod wheel (PyTorch + MPI + Gloo; about 4 minutes on 2 cores)"
  mkdir -p "$WHEELS"
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
  HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 MAKEFLAGS="-j$(nproc)" \
    "${PIP[@]}" wheel -q --no-build-isolation --no-deps -w "$WHEELS" "$src" \
    > "$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "Horovod build failed (log: $work/build.log)"; }
  rm -rf "$work"
}
if "$VENV/bin/python" -c "import horovod, horovod.torch; assert horovod.__version__ == '$HOROVOD_VERSION'" 2>/dev/null; then
  say "Horovod $HOROVOD_VERSION: present"
else
  ls "$WHEELS"/horovod-*.whl >/dev/null 2>&1 || build_horovod
  say "installing Horovod from the cached wheel $(ls "$WHEELS"/horovod-*.whl)"
  "${PIP[@]}" install -q --no-deps --force-reinstall "$WHEELS"/horovod-*.whl
  "$VENV/bin/horovodrun" --check-build | sed 's/^/[setup]   /'
fi

# ---- 5. hvd_gradq ------------------------------------------------------------------------------
# (checked from / so that the checkout itself is not on sys.path)
if (cd / && "$VENV/bin/python" -c "import importlib.util as u, sys; s = u.find_spec('hvd_gradq'); sys.exit(0 if s and s.origin.startswith('$ROOT/') else 1)") 2>/dev/null; then
  say "hvd_gradq (editable): present"
else
  say "pip install -e . (hvd_gradq, editable)"
  "${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"
fi
say "ready: $VENV"
