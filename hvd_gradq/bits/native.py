"""The optional native kernels (``hvd_gradq/bits/csrc/*.c`` and their headers), compiled on first
use with the system C compiler into the cache directory and loaded with ctypes.

If no compiler is available, or ``HVD_GRADQ_NATIVE=0`` is set, ``load()`` returns None and the
codecs use their torch reference path (same results, slower). The library file name carries a
hash of the source, so an edited kernel is rebuilt; concurrent ranks build to a temporary file
and rename it into place.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

_SOURCES = sorted((Path(__file__).with_name("csrc")).glob("*.c"))
_HEADERS = sorted((Path(__file__).with_name("csrc")).glob("*.h"))  # in the hash: an edited header rebuilds
_FLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno"]
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    env = os.environ.get("HVD_GRADQ_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hvd_gradq"
    return base / "native"


def _build() -> Path | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = b"".join(p.read_bytes() for p in (*_SOURCES, *_HEADERS))
    tag = hashlib.sha256(src + " ".join(_FLAGS).encode()).hexdigest()[:16]
    out = _cache_dir() / f"libhvdgq_{tag}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *_FLAGS, "-o", tmp, *map(str, _SOURCES), "-lm"], check=True, capture_output=True,
                       text=True)
        os.replace(tmp, out)
    except (subprocess.CalledProcessError, OSError) as exc:
        os.unlink(tmp)
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        warnings.warn(f"hvd_gradq: native codec kernels not built ({detail.strip()[:300]}); "
                      "using the slower torch path", stacklevel=3)
        return None
    return out


def load() -> ctypes.CDLL | None:
    """The kernel library, or None when unavailable or disabled (``HVD_GRADQ_NATIVE=0``)."""
    global _lib, _tried
    if os.environ.get("HVD_GRADQ_NATIVE", "1") == "0":
        return None
    if not _tried:
        _tried = True
        path = _build()
        if path is not None:
            lib = ctypes.CDLL(str(path))
            i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
            u64 = ctypes.c_uint64
            lib.hvdgq_encode_levels.argtypes = [ptr, i64, i64, ptr, ptr, i32, i32, ptr, i32, u64, i32, ptr]
            lib.hvdgq_encode_levels.restype = None
            lib.hvdgq_decode_levels.argtypes = [ptr, i64, i64, ptr, ptr, i32, ptr]
            lib.hvdgq_decode_levels.restype = None
            lib.hvdgq_bucket_absmax.argtypes = [ptr, i64, i64, ptr]
            lib.hvdgq_bucket_absmax.restype = None
            f32 = ctypes.c_float
            lib.hvdgq_quantize_lanes.argtypes = [ptr, i64, f32, f32, f32, i32, u64, i32, i32, i32, ptr, ptr, ptr]
            lib.hvdgq_quantize_lanes.restype = None
            lib.hvdgq_dequantize_lanes.argtypes = [ptr, i64, i32, ctypes.c_double, i32, i32, f32, f32, ptr]
            lib.hvdgq_dequantize_lanes.restype = i32
            lib.hvdgq_quantize_blocks.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i32, i32, u64, i32, i32, i32, ptr,
                                                  ptr]
            lib.hvdgq_quantize_blocks.restype = None
            lib.hvdgq_dequantize_blocks.argtypes = [ptr, i64, i32, ctypes.c_double, i32, i32, i64, ptr, ptr, ptr]
            lib.hvdgq_dequantize_blocks.restype = i32
            lib.hvdgq_rotate.argtypes = [ptr, i64, i64, u64, f32]
            lib.hvdgq_rotate.restype = None
            lib.hvdgq_unrotate.argtypes = [ptr, i64, i64, u64, f32]
            lib.hvdgq_unrotate.restype = None
            lib.hvdgq_rotate_into.argtypes = [ptr, ptr, i64, ptr, i64, i64, u64, f32, ptr]
            lib.hvdgq_rotate_into.restype = None
            lib.hvdgq_unrotate_into.argtypes = [ptr, i64, i64, u64, f32, ptr, i64]
            lib.hvdgq_unrotate_into.restype = None
            lib.hvdgq_quantize_blocks_bits.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i32, i32, u64, ptr, ptr]
            lib.hvdgq_quantize_blocks_bits.restype = None
            lib.hvdgq_decode_rotated.argtypes = [ptr, i64, i64, ptr, ptr, i32, u64, f32, ptr, i64, i32]
            lib.hvdgq_decode_rotated.restype = i32
            lib.hvdgq_encode_rotated_lanes.argtypes = [ptr, ptr, i32, i64, i64, i64, u64, f32, ptr, ptr, ptr, i32, i32,
                                                       u64, i32, i32, i32, ptr, ptr, ptr]
            lib.hvdgq_encode_rotated_lanes.restype = i32
            lib.hvdgq_decode_rotated_lanes.argtypes = [ptr, i64, i32, ctypes.c_double, i32, i32, i64, ptr, ptr, u64,
                                                       f32, ptr, i64]
            lib.hvdgq_decode_rotated_lanes.restype = i32
            lib.hvdgq_encode_rotated_bits.argtypes = [ptr, i64, i64, u64, f32, ptr, ptr, ptr, ptr, i32, i32, u64, ptr,
                                                      ptr, i64]
            lib.hvdgq_encode_rotated_bits.restype = i32
            lib.hvdgq_isa.argtypes = []
            lib.hvdgq_isa.restype = i32
            lib.hvdgq_set_isa.argtypes = [i32]
            lib.hvdgq_set_isa.restype = i32
            lib.hvdgq_abs_max.argtypes = [ptr, ptr, i64]
            lib.hvdgq_abs_max.restype = f32
            lib.hvdgq_jsq_hist.argtypes = [ptr, i64, ptr, ptr]
            lib.hvdgq_jsq_hist.restype = None
            lib.hvdgq_jsq_gather.argtypes = [ptr, i64, ptr, ptr, i32, ptr, i64]
            lib.hvdgq_jsq_gather.restype = i64
            lib.hvdgq_jsq_max_gap.argtypes = [ptr, i64, ctypes.c_uint32, i64, ptr]
            lib.hvdgq_jsq_max_gap.restype = i64
            lib.hvdgq_jsq_emit.argtypes = [ptr, i64, ptr, ptr, i32, i32, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr]
            lib.hvdgq_jsq_emit.restype = i64
            _lib = lib
    return _lib


#: the kernels' instruction-set paths, by ``hvdgq_isa()``'s number
ISA_NAMES = ("generic", "avx2", "avx512")


def isa() -> str:
    """The instruction-set path the kernels take on this CPU, chosen at run time: "avx512",
    "avx2" or "generic" (portable C); "torch" when the kernels are not loaded."""
    lib = load()
    return "torch" if lib is None else ISA_NAMES[lib.hvdgq_isa()]


def set_isa(name: str | None) -> str:
    """Use at most the path ``name`` ("generic", "avx2", "avx512"; None: the widest the CPU
    runs), for tests that compare every path with the torch reference. Returns the path in use."""
    lib = load()
    if lib is None:
        return "torch"
    return ISA_NAMES[lib.hvdgq_set_isa(-1 if name is None else ISA_NAMES.index(name))]
