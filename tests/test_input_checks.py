"""Bad settings are refused at construction with a message that names the fix (not deep in a hook).
The optimizer-level checks (unknown layer patterns, transports a codec cannot use, Adasum, a
compression= argument) run under horovodrun in tests/test_transport.py."""
import math
import re

import pytest
import torch

from hvd_gradq import Allocator, LossProbe, Trigger


def probe():
    model = torch.nn.Linear(4, 2)
    return LossProbe(model, torch.nn.functional.cross_entropy, lambda: [(torch.zeros(1, 4), torch.zeros(1).long())])


@pytest.mark.parametrize("budget,needle", [
    (-1.0, "finite number >= 0"),
    (math.nan, "finite number >= 0"),
    (math.inf, "finite number >= 0"),
    ("2", "finite number >= 0"),
    (True, "finite number >= 0"),
    (1.5, "below the smallest option 2"),
])
def test_allocator_budgets(budget, needle):
    with pytest.raises(ValueError, match=needle) as info:
        Allocator(budget, options=(2, 4, 8), probe=probe())
    if needle.startswith("below"):
        assert "add a smaller option (0 = a layer is not sent)" in str(info.value)


@pytest.mark.parametrize("options", [(), (2, 2), (4, 2), (9,), (-1, 2), (2.5,)])
def test_allocator_options(options):
    with pytest.raises(ValueError, match=re.escape("options must be distinct rising bit widths in 0..8")):
        Allocator(2.0, options=options, probe=probe())


def test_allocator_needs_a_probe_and_known_names():
    with pytest.raises(ValueError, match=re.escape("probe=hvd_gradq.LossProbe")):
        Allocator(2.0)
    with pytest.raises(ValueError, match="metric must be one of"):
        Allocator(2.0, metric="lad2", probe=probe())
    with pytest.raises(ValueError, match="solver must be one of"):
        Allocator(2.0, solver="knapsack", probe=probe())
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        Allocator(2.0, lr=math.nan, probe=probe())


@pytest.mark.parametrize("kw,needle", [
    ({"tau": 1.01}, "tau"), ({"tau": -0.01}, "tau"), ({"tau": math.nan}, "tau"), ({"tau": "0.9"}, "tau"),
    ({"k_min": -1}, "k_min must be an integer >= 0"), ({"k_min": 2.5}, "k_min"),
    ({"interval": 0}, "interval must be an integer >= 1"), ({"warmup": -3}, "warmup"),
    ({"mode": "sometimes"}, "trigger mode must be one of"),
])
def test_trigger_settings(kw, needle):
    with pytest.raises(ValueError, match=needle):
        Trigger(**kw)


def test_edges_are_accepted():
    assert Trigger(tau=0.0, k_min=0).tau == 0.0 and Trigger(tau=1.0).tau == 1.0
    assert Allocator(0.0, options=(0, 2), probe=probe()).budget == 0.0
