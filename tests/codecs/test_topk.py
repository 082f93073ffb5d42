"""Top-k (DGC): k is the most 8-byte elements that fit 4n/ratio (at least 1), the payload size is
exact and static, decode keeps exactly the k largest |x| with their exact values, the wire format
round-trips, NaN/Inf decode to NaN, and error feedback loses nothing."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hvd_gradq.codecs import DitherSource, ErrorFeedback, TopKCodec, make_codec

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)
SIZES = [1, 2, 7, 39, 40, 41, 79, 80, 1000, 4097, 20_000]
RATIOS = [1.5, 2.5, 20, 100, 1000]


def distinct_magnitudes(n: int, seed: int) -> torch.Tensor:
    """Random signs and a random order of n distinct magnitudes, so the top k is unique."""
    g = torch.Generator().manual_seed(seed)
    mags = (torch.randperm(n, generator=g) + 1).float() * 0.375  # exact in float32 up to 2**24
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return mags * signs


@pytest.mark.parametrize("ratio", RATIOS)
def test_keep_count_is_the_largest_that_fits_the_budget(ratio):
    codec = TopKCodec(ratio)
    assert codec.keep_count(0) == 0
    for n in [*SIZES, 65_536, 1_000_003]:
        k, budget = codec.keep_count(n), 4 * n / ratio
        assert k == max(1, int(budget) // 8), (n, k)
        assert 1 <= k <= n
        assert 8 * k <= budget or k == 1, (n, k)  # only the floor of one element may exceed the budget
        assert 8 * (k + 1) > budget, (n, k)  # one more would not fit
        assert codec.payload_bytes(n) == 8 * k
        assert codec.layout(n) == [("values", torch.float32, k), ("indices", torch.int32, k)]


def test_dgc_ratio_20_keeps_one_in_forty():
    codec = make_codec("topk", ratio=20)
    for n in (40, 4000, 1_000_000):
        assert codec.keep_count(n) == n // 40
        assert codec.payload_bytes(n) == n // 5  # 20x fewer bytes than float32


@given(st.sampled_from([20, 100, 1000, 2.5]), st.sampled_from([0, *SIZES]), st.integers(0, 2**31 - 1))
@SETTINGS
def test_payload_is_exact_and_the_wire_round_trips(ratio, n, seed):
    codec = TopKCodec(ratio)
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    enc = codec.encode(x, DitherSource(seed))
    stream = codec.to_bytes(enc)
    assert stream.dtype == torch.uint8
    assert stream.numel() == codec.payload_bytes(n) == 8 * codec.keep_count(n)
    assert stream.numel() <= max(4 * n / ratio, 8)  # within the budget, or the one-element floor
    back = codec.from_bytes(stream, n)
    assert back.numel == n
    for key in ("values", "indices"):
        assert torch.equal(back.parts[key], enc.parts[key]), key
    assert torch.equal(codec.decode(back), codec.decode(enc))
    with pytest.raises(ValueError, match="expected"):
        codec.from_bytes(torch.cat([stream, torch.zeros(1, dtype=torch.uint8)]), n)


@given(st.integers(1, 3000), st.sampled_from([1.5, 20, 100, 1000]), st.integers(0, 2**31 - 1))
@SETTINGS
def test_decode_keeps_exactly_the_k_largest_magnitudes(n, ratio, seed):
    codec = TopKCodec(ratio)
    x = distinct_magnitudes(n, seed)
    k = codec.keep_count(n)
    decoded = codec.decode(codec.encode(x, DitherSource(0)))
    assert decoded.dtype == torch.float32 and decoded.shape == (n,)
    top = torch.argsort(x.abs(), descending=True)[:k]
    assert torch.equal(decoded[top], x[top])  # the kept values travel exactly
    rest = torch.ones(n, dtype=torch.bool)
    rest[top] = False
    assert bool((decoded[rest] == 0).all())
    assert int((decoded != 0).sum()) == k


def test_ties_are_deterministic_and_keep_top_magnitudes():
    g = torch.Generator().manual_seed(11)
    x = torch.randint(-3, 4, (5000,), generator=g).float()  # few distinct magnitudes: many ties
    codec = TopKCodec(20)
    k = codec.keep_count(x.numel())
    a, b = codec.encode(x, DitherSource(1)), codec.encode(x, DitherSource(2))  # rng is unused
    assert torch.equal(a.parts["indices"], b.parts["indices"]) and torch.equal(a.parts["values"], b.parts["values"])
    idx = a.parts["indices"].long()
    assert bool((idx[1:] > idx[:-1]).all())  # ascending, so unique
    assert torch.equal(a.parts["values"], x[idx])
    kept = torch.sort(a.parts["values"].abs(), descending=True).values
    assert torch.equal(kept, torch.sort(x.abs(), descending=True).values[:k])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("n,where", [(1, 0), (1000, 0), (1000, 517), (1000, 999)])
def test_nonfinite_anywhere_decodes_to_all_nan(bad, n, where):
    codec = TopKCodec(20)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n + where))
    x[where] = bad
    enc = codec.encode(x, DitherSource(0))
    stream = codec.to_bytes(enc)
    assert stream.numel() == codec.payload_bytes(n)  # the size does not change
    for dec in (codec.decode(enc), codec.decode(codec.from_bytes(stream, n))):
        assert dec.shape == (n,) and bool(torch.isnan(dec).all())


def test_fp64_beyond_float32_range_decodes_to_nan():
    x = torch.randn(500, dtype=torch.float64)
    x[42] = 1e300  # finite in float64, inf in float32
    codec = TopKCodec(20)
    assert bool(torch.isnan(codec.decode(codec.encode(x, DitherSource(0)))).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_half_and_double_inputs(dtype):
    codec = TopKCodec(100)
    x = distinct_magnitudes(4097, 5).to(dtype)  # magnitudes 0.375 * (1..4097): exact in every dtype but bf16
    ref = x.to(torch.float32)
    decoded = codec.decode(codec.encode(x, DitherSource(0)))
    assert decoded.dtype == torch.float32
    k = codec.keep_count(x.numel())
    assert int((decoded != 0).sum()) == k
    nz = decoded != 0
    assert torch.equal(decoded[nz], ref[nz])  # the kept values are the inputs, converted to float32
    # what is kept is the k largest (bf16 rounding makes ties: compare magnitudes, not positions)
    assert torch.equal(torch.sort(decoded[nz].abs()).values, torch.sort(ref.abs()).values[-k:])
    out = codec.roundtrip(x.view(17, 241), DitherSource(0))
    assert out.dtype == dtype and out.shape == (17, 241)
    assert torch.equal(out.reshape(-1).float(), decoded)


def test_noncontiguous_and_shaped_input():
    codec = TopKCodec(20)
    x = distinct_magnitudes(40 * 60, 3).view(40, 60).t()  # non-contiguous
    decoded = codec.decode(codec.encode(x, DitherSource(0)))
    flat = x.reshape(-1)
    top = torch.argsort(flat.abs(), descending=True)[: codec.keep_count(flat.numel())]
    assert torch.equal(decoded[top], flat[top]) and int((decoded != 0).sum()) == top.numel()


def test_decode_into_out():
    codec = TopKCodec(20)
    x = distinct_magnitudes(1000, 8)
    enc = codec.encode(x, DitherSource(0))
    out = torch.full((1000,), 7.0)  # stale contents must be cleared
    res = codec.decode(enc, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert torch.equal(out, codec.decode(enc))
    with pytest.raises(ValueError, match="out must be"):
        codec.decode(enc, out=torch.zeros(999))
    with pytest.raises(ValueError, match="out must be"):
        codec.decode(enc, out=torch.zeros(1000, dtype=torch.float64))


def test_empty_layer():
    codec = TopKCodec(20)
    enc = codec.encode(torch.zeros(0), DitherSource(0))
    assert codec.to_bytes(enc).numel() == 0 == codec.payload_bytes(0)
    assert codec.decode(codec.from_bytes(torch.zeros(0, dtype=torch.uint8), 0)).shape == (0,)


def test_error_feedback_loses_nothing_exactly():
    """Integer-valued gradients keep every sum exact in float32: sent + residual == fed, bit for bit."""
    codec, ef, rng = TopKCodec(100), ErrorFeedback(), DitherSource(0)
    g = torch.Generator().manual_seed(2)
    n = 5000
    fed, sent = torch.zeros(n), torch.zeros(n)
    for _ in range(30):
        grad = torch.randint(-1000, 1001, (n,), generator=g).float()
        fed += grad
        x = ef.compensate("w", grad)
        dec = codec.decode(codec.from_bytes(codec.to_bytes(codec.encode(x, rng)), n))
        ef.update("w", x, dec)
        sent += dec
        r = ef.residuals["w"]
        assert bool((r[dec != 0] == 0).all())  # what was sent is gone from the residual
        assert torch.equal(sent + r, fed)
    assert int((sent != 0).sum()) > 30 * codec.keep_count(n) // 2  # the residual rotates what gets sent


def test_error_feedback_on_real_values():
    codec, rng = TopKCodec(20), DitherSource(0)
    ef = ErrorFeedback()
    g = torch.Generator().manual_seed(4)
    n = 3000
    fed, sent = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for _ in range(20):
        grad = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))
        x = ef.compensate("w", grad)
        dec = codec.decode(codec.encode(x, rng))
        ef.update("w", x, dec)
        fed += grad.double()
        sent += dec.double()
    assert torch.allclose(sent + ef.residuals["w"].double(), fed, atol=1e-4)


def test_bad_ratio_and_factory():
    for bad in (1, 0.5, 0, -20, float("nan"), float("inf"), "20", True, None):
        with pytest.raises(ValueError, match="topk: ratio must be a finite number > 1"):
            TopKCodec(bad)
    with pytest.raises(ValueError, match="topk takes a compression ratio"):
        make_codec("topk")
    with pytest.raises(ValueError, match="'topk'"):
        make_codec("nope")
    codec = make_codec("topk", ratio=20)
    assert isinstance(codec, TopKCodec) and codec.ratio == 20.0
    assert codec.name == "topk" and codec.unbiased is False and codec.bits == 32
    with pytest.raises(ValueError, match="numel must be"):
        codec.layout(-1)
    with pytest.raises(ValueError, match="numel must be"):
        codec.payload_bytes(2**31)  # indices are int32
