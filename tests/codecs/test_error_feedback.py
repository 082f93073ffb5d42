"""Error feedback keeps exactly what the codec dropped."""
import pytest
import torch

from hvd_gradq.codecs import DitherSource, ErrorFeedback, dequantize, quantize_stochastic


def test_residual_carries_what_was_dropped():
    ef = ErrorFeedback()
    gen = torch.Generator().manual_seed(0)
    rng = DitherSource(0)
    g = torch.randn(4, 8, generator=gen)
    sent_total = torch.zeros(32)
    for step in range(50):
        x = ef.compensate("w", g)
        assert x.shape == (32,) and x.dtype == torch.float32
        decoded = dequantize(quantize_stochastic(x, 1.0, 2, rng), 1.0, 2)
        ef.update("w", x, decoded)
        sent_total += decoded
        # invariant: everything fed in so far = everything sent + the residual
        assert torch.allclose(sent_total + ef.residuals["w"], g.reshape(-1) * (step + 1), atol=1e-4)


def test_compensate_leaves_the_gradient_alone_and_state_round_trips():
    ef = ErrorFeedback()
    g = torch.ones(5, dtype=torch.float16)
    x = ef.compensate("b", g)
    ef.update("b", x, torch.zeros(5))
    assert torch.equal(g, torch.ones(5, dtype=torch.float16))
    other = ErrorFeedback()
    other.load_state_dict(ef.state_dict())
    assert torch.equal(other.compensate("b", g), torch.full((5,), 2.0))
    with pytest.raises(ValueError, match="elements"):
        other.compensate("b", torch.ones(6))


def test_staged_residual_becomes_current_only_at_commit():
    ef = ErrorFeedback()
    like = torch.zeros(4)
    assert torch.equal(ef.buffer("w", like), torch.zeros(4))  # new layers start from zero
    ef.buffer("w", like).fill_(1.0)
    ef.staging("w", like).fill_(2.0)
    assert torch.equal(ef.residuals["w"], torch.ones(4))  # a skipped step leaves it as it was
    ef.commit("w")
    assert torch.equal(ef.residuals["w"], torch.full((4,), 2.0))
    ef.commit("w", zero=True)
    assert torch.equal(ef.residuals["w"], torch.zeros(4))
