"""Step timings (``opt.step_timings()``) under real horovodrun -np 2: every phase measured, none
negative, and together the step's wall clock; known compute and a known wait show up where they
belong."""
import json

import pytest

from hvd_gradq.exchange.timings import PHASES, StepTimer, summarize
from tests.hvdrun import WORKERS, horovodrun


def _ranks(tmp_path):
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def check_records(tmp_path, update: bool):
    """Both ranks' six records: every phase >= 0 and together the step; encode, decode measured;
    ``update`` > 0 (the drop-in) or 0 (the stock path); each step within 2% of the worker's own
    clock (end of one step to the end of the next); the forward's sleep in compute after the first
    step; rank 1 is 0.25 s late on odd steps: rank 0 waits for it there, rank 1 counts it as compute."""
    r0, r1 = _ranks(tmp_path)
    for res in (r0, r1):
        recs = res["timings"]
        assert len(recs) == 6
        for rec in recs:
            assert all(rec[k] >= 0 for k in PHASES), rec
            assert abs(sum(rec[k] for k in PHASES) - rec["step"]) < 1e-9
            assert rec["encode"] > 0 and rec["decode"] > 0 and (rec["update"] > 0) == update, rec
        for rec, wall in zip(recs[1:], res["walls"]):
            assert abs(rec["step"] - wall) <= 0.005 + 0.02 * wall, (rec, wall)
        assert all(rec["compute"] >= 0.05 for rec in recs[1:]), recs
    for step in (1, 3, 5):
        assert r0["timings"][step]["wait"] >= 0.15, r0["timings"][step]
        assert r1["timings"][step]["compute"] >= 0.25, r1["timings"][step]
    return r0, r1


@pytest.mark.parametrize("codec,transport", [("rotated", "auto"), ("rotated", "allgather"), ("qsgd", "two_phase")])
def test_drop_in_step_timings_add_up_to_the_wall_clock_and_show_compute_and_waiting(tmp_path, codec, transport):
    run = horovodrun(WORKERS / "timing_check.py", "--codec", codec, "--transport", transport, "--out", tmp_path,
                     timeout=240)
    assert run.returncode == 0, run.output[-6000:]
    r0, r1 = check_records(tmp_path, update=True)
    for res in (r0, r1):
        assert all(rec["bytes"] == res["payload"] > 0 for rec in res["timings"])
        assert res["timings"][0]["compute"] < 0.05  # its clock starts at its first gradient hook
    for step in (1, 3, 5):
        assert r1["timings"][step]["wait"] < 0.1, r1["timings"][step]
    for step in (2, 4):
        assert r0["timings"][step]["wait"] < 0.1, r0["timings"][step]


def test_stock_compressor_times_its_steps(tmp_path):
    """On Horovod's own optimizer the compressor closes a step at its last decompress: the update
    falls into the next step's compute, and Horovod's blocking between decompress calls is wait."""
    run = horovodrun(WORKERS / "timing_check.py", "--codec", "stock", "--out", tmp_path, timeout=240)
    assert run.returncode == 0, run.output[-6000:]
    for res in check_records(tmp_path, update=False):  # step 0 goes as float32 (calibration)
        assert all(rec["bytes"] == res["payload"] > 0 for rec in res["timings"][1:]), res["timings"]


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
