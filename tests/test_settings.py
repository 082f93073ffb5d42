"""``hvd_gradq.Coding``: validated once, taken as keywords or as one object by the drop-in and the
simulation alike (the rotated codes' settings included)."""
import pytest
import torch

import hvd_gradq
from hvd_gradq.settings import Coding


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


@pytest.mark.parametrize("kw,needle", [
    ({"codec": "rotated", "rotation": 1000}, "power of two"),
    ({"codec": "rotated", "rotation": 0}, "needs a rotation block"),
    ({"codec": "rotated", "rounding": "up"}, "rounding"),
    ({"codec": "rotated", "block_scales": "next_step"}, "block_scales"),
    ({"codec": "bogus"}, "codec"),
])
def test_bad_settings_are_refused_naming_the_setting(kw, needle):
    with pytest.raises(ValueError, match=needle):
        Coding(**kw)


def test_rotation_settings_are_keywords_of_the_simulation_and_reach_every_transport():
    m = model()
    sim = hvd_gradq.SimulatedWorkers(torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters(), 2,
                                     codec="rotated", bits=2, rotation=512, rounding="stochastic",
                                     block_scales="previous_step", min_elements=100,
                                     transport={"0.weight": "allreduce", "2.weight": "allgather"})
    assert (sim.coding.rotation, sim.coding.rounding, sim.coding.block_scales) == (512, "stochastic", "previous_step")
    ex = sim.exchanges[0]
    lanes, gathered = ex.codebook["0.weight"], ex.codebook["2.weight"]
    assert lanes.rotation == 512 and lanes.rounding == "stochastic" and lanes.codec_key == ""  # last step's scales
    assert ex.plans["2.weight"].gather.rotation == 512 and ex.plans["2.weight"].gather.rounding == "stochastic"
    assert gathered.codec_key == "rotation=512;rounding=stochastic"
    for _ in range(3):  # trains: finite parameters
        sim.zero_grad()
        for _ in range(2):
            sim.backward(m(torch.randn(8, 64)).square().mean())
        sim.step()
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())


def test_coding_object_or_keywords_not_both():
    m = model()
    coding = Coding(codec="rotated", rotation=1024)
    sim = hvd_gradq.SimulatedWorkers(torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters(), 2, coding=coding)
    assert sim.coding is coding
    with pytest.raises(ValueError, match="not both"):
        hvd_gradq.SimulatedWorkers(torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters(), 2, coding=coding,
                                   rounding="stochastic")
