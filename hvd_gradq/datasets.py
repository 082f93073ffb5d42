"""Offline datasets. Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (IDX gzip
files); nothing is downloaded at run time.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_INSTALL = (
    "sudo apt-get install dataset-fashion-mnist   (or, without root: "
    "apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb "
    "~/.cache/hvd_gradq/debroot; `make setup` does this for you)"
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def cache_dir() -> Path:
    """The project's cache directory ($HVD_GRADQ_CACHE, else $XDG_CACHE_HOME/hvd_gradq)."""
    env = os.environ.get("HVD_GRADQ_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hvd_gradq"


def fashion_mnist_dir(search: list[Path] | None = None) -> Path:
    """Directory holding the Fashion-MNIST IDX files; raises with the install command if absent.

    Looks in ``search`` if given, else in $HVD_GRADQ_FASHION_MNIST, Debian's install location and
    the cache directory that ``launch/setup.sh`` unpacks into when not root.
    """
    if search is None:
        env = os.environ.get("HVD_GRADQ_FASHION_MNIST")
        search = ([Path(env)] if env else []) + [
            Path("/usr/share/datasets/fashion-mnist"),
            cache_dir() / "debroot/usr/share/datasets/fashion-mnist",
        ]
    for d in search:
        if all((d / f).is_file() for pair in _FILES.values() for f in pair):
            return d
    raise FileNotFoundError(
        f"Fashion-MNIST not found (looked in {', '.join(map(str, search))}). "
        f"Install it with: {FASHION_MNIST_INSTALL}"
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array of its declared shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=offset)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {arr.size} elements")
    return arr.reshape(shape)


def fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 (n, 1, 28, 28) normalised to zero mean / unit variance, labels int64 (n,))."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = fashion_mnist_dir()
    images = read_idx(d / _FILES[split][0])
    labels = read_idx(d / _FILES[split][1])
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - 0.2860) / 0.3530  # Fashion-MNIST training-set mean and std
    return x, torch.from_numpy(labels.astype(np.int64))
