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


# ---- Jane Austen's six novels (Debian r-cran-janeaustenr, read without R) -----------------------

AUSTEN_INSTALL = (
    "apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb ~/.cache/hvd_gradq/debroot "
    "(launch/setup.sh does this; installing the package itself would pull in R)"
)
AUSTEN_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
_STRSXP, _CHARSXP = 16, 9


def austen_rdb(search: list[Path] | None = None) -> Path:
    """Path of janeaustenr's lazy-load database; raises with the install command if absent."""
    if search is None:
        search = [Path("/") / _RDB, cache_dir() / "debroot" / _RDB]
    for p in search:
        if p.is_file():
            return p
    raise FileNotFoundError(f"Jane Austen corpus not found (looked in {', '.join(map(str, search))}). "
                            f"Get it with: {AUSTEN_INSTALL}")


def _r_character_vector(blob: bytes) -> list[str]:
    """The character vector in one R XDR serialisation ('X\\n', version 2 or 3)."""
    if blob[:2] != b"X\n":
        raise ValueError("not an R XDR serialisation")
    pos = 2

    def i32() -> int:
        nonlocal pos
        v = int.from_bytes(blob[pos:pos + 4], "big", signed=True)
        pos += 4
        return v

    version = i32()
    i32(), i32()  # writer and minimal reader R versions
    if version == 3:
        skip = i32()  # native encoding name
        pos += skip
    if (i32() & 0xFF) != _STRSXP:
        raise ValueError("the R object is not a character vector")
    out = []
    for _ in range(i32()):
        if (i32() & 0xFF) != _CHARSXP:
            raise ValueError("malformed character vector")
        n = i32()
        out.append("" if n < 0 else blob[pos:pos + n].decode("utf-8", errors="replace"))
        pos += max(n, 0)
    return out


def austen_books(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Lines of each novel: the database's records in order, each a 4-byte big-endian length and
    a zlib stream holding one character vector."""
    import zlib

    data = Path(path or austen_rdb()).read_bytes()
    books, pos = [], 0
    while pos < len(data) and len(books) < len(AUSTEN_BOOKS):
        d = zlib.decompressobj()
        blob = d.decompress(data[pos + 4:])
        books.append(_r_character_vector(blob))
        pos = len(data) - len(d.unused_data)
    if len(books) != len(AUSTEN_BOOKS):
        raise ValueError(f"expected {len(AUSTEN_BOOKS)} novels in {path}, found {len(books)}")
    return dict(zip(AUSTEN_BOOKS, books))


def austen_tokens() -> list[str]:
    """Lower-cased word and punctuation tokens of the six novels in the database's order, with an
    end-of-paragraph token "<eos>" at each blank line."""
    import re

    word = re.compile(r"[a-z]+(?:'[a-z]+)?|[0-9]+|[^\sa-z0-9]")
    out: list[str] = []
    for lines in austen_books().values():
        for line in lines:
            line = line.strip().lower()
            if line:
                out += word.findall(line)
            elif out and out[-1] != "<eos>":
                out.append("<eos>")
    return out


def austen_lm(vocab_size: int = 10_000) -> dict:
    """Word-level language-model data: token ids of train / valid / test (the first 90% / next 5%
    / last 5% of the concatenated novels) over the ``vocab_size`` most frequent training tokens
    (others -> "<unk>")."""
    from collections import Counter

    toks = austen_tokens()
    n = len(toks)
    a, b = int(0.9 * n), int(0.95 * n)
    counts = Counter(toks[:a])
    vocab = ["<unk>"] + [w for w, _ in counts.most_common(vocab_size - 1)]
    index = {w: i for i, w in enumerate(vocab)}
    ids = torch.tensor([index.get(w, 0) for w in toks], dtype=torch.int64)
    return {"vocab": vocab, "train": ids[:a], "valid": ids[a:b], "test": ids[b:]}
