"""Offline data: IDX reader and the Debian Fashion-MNIST files."""
import gzip
import struct

import numpy as np
import pytest

from workloads.datasets import fashion_mnist, fashion_mnist_dir, read_idx


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + struct.pack(">III", 2, 3, 4) + arr.tobytes())
    assert np.array_equal(read_idx(path), arr)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)


def test_missing_data_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_dir([tmp_path])


def test_fashion_mnist_from_debian():
    x, y = fashion_mnist("train")
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    assert sorted(set(y.tolist())) == list(range(10))
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    xt, yt = fashion_mnist("test")
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)


def test_austen_corpus_reads_six_novels_without_r():
    from workloads.datasets import AUSTEN_BOOKS, austen_books, austen_lm

    books = austen_books()
    assert list(books) == list(AUSTEN_BOOKS)
    assert books["prideprejudice"][10].startswith("of a good fortune, must be in want of a wife")
    assert min(len(v) for v in books.values()) > 7000 and max(len(v) for v in books.values()) < 17000
    data = austen_lm(vocab_size=10_000)
    total = len(data["train"]) + len(data["valid"]) + len(data["test"])
    assert 850_000 < total < 900_000  # word + punctuation tokens, and paragraph ends
    assert len(data["vocab"]) == 10_000 and data["vocab"][0] == "<unk>"
    assert int(data["train"].max()) < 10_000 and data["valid"].numel() > 40_000


def test_missing_austen_names_the_install_command(tmp_path):
    from workloads.datasets import austen_rdb

    with pytest.raises(FileNotFoundError, match="apt-get download r-cran-janeaustenr"):
        austen_rdb([tmp_path / "nothing"])
