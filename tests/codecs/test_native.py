"""The compiled kernels (hvd_gradq/csrc/levels.c) give exactly the torch reference's bytes."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hvd_gradq.bits import native
from hvd_gradq.bits.lanes import lane_layout
from hvd_gradq.codecs import DitherSource, make_codec
from hvd_gradq.codecs.levels import LEVEL_CODECS
from hvd_gradq.codecs.shared_scale import abs_max, dequantize_lanes, quantize_to_lanes


def test_kernels_build_here():
    assert native.load() is not None, "the C kernels did not build (is a C compiler installed?)"


@given(
    st.sampled_from(sorted(LEVEL_CODECS)),
    st.integers(2, 8),
    st.sampled_from([1, 5, 8, 64, 1000]),
    st.integers(0, 5000),
    st.integers(0, 2**31 - 1),
)
@settings(max_examples=60, deadline=None, derandomize=True)
def test_native_and_reference_paths_agree_bit_for_bit(name, bits, bucket, n, seed):
    if name == "terngrad":
        bits = 2
    codec = make_codec(name, bits, bucket_size=bucket)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))
    if name in ("alq", "amq") and n:
        codec.fit(x)
    fast = codec.encode(x, DitherSource(seed))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HVD_GRADQ_NATIVE", "0")
        ref = codec.encode(x, DitherSource(seed))
        ref_decoded = codec.decode(ref)
    assert torch.equal(fast.parts["norms"], ref.parts["norms"])
    assert torch.equal(fast.parts["codes"], ref.parts["codes"])
    out = torch.empty(n)
    assert torch.equal(codec.decode(fast, out=out), ref_decoded)


@given(st.integers(1, 8), st.integers(1, 16), st.sampled_from([torch.int64, torch.float64]),
       st.integers(0, 5000), st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None, derandomize=True)
def test_lane_kernel_matches_the_torch_path(bits, ranks, container, n, seed):
    layout = lane_layout(bits, ranks, container)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 2  # some values beyond the scale: clipping is exercised
    scale = 1.5
    res_fast = torch.randn(n, generator=g) * 0.1  # the residual is read (v = x + r), then rewritten
    res_ref = res_fast.clone()
    fast = quantize_to_lanes(x, scale, bits, layout, DitherSource(seed), res_fast, res_fast)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HVD_GRADQ_NATIVE", "0")
        ref = quantize_to_lanes(x, scale, bits, layout, DitherSource(seed), res_ref, res_ref)
    assert fast.dtype == ref.dtype == container
    assert torch.equal(fast, ref)
    assert torch.equal(res_fast, res_ref)
    # and into a separate output buffer (as the compressor stages it), leaving the input alone
    before = res_ref.clone()
    staged = torch.empty(n)
    again = quantize_to_lanes(x, scale, bits, layout, DitherSource(seed + 1), res_ref, staged)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HVD_GRADQ_NATIVE", "0")
        staged_ref = torch.empty(n)
        again_ref = quantize_to_lanes(x, scale, bits, layout, DitherSource(seed + 1), res_ref, staged_ref)
    assert torch.equal(res_ref, before) and torch.equal(again, again_ref) and torch.equal(staged, staged_ref)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_abs_max_matches_torch_and_flags_nonfinite(bad):
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert abs_max(x, r) == float((x + r).abs().max())
    assert abs_max(x) == float(x.abs().max())
    assert abs_max(torch.zeros(0)) == 0.0
    x[500] = bad
    for addend in (None, r):
        m = abs_max(x, addend)
        assert (m != m) if bad != bad else m == float("inf")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HVD_GRADQ_NATIVE", "0")
            ref = abs_max(x, addend)
        assert (ref != ref) if bad != bad else ref == float("inf")


@given(st.integers(1, 8), st.integers(1, 16), st.sampled_from([torch.int64, torch.float64]),
       st.integers(0, 3000), st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None, derandomize=True)
def test_lane_decode_kernel_matches_the_torch_path(bits, ranks, container, n, seed):
    """Sum the words of `ranks` simulated ranks (as Sum, or Average for float64) and decode."""
    layout = lane_layout(bits, ranks, container)
    g = torch.Generator().manual_seed(seed)
    words = sum(quantize_to_lanes(torch.randn(n, generator=g), 1.0, bits, layout, DitherSource([seed, r]))
                for r in range(ranks))
    words = torch.as_tensor(words)
    mult = 1
    if container == torch.float64:  # what op=Average hands back
        words, mult = words * (1.0 / ranks), ranks
    fast = dequantize_lanes(words, n, 1.0, bits, layout, ranks, mult)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HVD_GRADQ_NATIVE", "0")
        ref = dequantize_lanes(words, n, 1.0, bits, layout, ranks, mult)
    assert torch.equal(fast, ref)


def test_lane_decode_rejects_altered_float_words():
    layout = lane_layout(2, 2, torch.float64)
    with pytest.raises(ValueError, match="not integers"):
        dequantize_lanes(torch.tensor([3.0, 4.5], dtype=torch.float64), 20, 1.0, 2, layout, 2)
