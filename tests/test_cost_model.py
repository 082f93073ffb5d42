"""The transport cost model: pure arithmetic, checked against hand-computed figures."""
import math

import pytest

from hvd_gradq.bits.chunks import chunk_bounds
from hvd_gradq.plan import cost_model as cm
from hvd_gradq.plan.cost_model import LinkModel


def test_allreduce_ring_figures():
    link = LinkModel(latency_s=1e-4, bandwidth=1e6)
    c = cm.allreduce_cost(1000, 4, link)
    assert c.payload_bytes == 1000
    assert c.sent_bytes == c.received_bytes == pytest.approx(1500)  # 2 (N-1)/N M
    assert c.steps == 6
    assert c.seconds == pytest.approx(6e-4 + 1500 / 1e6)


def test_allgather_receive_cost_grows_with_ranks_and_two_phase_stays_flat():
    link = LinkModel(latency_s=0.0, bandwidth=1e6)
    frame = 10_000
    gathers = [cm.allgather_cost(frame, n, link).received_bytes for n in (2, 4, 8, 16)]
    assert gathers == [frame * (n - 1) for n in (2, 4, 8, 16)]
    flats = []
    for n in (2, 4, 8, 16):
        chunks = [frame // n] * n
        flats.append(cm.two_phase_cost(chunks, chunks, 0, link).received_bytes)
    assert max(flats) < 2 * frame and flats[-1] / flats[0] < 2  # ~2 (N-1)/N P


def test_two_phase_per_rank_payload_counts_both_phases():
    link = LinkModel()
    chunks = [100, 120, 80]
    c = cm.two_phase_cost(chunks, [50, 60, 40], 1, link)
    assert c.payload_bytes == 300 + 60
    assert c.sent_bytes == (300 - 120) + 2 * 60
    assert c.received_bytes == 2 * 120 + (50 + 40)
    with pytest.raises(ValueError, match="one frame size per rank"):
        cm.two_phase_cost(chunks, [1, 2], 0, link)


def test_cheapest_picks_the_fastest_and_breaks_ties_by_bytes():
    link = LinkModel(latency_s=1e-3, bandwidth=1e9)
    small_latency_bound = [cm.allreduce_cost(100, 8, link), cm.allgather_cost(100, 8, link)]
    assert cm.cheapest(small_latency_bound).transport == "allgather"  # 7 steps < 14
    bandwidth_bound = LinkModel(latency_s=0.0, bandwidth=1e6)
    big = [cm.allreduce_cost(10**6, 8, bandwidth_bound), cm.allgather_cost(10**6 // 3, 8, bandwidth_bound)]
    assert cm.cheapest(big).transport == "allreduce"  # gather receives 7/3 M > 7/4 M
    with pytest.raises(ValueError):
        cm.cheapest([])


@pytest.mark.parametrize("numel,size,align", [(0, 2, 8), (7, 4, 8), (1000, 3, 8), (4096, 4, 512), (10**6, 7, 1024)])
def test_chunk_bounds_cover_the_layer_on_aligned_boundaries(numel, size, align):
    b = chunk_bounds(numel, size, align)
    assert len(b) == size + 1 and b[0] == 0 and b[-1] == numel
    assert all(x <= y for x, y in zip(b, b[1:]))
    assert all(x % align == 0 for x in b[1:-1] if x < numel)
    sizes = [y - x for x, y in zip(b, b[1:])]
    assert max(sizes) - min(sizes) <= align or numel < size * align


def test_link_model_validation_and_units():
    assert LinkModel.from_mbit(100).bandwidth == pytest.approx(12.5e6)
    for bad in ({"latency_s": -1}, {"bandwidth": 0}, {"bandwidth": math.nan}, {"latency_s": True}):
        with pytest.raises(ValueError, match="LinkModel"):
            LinkModel(**bad)
    with pytest.raises(ValueError, match="size"):
        cm.allgather_cost(10, 0, LinkModel())
