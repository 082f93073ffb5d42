"""Step timings (``opt.step_timings()``) under real horovodrun -np 2: every phase measured, none
negative, and together the step's wall clock; known compute and a known wait show up where they
belong."""
import json

import pytest

from hvd_gradq.exchange.timings import PHASES, StepTimer, summarize
from tests.hvdrun import WORKERS, horovodrun


def _ranks(tmp_path):
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("codec,transport", [("rotated", "auto"), ("rotated", "allgather"), ("qsgd", "two_phase")])
def test_drop_in_step_timings_add_up_to_the_wall_clock_and_show_compute_and_waiting(tmp_path, codec, transport):
    run = horovodrun(WORKERS / "timing_check.py", "--codec", codec, "--transport", transport, "--out", tmp_path,
                     timeout=240)
    assert run.returncode == 0, run.output[-6000:]
    r0, r1 = _ranks(tmp_path)
    for res in (r0, r1):
        recs = res["timings"]
        assert len(recs) == 6
        for rec in recs:
            assert all(rec[k] >= 0 for k in PHASES), rec
            assert abs(sum(rec[k] for k in PHASES) - rec["step"]) < 1e-9
            assert rec["encode"] > 0 and rec["decode"] > 0 and rec["update"] > 0, rec
            assert rec["bytes"] == res["payload"] > 0
        # the worker's own clock, from the end of one step to the end of the next
        for rec, wall in zip(recs[1:], res["walls"]):
            assert abs(rec["step"] - wall) <= 0.005 + 0.02 * wall, (rec, wall)
        # the forward's sleep is compute, on every step after the first (whose clock starts at its
        # first gradient hook, after the forward)
        assert all(rec["compute"] >= 0.05 for rec in recs[1:]), recs
        assert recs[0]["compute"] < 0.05
    # rank 1 is 0.25 s late on odd steps: rank 0 waits for it there and rank 1 counts it as compute
    for step in (1, 3, 5):
        assert r0["timings"][step]["wait"] >= 0.15, r0["timings"][step]
        assert r1["timings"][step]["compute"] >= 0.25, r1["timings"][step]
        assert r1["timings"][step]["wait"] < 0.1, r1["timings"][step]
    for step in (2, 4):
        assert r0["timings"][step]["wait"] < 0.1, r0["timings"][step]


def test_stock_compressor_times_its_encode_and_decode(tmp_path):
    run = horovodrun(WORKERS / "timing_check.py", "--codec", "stock", "--out", tmp_path, timeout=240)
    assert run.returncode == 0, run.output[-6000:]
    for res in _ranks(tmp_path):
        assert len(res["coding"]) == 6
        for c, wall in zip(res["coding"][1:], res["walls"]):
            assert 0 < c["encode"] < wall and 0 < c["decode"] < wall, (c, wall)


def test_timer_records_and_summary():
    t = StepTimer(keep=3)
    t.add("encode", 0.2)
    t.timed("decode", lambda: None)()
    rec = t.close(1.0, 100, allocation=0.1, update=0.05, other=0.05)
    assert rec["compute"] == pytest.approx(1.0 - 0.2 - rec["decode"] - 0.2)
    assert rec["bytes"] == 100 and rec["step"] == 1.0
    assert t.current["encode"] == 0.0
    with pytest.raises(ValueError, match="unknown phase"):
        t.close(1.0, 0, copmute=0.1)
    for _ in range(4):
        t.close(2.0, 10)
    assert len(t.history) == 3
    s = summarize(list(t.history))
    assert s["step"] == 2.0 and s["step_median"] == 2.0 and s["compute"] == 2.0
