"""The reallocation trigger on synthetic norm sequences."""
import math

import pytest
import torch

from hvd_gradq.alloc.trigger import Trigger


def rotating(steps, start_deg=0.0, deg_per_step=1.0):
    """Norm vectors whose direction turns by a fixed angle per step (in a 2-D plane of R^3)."""
    out = []
    for t in range(steps):
        a = math.radians(start_deg + deg_per_step * t)
        out.append([math.cos(a), math.sin(a), 0.0])
    return out


def fired_steps(trigger, seq, offset=0):
    return [t + offset for t, v in enumerate(seq) if trigger.observe(t + offset, v)]


def test_fires_first_at_warmup_then_when_similarity_drops_below_tau():
    # cos(theta) < 0.95 once theta > 18.19 degrees: at 1 degree per step, 19 steps after the anchor
    trig = Trigger(tau=0.95, k_min=0, warmup=3)
    assert fired_steps(trig, rotating(60)) == [3, 22, 41]


def test_k_min_delays_firing_and_never_fires_twice_within_it():
    trig = Trigger(tau=0.999, k_min=10)  # similarity drops below tau after ~3 degrees
    steps = fired_steps(trig, rotating(50))
    assert steps == [0, 10, 20, 30, 40]
    assert all(b - a >= 10 for a, b in zip(steps, steps[1:]))


def test_scale_changes_do_not_fire_only_shape_changes_do():
    trig = Trigger(tau=0.95, k_min=0)
    seq = [[1.0 * s, 2.0 * s, 3.0 * s] for s in (1, 10, 0.1, 5, 100)]
    assert fired_steps(trig, seq) == [0]
    assert trig.observe(5, [3.0, 2.0, 1.0])


def test_interval_and_static_modes_and_nonfinite_steps():
    assert fired_steps(Trigger("interval", interval=7), rotating(30)) == [0, 7, 14, 21, 28]
    assert fired_steps(Trigger("static", warmup=2), rotating(30)) == [2]
    trig = Trigger(tau=0.95, k_min=0)
    assert not trig.observe(0, [float("nan"), 1.0])  # skipped, no anchor taken
    assert trig.observe(1, [1.0, 1.0])


@pytest.mark.parametrize("kw,match", [({"tau": 1.5}, "tau"), ({"tau": -0.1}, "tau"), ({"k_min": -1}, "k_min"),
                                      ({"interval": 0}, "interval"), ({"mode": "sometimes"}, "mode")])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Trigger(**kw)


def test_state_round_trip_continues_identically():
    a, b = Trigger(tau=0.97, k_min=5), Trigger(tau=0.97, k_min=5)
    seq = rotating(40, deg_per_step=2.0)
    first = fired_steps(a, seq[:20])
    b.load_state_dict(a.state_dict())
    assert fired_steps(a, seq[20:], 20) == fired_steps(b, seq[20:], 20)
    assert first[0] == 0 and torch.equal(a.anchor, b.anchor)
