"""The fused and vectorised kernels against the torch reference path, on every instruction-set path
this CPU runs (``native.set_isa``): the same bits, fuzzed over sizes, blocks, widths, containers,
rank counts and rounding."""
from __future__ import annotations

import pytest
import torch

from hvd_gradq.bits import native, rotation
from hvd_gradq.bits.dither import DitherSource
from hvd_gradq.bits.lanes import lane_layout
from hvd_gradq.codecs import JointSQState, make_codec
from hvd_gradq.codecs import rotated as rot
from hvd_gradq.codecs.shared_scale import abs_max

pytestmark = pytest.mark.skipif(native.load() is None, reason="no C compiler: the torch path is the only path")


def _paths() -> list[str]:
    best = native.isa()
    return list(native.ISA_NAMES[:native.ISA_NAMES.index(best) + 1]) if best in native.ISA_NAMES else []


PATHS = _paths() if native.load() is not None else []


@pytest.fixture(params=PATHS)
def isa(request):
    assert native.set_isa(request.param) == request.param
    yield request.param
    native.set_isa(None)


def torch_only(monkeypatch):
    monkeypatch.setenv("HVD_GRADQ_NATIVE", "0")


def _case(trial: int):
    g = torch.Generator().manual_seed(1000 + trial)
    numel = int(torch.randint(1, 40_000, (1,), generator=g))
    block = rotation.block_for(numel, 1 << int(torch.randint(3, 15, (1,), generator=g)))
    key = int(torch.randint(0, 2**62, (1,), generator=g)) * 5
    x = torch.randn(numel, generator=g) * float(torch.rand(1, generator=g)) * 30
    r = torch.randn(numel, generator=g) * 0.1
    return g, numel, block, key, x, r


def test_the_widest_path_is_chosen_at_run_time_and_can_be_narrowed():
    best = native.isa()
    assert best in native.ISA_NAMES
    assert native.set_isa("generic") == "generic" and native.isa() == "generic"
    assert native.set_isa(None) == best


@pytest.mark.parametrize("trial", range(6))
def test_rotation_with_addend_and_energy_equals_the_torch_path(monkeypatch, isa, trial):
    _, numel, block, key, x, r = _case(trial)
    y, e = rotation.rotate_energy(x, key, block, r)
    back = rotation.unrotate(y, key, block, numel)
    into = torch.empty(numel)
    rotation.unrotate_(y.clone(), key, block, numel, out=into)
    torch_only(monkeypatch)
    y_t, e_t = rotation.rotate_energy(x, key, block, r)
    assert torch.equal(y, y_t), (isa, numel, block)
    assert torch.equal(back, rotation.unrotate(y_t, key, block, numel))
    assert torch.equal(into, back)
    assert torch.allclose(e, e_t, rtol=1e-12, atol=0)  # summation order only


@pytest.mark.parametrize("trial", range(8))
def test_fused_rotated_lanes_equal_the_unfused_passes(isa, trial):
    g, numel, block, key, x, r = _case(trial)
    bits = int(torch.randint(1, 9, (1,), generator=g))
    size = int(torch.randint(1, 5, (1,), generator=g))
    container = (torch.int64, torch.float64)[trial % 2]
    stochastic = trial % 3 == 0
    layout = lane_layout(bits, size, container)
    m = rotation.padded(numel, block)
    scales = rot.clip_scales(torch.rand(m // block, generator=g) * 20 + 0.1, bits)
    staged = torch.empty(numel)
    words, energy = rot.encode_lanes(x, scales, bits, layout, key=key, block=block, addend=r, energy=True,
                                     rng=DitherSource(3) if stochastic else None, resid_out=staged)
    y, e_ref = rotation.rotate_energy(x, key, block, r)
    err = torch.empty_like(y)
    ref = rot.quantize_blocks(y, scales, bits, layout, rng=DitherSource(3) if stochastic else None, err_out=err)
    assert torch.equal(words, ref)
    assert torch.equal(staged, rotation.unrotate(err, key, block, numel))
    assert torch.equal(energy, e_ref)
    # already rotated input (the drop-in's this-step scales): the same words and residual
    staged2 = torch.empty(numel)
    words2, _ = rot.encode_lanes(y, scales, bits, layout, key=key, block=block, rotated=True,
                                 rng=DitherSource(3) if stochastic else None, resid_out=staged2)
    assert torch.equal(words2, ref) and torch.equal(staged2, staged)
    # decode of `size` identical ranks: one pass per block == dequantize then unrotate
    summed = words * size
    out = rot.decode_lanes(summed, numel, scales, bits, layout, size, 1, key=key, block=block)
    mean = rot.dequantize_blocks(summed, m, scales, bits, layout, size, 1)
    assert torch.equal(out, rotation.unrotate(mean, key, block, numel))
    assert torch.allclose(out, x + r - staged, atol=1e-4 * float((x + r).abs().max()) + 1e-6)


def test_fused_lane_decode_refuses_float_words_that_are_not_integers():
    layout = lane_layout(2, 2, torch.float64)
    scales = torch.ones(1)
    words = torch.full((layout.words(8),), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="not integers"):
        rot.decode_lanes(words, 8, scales, 2, layout, 2, 1, key=1, block=8)


@pytest.mark.parametrize("trial", range(6))
def test_gathered_rotated_code_kernels_equal_the_torch_path(monkeypatch, isa, trial):
    g, _, _, _, x, r = _case(trial)
    bits = int(torch.randint(1, 9, (1,), generator=g))
    codec = rot.RotatedCodec(bits, rounding=("nearest", "stochastic")[trial % 2])
    enc, err = codec.encode_error(x, DitherSource(5))
    data = codec.to_bytes(enc)
    dec = codec.decode(enc)
    acc = r.clone()
    codec.decode(enc, acc, accumulate=True)
    torch_only(monkeypatch)
    enc_t, err_t = codec.encode_error(x, DitherSource(5))
    assert torch.equal(codec.to_bytes(enc_t), data)
    dec_t = codec.decode(enc_t)
    assert torch.equal(dec, dec_t)
    assert torch.equal(acc, r + dec_t)
    # the coding error from the rotated domain is x - decoded, to float rounding
    assert torch.allclose(err, x - dec_t, atol=1e-5 * float(x.abs().max()) + 1e-7)
    assert torch.allclose(err, err_t, atol=1e-5 * float(x.abs().max()) + 1e-7)


def test_zero_blocks_of_the_gathered_code_decode_to_zeros_with_zero_error():
    x = torch.zeros(3 * 4096)
    x[4096:8192] = torch.randn(4096)
    codec = rot.RotatedCodec(2)
    enc, err = codec.encode_error(x, DitherSource(0))
    dec = codec.decode(enc)
    assert torch.equal(dec[:4096], torch.zeros(4096)) and torch.equal(err[:4096], torch.zeros(4096))
    assert torch.allclose(err, x - dec, atol=1e-5)


@pytest.mark.parametrize("special", ["nan", "inf", "-inf", "none"])
def test_abs_max_kernel_keeps_nan_and_inf(special):
    x = torch.randn(10_001)
    r = torch.randn(10_001)
    if special != "none":
        x[5_000] = float(special)
    want = float((x + r).abs().max()) if special == "none" else (float("inf") if "inf" in special else float("nan"))
    got = abs_max(x, r)
    if special == "nan":
        assert got != got
    else:
        assert got == want
    assert abs_max(-torch.zeros(5)) == 0.0


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_gathered_rotated_frames_without_a_copy_of_g_plus_r_equal_the_generic_path(rounding):
    """``GatherCoder`` codes the rotated code from g and its residual directly (two passes, the
    residual staged by the kernel); with ``track_error`` it takes the generic path (g + r, then
    ``encode_error``). Same frames, same residuals, step after step."""
    from hvd_gradq.codecs import ErrorFeedback
    from hvd_gradq.wire.gather_coder import GatherCoder

    numel = 20_000
    fast, generic = (GatherCoder("w", numel, rot.RotatedCodec(2, rounding=rounding), rank=0, size=2,
                                 rng=DitherSource(4), worker_feedback=ErrorFeedback(), server_feedback=None)
                     for _ in range(2))
    generic.track_error = True
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        g = torch.randn(numel, generator=gen)
        g[:4096] = 0.0  # a zero block: scale 0 on the wire, zero error
        frames = [c.encode_layer(g, stamp=(step, 7)) for c in (fast, generic)]
        assert torch.equal(frames[0], frames[1]), step
        for c, f in zip((fast, generic), frames):
            c.sum_frames(torch.cat([f, f]))  # commits the staged residual
        r_fast, r_gen = (c.worker_feedback.residuals["w"] for c in (fast, generic))
        assert torch.allclose(r_fast, r_gen, atol=1e-6, rtol=0), step
        assert torch.equal(r_fast[:4096], torch.zeros(4096))
    bad = torch.randn(numel)
    bad[5] = float("nan")
    kept = fast.worker_feedback.residuals["w"].clone()
    frame = fast.encode_layer(bad, stamp=(3, 7))
    out = fast.sum_frames(torch.cat([frame, frame]))
    assert bool(out.isnan().all()) and torch.equal(fast.worker_feedback.residuals["w"], kept)


@pytest.mark.parametrize("trial", range(8))
def test_jointsq_kernels_equal_the_torch_path(monkeypatch, isa, trial):
    """Histogram, gathers, gaps and the one-pass payload: the same bytes and the same adaptive state
    as the torch path, over sizes, ratios (both position codings), ties, zeros and a NaN."""
    g = torch.Generator().manual_seed(7000 + trial)
    n = int(torch.randint(1, 120_000, (1,), generator=g))
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 2)
    if trial % 2:
        x[:: 1 + trial] = float(x[0])
        x[1:: 3 + trial] = 0.0
    if trial == 7:
        x[n // 2] = float("nan")
    ratio = (5, 8, 20, 100, 1000)[trial % 5]
    results = []
    for native_on in (True, False):
        if not native_on:
            torch_only(monkeypatch)
        codec, rng, state = make_codec("jointsq", ratio=ratio), DitherSource(trial), JointSQState()
        encs = [codec.encode(x * (1 + step), rng, state) for step in range(3)]
        results.append(([codec.to_bytes(e) for e in encs], state.R, state.last_noise))
        monkeypatch.delenv("HVD_GRADQ_NATIVE", raising=False)
    (fast, r_fast, h_fast), (ref, r_ref, h_ref) = results
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))
    assert r_fast == r_ref and h_fast == h_ref
