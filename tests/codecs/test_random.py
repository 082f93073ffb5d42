"""The counter-based dither: SplitMix64 reference values, uniformity, independence of keys/ranks."""
import torch

from hvd_gradq.bits.dither import DitherSource, counter_uniform, splitmix64


def test_splitmix64_matches_its_reference_outputs():
    # SplitMix64 with state 0: the generator's first outputs (Vigna's reference splitmix64.c)
    out = splitmix64(0, torch.arange(3, dtype=torch.int64))
    expect = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [v % (1 << 64) for v in out.tolist()] == expect


def test_dither_is_uniform_and_uncorrelated():
    n = 1 << 20
    u = counter_uniform(12345, n).double()
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(float(u.var()) - 1 / 12) < 1e-3
    counts = torch.bincount(((u * 16).floor()).long(), minlength=16).double()  # chi-square, 15 d.o.f.
    chi2 = float(((counts - n / 16) ** 2 / (n / 16)).sum())
    assert chi2 < 50, chi2  # P(chi2_15 > 50) ~ 1e-5
    for lag in (1, 2, 3, 4):  # within and across the 4 draws of one 64-bit output
        c = torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1]
        assert abs(float(c)) < 5 / n**0.5, (lag, float(c))


def test_streams_differ_by_seed_and_call_and_are_reproducible():
    a, b = DitherSource([0, 0]), DitherSource([0, 1])  # (seed, rank)
    ua, ub = a.uniform(1000), b.uniform(1000)
    assert not torch.equal(ua, ub)
    assert not torch.equal(ua, a.uniform(1000))  # each call draws a fresh key
    c = DitherSource([0, 0])
    assert torch.equal(c.uniform(1000), ua)
    state = c.state_dict()
    nxt = c.uniform(10)
    c.load_state_dict(state)
    assert torch.equal(c.uniform(10), nxt)
