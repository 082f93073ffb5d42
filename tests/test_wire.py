"""Payload header: the reduced words tell Sum from Average from anything else, and catch ranks
whose codebooks differ. The reductions are computed here with plain tensor sums, as Horovod
would; the real collectives are exercised in test_horovodrun.py."""
import pytest
import torch

from hvd_gradq.wire import header as wire


def headers(size, digests, container, stat=0.0):
    return torch.stack([
        wire.header_words(rank=r, size=size, digest=d, nonfinite=False, stat=stat, container=container)
        for r, d in enumerate(digests)
    ])


@pytest.mark.parametrize("container", [torch.float32, torch.float64, torch.int64])
@pytest.mark.parametrize("size", [2, 3, 8, 300])
def test_sum_and_average_are_recognised(container, size):
    h = headers(size, [0xABCDE] * size, container, stat=5)
    assert h.shape[1] == wire.header_len(container, size)
    head = wire.read_header(h.sum(0), size=size, op=wire.SUM, layer="l", compressor="C")
    assert head.multiplier == 1 and head.stat_sum == 5 * size and not head.nonfinite
    if container != torch.int64:
        avg = h.sum(0) * (1.0 / size)
        head = wire.read_header(avg, size=size, op=wire.AVERAGE, layer="l", compressor="C")
        assert head.multiplier == size and head.stat_sum == pytest.approx(5 * size)


def test_wrong_op_names_the_fix():
    h = headers(2, [7, 7], torch.int64)
    truncated_average = h.sum(0) // 2  # what Horovod's Average does to integers
    with pytest.raises(wire.ReductionMismatchError, match=r"op=hvd\.Sum"):
        wire.read_header(truncated_average, size=2, op=wire.SUM, layer="fc.weight", compressor="C")
    f = headers(2, [7, 7], torch.float32)
    with pytest.raises(wire.ReductionMismatchError, match="summed"):
        wire.read_header(f.sum(0), size=2, op=wire.AVERAGE, layer="l", compressor="C")
    with pytest.raises(wire.ReductionMismatchError, match="another op"):
        wire.read_header(f.max(0).values, size=2, op=wire.AVERAGE, layer="l", compressor="C")


@pytest.mark.parametrize("container", [torch.float32, torch.float64, torch.int64])
@pytest.mark.parametrize("digests", [[1, 2], [5, 5, 6], [0xFFFFF, 0x7FFFF], [3, 1, 2]])
def test_any_codebook_disagreement_is_caught(container, digests):
    size = len(digests)
    with pytest.raises(wire.CodebookMismatchError, match="different codebooks"):
        wire.read_header(headers(size, digests, container).sum(0), size=size, op=wire.SUM,
                         layer="l", compressor="C")


def test_nonfinite_flag_is_seen_by_all():
    h = torch.stack([
        wire.header_words(rank=0, size=2, digest=3, nonfinite=True, stat=0, container=torch.float32),
        wire.header_words(rank=1, size=2, digest=3, nonfinite=False, stat=0, container=torch.float32),
    ])
    assert wire.read_header(h.sum(0), size=2, op=wire.SUM, layer="l", compressor="C").nonfinite
