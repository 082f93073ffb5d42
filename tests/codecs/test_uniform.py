"""Uniform stochastic quantizer: unbiased, error below one step, codes in range."""
import pytest
import torch

from hvd_gradq.codecs import DitherSource, dequantize, dequantize_sum, quantize_stochastic, step_size


@pytest.mark.parametrize("bits", range(1, 9))
def test_unbiased(bits):
    """Mean of K independent quantizations converges to x.

    Each decoded value has variance <= delta**2 / 4, so the mean of K draws has standard deviation
    <= delta / (2 sqrt(K)). With K = 4000 and 2000 coordinates, a 5-sigma bound per coordinate is
    exceeded with probability < 2000 * 6e-7, and the fixed seed makes the test deterministic.
    """
    gen = torch.Generator().manual_seed(1234 + bits)
    rng = DitherSource(1234 + bits)
    scale, k = 1.5, 4000
    x = (torch.rand(2000, generator=gen) * 2 - 1) * scale
    x[:4] = torch.tensor([-scale, scale, 0.0, scale / 3])
    acc = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(k):
        acc += dequantize(quantize_stochastic(x, scale, bits, rng), scale, bits)
    delta = step_size(scale, bits)
    err = (acc / k - x).abs().max().item()
    # + the 16-bit dither's resolution (bias at most 2**-17 of a step, see codecs/random.py)
    assert err <= 5 * delta / (2 * k**0.5) + delta * 2**-16, (err, delta)


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_error_below_one_step_and_codes_in_range(bits):
    gen = torch.Generator().manual_seed(bits)
    scale = 0.25
    x = (torch.rand(10_000, generator=gen) * 2 - 1) * scale
    codes = quantize_stochastic(x, scale, bits, DitherSource(bits))
    assert codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) <= (1 << bits) - 1
    assert (dequantize(codes, scale, bits) - x).abs().max().item() < step_size(scale, bits) + 1e-6


def test_values_beyond_the_scale_are_clipped():
    codes = quantize_stochastic(torch.tensor([-10.0, 10.0]), 1.0, 3, DitherSource(0))
    assert codes.tolist() == [0, 7]


def test_dequantize_sum_is_mean_of_dequantized():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (4, 100), generator=gen)
    mean = torch.stack([dequantize(c, 0.7, 4) for c in codes]).mean(0)
    assert torch.allclose(dequantize_sum(codes.sum(0), 0.7, 4, 4), mean, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        quantize_stochastic(torch.zeros(3), 1.0, 0, DitherSource(0))
    with pytest.raises(ValueError, match="scale"):
        quantize_stochastic(torch.zeros(3), 0.0, 2, DitherSource(0))
    with pytest.raises(ValueError, match="scale"):
        quantize_stochastic(torch.zeros(3), float("nan"), 2, DitherSource(0))


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_lane_error_feedback_keeps_the_scale_bounded(bits):
    """The lanes' loop: quantize g + r at the scale max|g + r| of the previous step, keep r. With a
    level step of 2s at 1 bit, feeding the rounding error back would grow the scale geometrically;
    1 bit keeps only the clipping error, so the scale stays within a small factor of max|g|."""
    from hvd_gradq.bits.lanes import lane_layout
    from hvd_gradq.codecs.shared_scale import quantize_to_lanes

    gen = torch.Generator().manual_seed(bits)
    rng = DitherSource(bits)
    layout = lane_layout(bits, 2, torch.int64)
    r = torch.zeros(5000)
    scale = 1.0
    for _ in range(300):
        g = torch.randn(5000, generator=gen) * 0.01
        v = g + r
        nxt = float(v.abs().max())
        quantize_to_lanes(g, scale, bits, layout, rng, residual=r, residual_out=r)
        if bits == 1:  # only what clipping cut is kept
            assert torch.equal(r, v - v.clamp(-scale, scale))
        scale = nxt
    assert scale < 0.2, f"the scale grew to {scale} (gradients are ~0.04 at most)"
