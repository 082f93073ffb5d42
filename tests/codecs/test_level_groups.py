"""Level sets fitted per group of layers (``Coding.level_groups``; QODA's per-type quantization
sequences): on real gradients a set fitted to each layer type is at least as good for that type
as one set fitted to all layers, and the groups' layers share one set."""
import pytest
import torch
import torch.nn.functional as F

import hvd_gradq
from hvd_gradq.codecs import make_codec
from hvd_gradq.codecs.adaptive import normalized_variance
from hvd_gradq.codecs.levels import fit_level_groups
from workloads.datasets import fashion_mnist
from workloads.models import FashionCNN


def real_gradients():
    torch.manual_seed(0)
    model = FashionCNN(width=16)
    x, y = fashion_mnist("test")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(5):  # a few steps in, so the gradients are not those of the initialisation only
        opt.zero_grad()
        F.cross_entropy(model(x[64 * i:64 * (i + 1)]), y[64 * i:64 * (i + 1)]).backward()
        opt.step()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.numel() >= 64}
    return grads, hvd_gradq.layer_types(model)


@pytest.mark.parametrize("method", ["alq", "amq"])
def test_per_type_levels_are_shared_within_a_type_and_no_worse_than_global_levels(method):
    grads, types = real_gradients()
    by_type: dict[str, dict] = {}
    for name in grads:
        by_type.setdefault(types[name], {})[name] = make_codec(method, 4, bucket_size=256)
    per_type = fit_level_groups(by_type, grads)
    one = {"global": {name: make_codec(method, 4, bucket_size=256) for name in grads}}
    overall = fit_level_groups(one, grads)
    global_levels = overall["levels"][next(iter(grads))]["levels"]
    assert set(per_type["groups"]) == {"conv", "linear", "norm", "bias"}
    assert len(per_type["groups"]["conv"]["layers"]) > 3
    total_type = total_global = 0.0
    for group, fit in per_type["groups"].items():
        layers = fit["layers"]
        assert len({tuple(per_type["levels"][n]["levels"].tolist()) for n in layers}) == 1  # one set per type
        codec = by_type[group][layers[0]]
        r = torch.cat([codec.coordinates(grads[n]) for n in layers])
        own = normalized_variance(codec.levels, r)
        assert own == pytest.approx(fit["variance"]) and fit["epsilon"] == pytest.approx(256 * fit["variance"])
        shared = normalized_variance(global_levels, r)
        assert own <= shared * 1.02 + 1e-12, (group, own, shared)  # fitted to its own type: no worse
        total_type += own * r.numel()
        total_global += shared * r.numel()
    assert total_type <= total_global * 1.001
    assert overall["groups"]["global"]["variance"] == pytest.approx(total_global / sum(
        codec.coordinates(g).numel() for codec, g in ((make_codec(method, 4, bucket_size=256), g)
                                                      for g in grads.values())), rel=1e-6)


def test_level_groups_are_checked():
    with pytest.raises(ValueError, match="level_groups"):
        hvd_gradq.Coding(codec="alq", bits=3, level_groups="types")
    with pytest.raises(ValueError, match="str -> str"):
        hvd_gradq.Coding(codec="alq", bits=3, level_groups={"a": 1})
    c = hvd_gradq.Coding(codec="alq", bits=3, level_groups={"a": "conv"})
    assert c.level_group("a") == "conv" and c.level_group("b") == "other"
    assert hvd_gradq.Coding(codec="alq", bits=3).level_group("a") == "a"
    assert hvd_gradq.Coding(codec="alq", bits=3, level_groups="global").level_group("a") == "global"
