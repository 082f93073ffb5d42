"""GatherCoder (frames, error feedback, two-phase chunks) with N ranks simulated in one process:
the byte routing of allgather and alltoall is done here by hand, exactly as Horovod delivers it.
Each coder's codebook stamp is kept beside it here (``c.stamp``) and passed to every call, as the
engine does."""
import pytest
import torch

from hvd_gradq.bits.dither import DitherSource
from hvd_gradq.codecs import ErrorFeedback, make_codec
from hvd_gradq.wire.gather_coder import GatherCoder, chunk_frame_bytes, frame_bytes
from hvd_gradq.wire.header import CodebookMismatchError


def coders(size, numel, codec_name="qsgd", bits=4, **kw):
    out = []
    for r in range(size):
        codec = make_codec(codec_name, bits, bucket_size=256) if codec_name != "jointsq" else make_codec(
            "jointsq", ratio=20)
        c = GatherCoder("layer", numel, codec, rank=r, size=size, rng=DitherSource([7, r]),
                        worker_feedback=ErrorFeedback(), server_feedback=ErrorFeedback(), **kw)
        c.stamp = (3, 12345)
        out.append(c)
    return out


def allgather(cs, grads):
    buf = torch.cat([c.encode_layer(g, stamp=c.stamp) for c, g in zip(cs, grads)])
    return [c.sum_frames(buf) for c in cs]


def two_phase(cs, grads):
    sent = [c.encode_chunks(g, stamp=c.stamp) for c, g in zip(cs, grads)]
    pieces = [torch.split(stream, splits) for stream, splits in sent]  # pieces[i][j]: rank i -> rank j
    frames2 = [c.reduce_own_chunk(torch.cat([pieces[i][j] for i in range(len(cs))]), stamp=c.stamp)
               for j, c in enumerate(cs)]
    buf = torch.cat(frames2)
    return [c.assemble(buf) for c in cs]


def residual(c, fb):
    return fb.residuals.get("layer", torch.zeros(0))


@pytest.mark.parametrize("exchange", [allgather, two_phase])
@pytest.mark.parametrize("codec", ["qsgd", "qsgdinf", "terngrad", "jointsq"])
@pytest.mark.parametrize("size,numel", [(2, 5000), (4, 3000), (3, 700)])
def test_every_rank_gets_the_same_sum_and_error_feedback_loses_nothing(exchange, codec, size, numel):
    torch.manual_seed(size * numel)
    cs = coders(size, numel, codec, bits=2 if codec == "terngrad" else 4)
    for _ in range(3):
        grads = [torch.randn(numel) for _ in range(size)]
        entered = sum(g + (c.worker_feedback.residuals.get("layer", torch.zeros(numel))) for c, g in zip(cs, grads))
        server_in = {c.rank: c.server_feedback.residuals.get("layer") for c in cs}
        outs = exchange(cs, grads)
        assert all(torch.equal(outs[0], o) for o in outs[1:]), "ranks decoded different values"
        kept = sum(c.worker_feedback.residuals["layer"] for c in cs)
        total_in = entered.clone()
        total_out = outs[0] + kept
        if exchange is two_phase:
            for c in cs:
                a, b = c.bounds[c.rank], c.bounds[c.rank + 1]
                if b > a:
                    if server_in[c.rank] is not None:
                        total_in[a:b] += server_in[c.rank]
                    total_out[a:b] += c.server_feedback.residuals["layer"]
        assert torch.allclose(total_out, total_in, atol=1e-4), (total_out - total_in).abs().max()
        assert not torch.equal(outs[0], sum(grads)), "a lossy code cannot be exact"


@pytest.mark.parametrize("exchange", [allgather, two_phase])
def test_frames_have_the_predicted_size(exchange):
    cs = coders(4, 5000, "qsgd", 3)
    grads = [torch.randn(5000) for _ in range(4)]
    if exchange is allgather:
        assert cs[0].encode_layer(grads[0], stamp=cs[0].stamp).numel() == frame_bytes(cs[0].codec, 5000)
    else:
        _, splits = cs[1].encode_chunks(grads[1], stamp=cs[1].stamp)
        assert splits == chunk_frame_bytes(cs[1].codec, 5000, 4)


@pytest.mark.parametrize("exchange", [allgather, two_phase])
def test_a_different_stamp_on_one_rank_raises_on_every_rank(exchange):
    cs = coders(3, 2000)
    cs[2].stamp = (4, 12345)  # one rank a codebook version ahead
    grads = [torch.randn(2000) for _ in range(3)]
    with pytest.raises(CodebookMismatchError, match="different codebook versions"):
        exchange(cs, grads)
    cs = coders(3, 2000)
    cs[0].stamp = (3, 999)  # same version, different layer digest (e.g. bits)
    sent = [c.encode_layer(g, stamp=c.stamp) for c, g in zip(cs, grads)]
    for c in cs:
        with pytest.raises(CodebookMismatchError, match="different codebooks"):
            c.sum_frames(torch.cat(sent))


@pytest.mark.parametrize("exchange", [allgather, two_phase])
def test_nan_on_one_rank_gives_nan_everywhere_and_keeps_residuals(exchange):
    cs = coders(2, 3000)
    exchange(cs, [torch.randn(3000), torch.randn(3000)])
    before = [c.worker_feedback.residuals["layer"].clone() for c in cs]
    bad = torch.randn(3000)
    bad[17] = float("nan")
    outs = exchange(cs, [torch.randn(3000), bad])
    assert all(bool(torch.isnan(o).all()) for o in outs)
    assert all(torch.equal(b, c.worker_feedback.residuals["layer"]) for b, c in zip(before, cs))


def test_malformed_bytes_are_reported_not_decoded():
    cs = coders(2, 1000)
    frame = cs[0].encode_layer(torch.randn(1000), stamp=cs[0].stamp)
    with pytest.raises(CodebookMismatchError, match="too few"):
        cs[0].sum_frames(frame)  # one frame where two are expected
    junk = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(CodebookMismatchError, match="not an hvd_gradq frame"):
        cs[0].sum_frames(torch.cat([frame, junk]))
