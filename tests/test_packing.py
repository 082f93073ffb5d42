"""Lane packing: exact round trips and carry-free sums for every bit width and container."""
import pytest
import torch

from hvd_gradq.bits.lanes import USABLE_BITS, lane_bits_for, lane_layout, pack_lanes, unpack_lanes, words_to_int64

CONTAINERS = [torch.int64, torch.float64]


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("summands", [1, 2, 3, 4, 7, 16])
def test_sum_of_packed_words_unpacks_to_sum_of_codes(container, bits, summands):
    gen = torch.Generator().manual_seed(bits * 100 + summands)
    layout = lane_layout(bits, summands, container)
    n = 3 * layout.lanes_per_word + 5  # not a multiple of the lanes per word
    codes = [torch.randint(0, 1 << bits, (n,), generator=gen) for _ in range(summands)]
    codes[0][:3] = (1 << bits) - 1  # the largest code on every rank somewhere
    for c in codes:
        c[-1] = (1 << bits) - 1
    packed = [pack_lanes(c, layout) for c in codes]
    assert all(p.dtype == container and p.numel() == layout.words(n) for p in packed)
    total = torch.stack(packed).sum(0)
    assert torch.equal(unpack_lanes(words_to_int64(total), layout, n), torch.stack(codes).sum(0))
    # a single rank's words round-trip exactly too
    assert torch.equal(unpack_lanes(words_to_int64(packed[0]), layout, n), codes[0])


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("size", [2, 3, 5, 8])
def test_float64_words_survive_average(bits, size):
    """Horovod's Average multiplies the exact float64 sum by 1/N; times N and rounding undoes it."""
    layout = lane_layout(bits, size, torch.float64)
    n = 1000
    gen = torch.Generator().manual_seed(size)
    codes = torch.full((size, n), (1 << bits) - 1, dtype=torch.int64)  # worst case: every lane full
    codes[:, ::2] = torch.randint(0, 1 << bits, (size, (n + 1) // 2), generator=gen)
    words = torch.stack([pack_lanes(c, layout) for c in codes]).sum(0) * (1.0 / size)
    assert torch.equal(unpack_lanes(words_to_int64(words, size), layout, n), codes.sum(0))


def test_lane_width_has_headroom_for_the_sum():
    assert lane_bits_for(2, 1) == 2
    assert lane_bits_for(2, 2) == 3  # 2 * 3 = 6 < 8
    assert lane_bits_for(8, 2) == 9
    assert lane_bits_for(1, 4) == 3
    for bits in range(1, 9):
        for summands in (1, 2, 5, 64):
            w = lane_bits_for(bits, summands)
            assert summands * ((1 << bits) - 1) < (1 << w)


@pytest.mark.parametrize("container", CONTAINERS)
def test_layout_uses_the_usable_bits(container):
    layout = lane_layout(2, 2, container)
    assert layout.lane_bits == 3
    assert layout.lanes_per_word == USABLE_BITS[container] // 3
    assert layout.nbytes(1000) == -(-1000 // layout.lanes_per_word) * 8


def test_pack_empty_and_bad_arguments():
    layout = lane_layout(3, 2, torch.int64)
    assert pack_lanes(torch.zeros(0, dtype=torch.int64), layout).numel() == 0
    with pytest.raises(ValueError, match=r"bits must be in 1\.\.8"):
        lane_layout(0, 2, torch.int64)
    with pytest.raises(ValueError, match=r"bits must be in 1\.\.8"):
        lane_layout(9, 2, torch.int64)
    with pytest.raises(ValueError, match="container"):
        lane_layout(2, 2, torch.int32)
    with pytest.raises(ValueError, match="wider than"):
        lane_layout(8, 1 << 50, torch.float64)


def test_altered_float_words_are_detected():
    with pytest.raises(ValueError, match="not integers"):
        words_to_int64(torch.tensor([3.0, 4.5], dtype=torch.float64))


# hand-computed: the sum of N codes of b bits needs ceil(log2(N (2^b - 1) + 1))-bit lanes; int64 words
# hold 63 usable bits, float64 words 48 (exact integers through Horovod's Average)
HAND = {  # (N, bits): (lane bits, lanes per int64 word, lanes per float64 word)
    (2, 1): (2, 31, 24), (2, 2): (3, 21, 16), (2, 3): (4, 15, 12), (2, 8): (9, 7, 5),
    (4, 2): (4, 15, 12), (4, 3): (5, 12, 9), (8, 1): (4, 15, 12), (8, 8): (11, 5, 4),
}


@pytest.mark.parametrize("key", sorted(HAND))
def test_lane_bytes_are_the_hand_computed_ones(key):
    size, bits = key
    width, per_int64, per_float64 = HAND[key]
    for container, per in ((torch.int64, per_int64), (torch.float64, per_float64)):
        layout = lane_layout(bits, size, container)
        assert (layout.lane_bits, layout.lanes_per_word) == (width, per)
        assert layout.nbytes(100_000) == -(-100_000 // per) * 8  # exact bytes of a 100k-element layer


def test_the_design_doc_s_bits_per_element_table_is_what_the_lanes_send():
    """docs/design.md's table (int64 / float64 per N and bits) against the layouts, cell by cell."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 2 |") or line.startswith("| 4 |")
            or line.startswith("| 8 |")]
    assert len(rows) == 3, rows
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        size = int(cells[0])
        for bits, cell in enumerate(cells[1:], start=1):
            doc = [float(v) for v in cell.split("/")]
            got = [64 / lane_layout(bits, size, c).lanes_per_word for c in CONTAINERS]
            assert doc == [round(g, 2) for g in got], (size, bits, doc, got)
    assert round(64 / HAND[(2, 2)][1], 2) == 3.05 and round(64 / HAND[(2, 2)][2], 2) == 4.00
