"""ALQ / AMQ level fitting: lower normalised variance than fixed levels on real gradients."""
import pytest
import torch
import torch.nn.functional as F

from hvd_gradq.codecs import make_codec
from hvd_gradq.codecs.adaptive import (
    exponential_levels,
    fit_alq,
    fit_amq,
    min_multiplier,
    normalized_coordinates,
    normalized_variance,
)
from hvd_gradq.codecs.levels import linear_levels
from workloads.datasets import fashion_mnist
from workloads.models import FashionCNN


@pytest.fixture(scope="module")
def gradients():
    """Flattened gradients of the Fashion-MNIST CNN after 30 SGD steps: (fit set, held-out set)."""
    torch.manual_seed(0)
    x, y = fashion_mnist("train")
    model = FashionCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def grad(i):
        model.zero_grad()
        F.cross_entropy(model(x[i * 64:(i + 1) * 64]), y[i * 64:(i + 1) * 64]).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    for i in range(30):
        grad(i)
        opt.step()
    return torch.cat([grad(100 + i) for i in range(4)]), torch.cat([grad(200 + i) for i in range(4)])


def test_alq_and_amq_beat_uniform_and_exponential_levels_at_3_bits(gradients):
    """The ALQ paper's claim (3 bits, L2 norm, bucket 8192): adaptive levels have lower normalised
    variance. Fitted on one set of batches, scored on another; margin: at most half of the best
    fixed level set (measured: ALQ ~0.05x, AMQ ~0.07x of exponential)."""
    fit_set, held_out = gradients
    r_fit = normalized_coordinates(fit_set, "l2", 8192)
    r_test = normalized_coordinates(held_out, "l2", 8192)
    fixed = min(normalized_variance(linear_levels(4), r_test), normalized_variance(exponential_levels(0.5, 4), r_test))
    alq = normalized_variance(fit_alq(r_fit, exponential_levels(0.5, 4)), r_test)
    amq = normalized_variance(exponential_levels(fit_amq(r_fit, 4), 4), r_test)
    assert alq <= 0.5 * fixed, (alq, fixed)
    assert amq <= 0.5 * fixed, (amq, fixed)


@pytest.mark.parametrize("init", ["uniform", "exponential"])
@pytest.mark.parametrize("count", [4, 8, 16])
def test_coordinate_descent_never_increases_the_objective(gradients, init, count):
    r = normalized_coordinates(gradients[0], "linf", 1024)
    start = linear_levels(count) if init == "uniform" else exponential_levels(0.5, count)
    fitted = fit_alq(r, start)
    assert fitted[0] == 0 and fitted[-1] == 1 and bool((fitted[1:] >= fitted[:-1]).all())
    assert normalized_variance(fitted, r) <= normalized_variance(start, r) + 1e-12


def test_codec_fit_updates_shared_levels(gradients):
    for name in ("alq", "amq"):
        codec = make_codec(name, 3, bucket_size=8192)
        before = codec.levels.clone()
        levels = codec.fit(gradients[0])
        assert not torch.equal(levels, before) and torch.equal(codec.levels, levels)
        twin = make_codec(name, 3, bucket_size=8192)
        twin.load_state_dict(codec.state_dict())  # what the codebook carries to other ranks
        assert torch.equal(twin.levels, codec.levels)


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 7, 8])
def test_amq_fits_at_every_width_from_its_grid_of_starts(bits):
    """The starting grid stays inside the multipliers the level count allows (float64; a float32
    grid put its first point just below the bound at 7 bits)."""
    count = 1 << (bits - 1)
    r = torch.rand(20_000, generator=torch.Generator().manual_seed(bits)) ** 4
    p = fit_amq(r, count)
    assert min_multiplier(count) <= p < 1
    levels = exponential_levels(p, count)
    assert normalized_variance(levels, r) <= normalized_variance(exponential_levels(0.5 if min_multiplier(
        count) <= 0.5 else min_multiplier(count), count), r) + 1e-12
