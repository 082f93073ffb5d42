"""JointSQ: the greedy matches Eq. 14 item by item, the budget is never exceeded, reallocation only
lowers the noise, the wire format round-trips exactly, and error feedback keeps what is dropped."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hvd_gradq.codecs import DitherSource, ErrorFeedback, JointSQCodec, JointSQState, make_codec
from hvd_gradq.codecs.jointsq import WIDTHS, ClassCounts, greedy_allocation, noise, reallocate
from hvd_gradq.codecs.magnitude_order import MagnitudeOrder

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)


def greedy_item_by_item(sq_desc, budget):
    """Eq. 14 literally: every upgrade of every element as an item, by density, while it fits;
    then continue with the items that still fit."""
    p = {0: 0.0, 2: 1 - 4.0**-2, 4: 1 - 4.0**-4, 8: 1 - 4.0**-8}  # Eq. 13 profits
    dens = {0: (p[2] - p[0]) / 2, 1: (p[4] - p[2]) / 2, 2: (p[8] - p[4]) / 4}
    cost = {0: 2, 1: 2, 2: 4}
    items = sorted(((dens[j] * float(s), -j, i) for i, s in enumerate(sq_desc.tolist()) if s > 0 for j in range(3)),
                   reverse=True)
    level = [0] * sq_desc.numel()  # upgrades taken per element
    spent, stopped = 0, False
    for _, negj, i in items:
        j = -negj
        if level[i] != j:
            continue
        if spent + cost[j] <= budget and not (stopped and cost[j] != 2):
            spent += cost[j]
            level[i] += 1
        else:
            stopped = True
    return ClassCounts(level.count(3), level.count(2), level.count(1))


@given(st.integers(1, 40), st.integers(0, 200), st.integers(0, 2**31 - 1))
@SETTINGS
def test_greedy_matches_the_item_by_item_mckp_greedy(n, budget, seed):
    g = torch.Generator().manual_seed(seed)
    sq = torch.sort(torch.rand(n, generator=g, dtype=torch.float64) ** 4, descending=True).values
    alloc = greedy_allocation(sq, budget)
    assert alloc.value_bits <= budget
    ref = greedy_item_by_item(sq, budget)
    assert alloc == ref or abs(noise(sq, alloc) - noise(sq, ref)) < 1e-12, (alloc, ref)


@given(st.integers(4, 300), st.integers(2, 400), st.integers(0, 2**31 - 1), st.floats(1.0, 4.0))
@SETTINGS
def test_reallocation_is_budget_neutral_and_never_adds_noise(n, budget, seed, R):
    g = torch.Generator().manual_seed(seed)
    sq = torch.sort(torch.randn(n, generator=g, dtype=torch.float64) ** 2, descending=True).values
    greedy = greedy_allocation(sq, budget)
    moved = reallocate(sq, greedy, round(R * budget / 8))
    assert moved.value_bits == greedy.value_bits <= budget
    assert min(moved.k8, moved.k4, moved.k2) >= 0 and moved.k <= n
    assert noise(sq, moved) <= noise(sq, greedy) + 1e-15


def test_greedy_is_optimal_often_and_close_always_on_small_cases():
    """Against the exhaustive optimum over (k8, k4, k2) with the magnitude-ordered assignment, on
    200 fixed random cases (measured: optimal in 93.5% of them, at most 1.28x the optimal noise)."""
    g = torch.Generator().manual_seed(3)
    worst, optimal = 1.0, 0
    for _ in range(200):
        n = 8
        sq = torch.sort(torch.randn(n, generator=g, dtype=torch.float64) ** 2, descending=True).values
        budget = int(torch.randint(2, 40, (1,), generator=g))
        best = min(noise(sq, ClassCounts(a, b, c)) for a, b, c in itertools.product(range(n + 1), repeat=3)
                   if a + b + c <= n and 8 * a + 4 * b + 2 * c <= budget)
        got = noise(sq, reallocate(sq, greedy_allocation(sq, budget), n))
        ratio = got / best if best > 0 else 1.0
        worst, optimal = max(worst, ratio), optimal + (ratio < 1 + 1e-9)
    assert optimal >= 180 and worst < 1.35, (optimal, worst)


@given(st.sampled_from([2.5, 20, 100, 1000]), st.sampled_from([0, 1, 7, 500, 20_000]), st.integers(0, 2**31 - 1))
@SETTINGS
def test_wire_roundtrip_and_size_within_the_ratio(ratio, n, seed):
    codec = JointSQCodec(ratio)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))
    enc = codec.encode(x, DitherSource(seed), JointSQState())
    stream = codec.to_bytes(enc)
    assert stream.numel() == codec.encoded_bytes(enc)
    assert stream.numel() <= max(codec.target_bytes(n), 32)  # a layer too small for any value sends the header
    k8, k4, k2 = (int(v) for v in enc.parts["header"][:3])
    decoded = codec.decode(codec.from_bytes(stream, n))
    assert torch.equal(decoded, codec.decode(enc))
    # only the k8 + k4 + k2 largest elements can decode to non-zero (stochastic rounding may zero some)
    nonzero = (decoded != 0).nonzero().view(-1)
    assert nonzero.numel() <= k8 + k4 + k2
    if nonzero.numel():
        top = set(torch.argsort(x.abs(), descending=True, stable=True)[: k8 + k4 + k2].tolist())
        assert set(nonzero.tolist()) <= top


def test_classes_are_unbiased_on_sent_elements():
    codec = JointSQCodec(20, reallocation=False)
    x = torch.randn(2000, generator=torch.Generator().manual_seed(1))
    rng, k = DitherSource(5), 2000
    acc = torch.zeros(2000, dtype=torch.float64)
    for _ in range(k):
        acc += codec.decode(codec.encode(x, rng)).double()
    enc = codec.encode(x, rng)
    sent = codec.decode(enc) != 0
    mean = acc / k
    k8, k4, k2 = (int(v) for v in enc.parts["header"][:3])
    # the sent set is deterministic (it depends on magnitudes only): check it on the top elements
    top = torch.argsort(x.abs(), descending=True)[: k8 + k4 + k2]
    scale = float(x.abs().max())
    err = (mean[top] - x[top].double()).abs().max()
    # the widest level step is the 2-bit class's (its maximum, <= the layer maximum): 5 sigma of the mean
    assert float(err) < 5 * scale / (2 * k**0.5), float(err)
    assert sent.sum() <= k8 + k4 + k2


def test_error_feedback_keeps_everything_not_sent():
    codec, ef, rng = JointSQCodec(100), ErrorFeedback(), DitherSource(0)
    g = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    total = torch.zeros(5000)
    for step in range(20):
        x = ef.compensate("w", g)
        dec = codec.decode(codec.encode(x, rng))
        ef.update("w", x, dec)
        total += dec
        assert torch.allclose(total + ef.residuals["w"], g * (step + 1), atol=1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_decodes_to_nan(bad):
    codec = JointSQCodec(20)
    x = torch.randn(1000)
    x[3] = bad
    assert bool(torch.isnan(codec.decode(codec.encode(x, DitherSource(0)))).all())


def test_construction_errors_and_factory():
    for bad in (1, 0.5, float("inf"), "20", True):
        with pytest.raises(ValueError, match="ratio must be a finite number > 1"):
            JointSQCodec(bad)
    with pytest.raises(ValueError, match="compression ratio"):
        make_codec("jointsq")
    assert isinstance(make_codec("jointsq", ratio=20), JointSQCodec)
    assert WIDTHS == (8, 4, 2)


def test_adaptive_R_follows_the_noise_and_stays_in_range():
    codec, state, rng = JointSQCodec(50), JointSQState(), DitherSource(0)
    g = torch.Generator().manual_seed(4)
    seen = []
    for step in range(12):
        scale = torch.exp(torch.randn(4000, generator=g) * (0.5 + step / 4))  # the profile drifts
        codec.encode(torch.randn(4000, generator=g) * scale, rng, state)
        seen.append(state.R)
        assert 1.0 <= state.R <= 4.0 and state.last_noise is not None
    assert len(set(seen)) > 1, "R never moved (Eq. 16)"


def _layer(n, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))
    if ties:  # repeated magnitudes of both signs, exact zeros, denormals, squares that underflow
        x[::7] = 0.5
        x[3::11] = -0.5
        x[5::13] = 0.0
        x[6::17] = 1e-41
        x[8::19] = -3e-24
    return x


def _full_order(x):
    """(keys, indices, squares) of the whole layer sorted as the magnitude order defines it."""
    keys = x.view(torch.int32).long() & 0x7FFFFFFF
    perm = torch.sort(keys, descending=True, stable=True).indices  # ties: index ascending
    return keys[perm], perm, (x * x).double()[perm]


@pytest.mark.parametrize("ties", [False, True])
def test_the_histogram_order_answers_as_a_full_sort(ties):
    """Ranks, cuts, prefix sums, counts above a threshold and position gaps: the same as sorting the
    layer, without sorting it (a few bins gathered)."""
    x = _layer(200_003, 11 + ties, ties)
    order = MagnitudeOrder(x)
    keys, perm, sq = _full_order(x)
    n = x.numel()
    ranks = [0, 1, 2, 100, 5000, n // 3, n // 2, n - 2, n - 1, *torch.randint(0, n, (20,)).tolist()]
    for r in ranks:
        assert order.cut(r) == (int(keys[r]), int(perm[r]))
        assert order.value(r) == float(sq[r])
        assert order.prefix_sum(r) == pytest.approx(float(sq[:r].sum()), rel=1e-12, abs=1e-300)
    for t in [0.0, 2.0**-149, 1e-30, 0.25, 1.0, float(sq[1234]), float(sq[n // 2]), 1e6, float(sq[0]) * 2]:
        assert order.count_ge(t) == int((sq >= t).sum()), t
    for k in (1, 17, n // 20, n // 2, n):
        sent = torch.sort(perm[:k]).values
        assert order.max_gap(k) == int(torch.diff(sent, prepend=torch.zeros(1, dtype=sent.dtype)).max())
    assert order.gathers < 40 and order.total == pytest.approx(float(sq.sum()), rel=1e-12)


@pytest.mark.parametrize("ratio,ties", [(8, False), (20, True), (1000, False)])
def test_the_allocation_from_the_histogram_order_is_the_allocation_from_a_full_sort(ratio, ties):
    codec = JointSQCodec(ratio)
    x = _layer(300_000, ratio, ties)
    order = MagnitudeOrder(x)
    sq = _full_order(x)[2]
    for c in (0, 2, 3, 1001, codec.value_budget(x.numel()), 4 * x.numel() // ratio):
        a = greedy_allocation(order, c)
        assert a == greedy_allocation(sq, c), c
        assert reallocate(order, a, round(2.5 * c / 8), 500) == reallocate(sq, a, round(2.5 * c / 8), 500)
        assert noise(order, a) == pytest.approx(noise(sq, a), rel=1e-12)
    alloc, _ = codec.allocate(x, JointSQState())
    assert codec.size_of(alloc, order, x.numel()) <= codec.target_bytes(x.numel())


def test_variance_of_sent_elements_is_the_exact_stochastic_rounding_variance():
    """Per sent element of class width b and class maximum s: levels j * s / (2^(b-1) - 1), so the
    variance is step^2 * f (1 - f) with f the fractional position; unsent elements carry g^2
    (the 0-bit term of Eq. 5). The mean squared error over K draws matches the sum within 5 s.e."""
    codec = JointSQCodec(10, reallocation=False)
    x = torch.randn(1500, generator=torch.Generator().manual_seed(9)) * 2
    rng, k = DitherSource(3), 1000
    enc = codec.encode(x, rng)
    k8, k4, k2 = (int(v) for v in enc.parts["header"][:3])
    order = torch.argsort(x.abs(), descending=True, stable=True)
    var = x.double() ** 2  # unsent: the whole value is dropped
    bounds = [0, k8, k8 + k4, k8 + k4 + k2]
    for j, width in enumerate((8, 4, 2)):
        idx = order[bounds[j]:bounds[j + 1]]
        if idx.numel() == 0:
            continue
        step = float(enc.parts["scales"][j]) / ((1 << (width - 1)) - 1)
        t = x[idx].double().abs() / step
        f = t - t.floor()
        var[idx] = step**2 * f * (1 - f)
    sq = torch.stack([((codec.decode(codec.encode(x, rng)).double() - x.double()) ** 2).sum() for _ in range(k)])
    assert abs(float(sq.mean()) - float(var.sum())) <= 5 * float(sq.std()) / k**0.5 + 1e-9
