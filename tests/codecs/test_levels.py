"""Property tests of the bucketed level-set codecs (QSGD, QSGDinf, NUQSGD, natural, TernGrad,
ALQ, AMQ): exact wire size, decoded values on the level set, unbiasedness, the exact variance,
and defined behaviour on bad input."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hvd_gradq.bits.bitstream import pack_bits, packed_nbytes, unpack_bits
from hvd_gradq.codecs import DitherSource, make_codec
from hvd_gradq.codecs.levels import LEVEL_CODECS

NAMES = sorted(LEVEL_CODECS)
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def bits_for(name):
    return st.just(2) if name == "terngrad" else st.integers(2, 8)


@st.composite
def codec_cases(draw):
    name = draw(st.sampled_from(NAMES))
    bits = draw(bits_for(name))
    bucket = draw(st.sampled_from([1, 7, 64, 1000]))
    shape = draw(st.sampled_from([(), (0,), (1,), (5, 3), (130,), (33, 31), (2, 3, 40)]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    return name, bits, bucket, shape, dtype, seed


def sample(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))  # heavy-ish tails
    return x.to(dtype)


def per_element(codec, x, enc):
    """(normalised r, norm per element, lo, hi) for the elements of x."""
    n = x.numel()
    norms = enc.parts["norms"].repeat_interleave(codec.bucket_size)[:n].double()
    r = torch.where(norms > 0, x.reshape(-1).double().abs() / norms, torch.zeros_like(norms)).clamp(max=1)
    lv = codec.levels.double()
    idx = (torch.searchsorted(lv, r, right=True) - 1).clamp(0, lv.numel() - 2)
    return r, norms, lv[idx], lv[idx + 1]


@given(st.integers(1, 8), st.integers(0, 3000), st.integers(0, 2**31 - 1))
@SETTINGS
def test_byte_packing_roundtrip(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)
    stream = pack_bits(codes, bits)
    assert stream.dtype == torch.uint8 and stream.numel() == packed_nbytes(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(stream, bits, n), codes)


@given(codec_cases())
@SETTINGS
def test_wire_size_level_set_and_roundtrip(case):
    name, bits, bucket, shape, dtype, seed = case
    codec = make_codec(name, bits, bucket_size=bucket)
    x = sample(shape, dtype, seed)
    enc = codec.encode(x, DitherSource(seed))
    stream = codec.to_bytes(enc)
    assert stream.dtype == torch.uint8 and stream.numel() == codec.payload_bytes(x.numel())
    decoded = codec.decode(codec.from_bytes(stream, x.numel()))
    assert torch.equal(decoded, codec.decode(enc))
    out = codec.roundtrip(x, DitherSource(seed))
    assert out.shape == x.shape and out.dtype == x.dtype
    if x.numel() == 0:
        return
    # every decoded magnitude is norm * (one of the levels)
    norms = enc.parts["norms"].repeat_interleave(bucket)[: x.numel()]
    ratio = torch.where(norms > 0, decoded.abs() / norms, torch.zeros_like(norms))
    dist = (ratio.unsqueeze(1) - codec.levels.unsqueeze(0)).abs().min(dim=1).values
    assert float(dist.max()) < 1e-5
    # and it sits on one of the two levels that bracket the input
    _, _, lo, hi = per_element(codec, x.float(), enc)
    on = torch.minimum((ratio.double() - lo).abs(), (ratio.double() - hi).abs())
    assert float(on.max()) < 1e-5
    # signs are kept (zeros may decode as either sign of zero)
    nz = decoded != 0
    assert torch.equal(torch.signbit(decoded[nz]), torch.signbit(x.reshape(-1).float()[nz]))


@pytest.mark.parametrize("name", NAMES)
def test_unbiased_and_variance_exact(name):
    """Over K draws: the mean converges to x (5-sigma per element, with sigma from the exact
    per-element variance norm^2 (hi - r)(r - lo)), and the mean squared error matches the exact
    total variance within 5 standard errors. Fixed seeds make the test deterministic."""
    bits = 2 if name == "terngrad" else 3
    codec = make_codec(name, bits, bucket_size=64)
    x = sample((500,), torch.float32, 7)
    if name in ("alq", "amq"):
        codec.fit(sample((5000,), torch.float32, 8))
    rng, k = DitherSource(11), 3000
    draws = torch.stack([codec.decode(codec.encode(x, rng)).double() for _ in range(k)])
    enc = codec.encode(x, rng)
    r, norms, lo, hi = per_element(codec, x, enc)
    var = norms**2 * (hi - r) * (r - lo)
    step = norms * (hi - lo)
    mean_err = (draws.mean(0) - x.double()).abs()
    assert bool((mean_err <= 5 * (var / k).sqrt() + step * 2**-16 + 1e-6).all())
    sq = ((draws - x.double()) ** 2).sum(1)  # total squared error per draw
    assert abs(float(sq.mean()) - float(var.sum())) <= 5 * float(sq.std()) / math.sqrt(k) + 1e-9


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_decodes_nonfinite(name, bad):
    codec = make_codec(name, 2 if name == "terngrad" else 4, bucket_size=16)
    x = torch.randn(100)
    x[57] = bad
    out = codec.roundtrip(x, DitherSource(0))
    assert bool(torch.isnan(out).all())


def test_edge_shapes_dtypes_and_passthrough():
    codec = make_codec("qsgd", 4, bucket_size=8)
    rng = DitherSource(0)
    assert codec.roundtrip(torch.zeros(0), rng).shape == (0,)
    assert codec.roundtrip(torch.tensor(3.0), rng).shape == ()
    nc = torch.randn(20, 30).t()  # non-contiguous
    assert not nc.is_contiguous() and codec.roundtrip(nc, rng).shape == (30, 20)
    ints = torch.arange(10)
    assert codec.roundtrip(ints, rng) is ints  # integer tensors pass through untouched
    assert torch.equal(codec.roundtrip(torch.zeros(50), rng), torch.zeros(50))
    zero = make_codec("qsgd", 0)
    assert zero.payload_bytes(1000) == 0 and torch.equal(zero.roundtrip(torch.ones(5), rng), torch.zeros(5))


def test_bad_construction_raises_clear_errors():
    with pytest.raises(ValueError, match="unknown codec 'qsg'"):
        make_codec("qsg", 2)
    with pytest.raises(ValueError, match=r"bits must be 0 or in 2\.\.8"):
        make_codec("qsgd", 9)
    with pytest.raises(ValueError, match=r"bits must be 0 or in 2\.\.8"):
        make_codec("nuqsgd", 1)
    with pytest.raises(ValueError, match="bucket_size must be an integer >= 1"):
        make_codec("qsgd", 2, bucket_size=0)
    with pytest.raises(ValueError, match="ternary levels need bits=2"):
        make_codec("terngrad", 3)
    with pytest.raises(ValueError, match="norm must be one of"):
        make_codec("qsgd", 2, norm="l1")


@pytest.mark.parametrize("name", ["qsgd", "qsgdinf"])
def test_one_bit_uniform_codec(name):
    """1 bit: values are +-norm, unbiased, variance exactly norm^2 - x^2, 1 bit per element on the wire."""
    codec = make_codec(name, 1, bucket_size=50)
    x = sample((400,), torch.float32, 3)
    rng, k = DitherSource(1), 3000
    enc = codec.encode(x, rng)
    assert codec.to_bytes(enc).numel() == codec.payload_bytes(400) == 4 * 8 + 50
    norms = enc.parts["norms"].repeat_interleave(50).double()
    draws = torch.stack([codec.decode(codec.encode(x, rng)).double() for _ in range(k)])
    assert bool(((draws.abs() - norms).abs() < 1e-5 * norms).all())
    var = norms**2 - x.double() ** 2
    assert bool(((draws.mean(0) - x.double()).abs() <= 5 * (var / k).sqrt() + norms * 2**-16 + 1e-6).all())
    sq = ((draws - x.double()) ** 2).sum(1)
    assert abs(float(sq.mean()) - float(var.sum())) <= 5 * float(sq.std()) / k**0.5
