"""Horovod elastic (real horovodrun with a host discovery script): the job grows from 2 to 3 workers
and shrinks back to 2; after each change every worker follows one codebook rebuilt for the new N."""
import json

import pytest
import torch

from hvd_gradq.bits.lanes import lane_layout
from tests.hvdrun import WORKERS, elastic_horovodrun, worker_records

WORKER = WORKERS / "elastic_check.py"


@pytest.mark.parametrize("config", ["lanes", "lowrank"])
def test_workers_added_and_removed_share_one_codebook_rebuilt_for_the_new_size(tmp_path, config):
    run = elastic_horovodrun(tmp_path, WORKER, "--config", config, np=2, min_np=2, max_np=3, timeout=300)
    assert run.returncode == 0, run.output[-6000:]
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["size"] == 2 and len(set(final["param_digests"])) == 1, final
    records = [r for recs in worker_records(tmp_path).values() for r in recs]
    failed = [r for r in records if r["failed"]]
    by_step = {}
    for r in records:
        if not r["failed"]:
            by_step.setdefault(r["step"], []).append(r)
    sizes = [by_step[s][0]["size"] for s in sorted(by_step)]
    assert 3 in sizes and sizes[0] == 2 and sizes[-1] == 2, sizes
    for step, recs in by_step.items():
        size = recs[0]["size"]
        assert all(r["size"] == size for r in recs), f"step {step}: workers disagree on the world size"
        assert sorted(r["rank"] for r in recs) == list(range(size)), f"step {step}: {len(recs)} records"
        assert len({r["digest"] for r in recs}) == 1, f"step {step}: workers hold different codebooks"
    # lane widths follow N: every lane layer's width is the one for its bits and this step's N
    for step, recs in by_step.items():
        size = recs[0]["size"]
        for name, bits, transport, lane_bits in recs[0]["rows"]:
            if transport == "allreduce" and lane_bits is not None and bits <= 8:
                assert lane_bits == lane_layout(bits, size, torch.int64).lane_bits, (step, name, size)
    if config == "lanes":
        assert any(row[2] == "allreduce" for recs in by_step.values() for row in recs[0]["rows"])
        check_residuals_and_allocations(by_step, failed)
        return
    # low-rank layers: every worker, the one that joined too, starts each step from the same warm-start Q,
    # and a resize keeps the Q the job had (rank 0's), not a fresh one from the key
    steps = sorted(by_step)
    assert len(by_step[steps[0]][0]["low"]) >= 2
    for step in steps:
        assert len({r["q_before"] for r in by_step[step]}) == 1, f"step {step}: workers hold different Q"
    resized = [s for a, s in zip(steps, steps[1:]) if by_step[s][0]["size"] != by_step[a][0]["size"]]
    assert len(resized) == 2, resized
    for a, s in zip(steps, steps[1:]):
        if s in resized:
            assert by_step[s][0]["q_before"] == next(r["q_after"] for r in by_step[a] if r["rank"] == 0), s


def check_residuals_and_allocations(by_step, failed):
    """Every step sent what entered minus what the ranks still owe; a worker's residuals cross each
    resize whole; the injected failure's restore() puts back the committed residuals; the bits are
    re-decided at the first step after each resize."""
    steps = sorted(by_step)
    for step in steps:
        for r in by_step[step]:
            assert r["gap"] < 1e-5, (step, r["rank"], r["gap"])
    mine = {}  # pid -> that worker's records in step order
    for step in steps:
        for r in by_step[step]:
            mine.setdefault(r["pid"], []).append(r)
    resized = [s for a, s in zip(steps, steps[1:]) if by_step[s][0]["size"] != by_step[a][0]["size"]]
    assert len(resized) == 2, resized
    carried = 0
    for s in resized:
        assert all(r["allocated"] for r in by_step[s]), (s, [r["allocated"] for r in by_step[s]])
        for r in by_step[s]:
            earlier = [e for e in mine[r["pid"]] if e["step"] < s]
            if earlier:  # a worker that was there before the resize owes what it owed
                assert r["owed_before"] == pytest.approx(earlier[-1]["owed_after"], rel=1e-6, abs=1e-9), (s, r["pid"])
                carried += earlier[-1]["owed_norm"] > 0
            else:  # the worker that joined owes nothing yet
                assert r["owed_before"] == 0.0, (s, r)
    assert carried >= 2, "no residual was carried across a resize"
    assert len(failed) == 2 and len({f["step"] for f in failed}) == 1, failed
    for f in failed:
        redone = next(r for r in by_step[f["step"]] if r["pid"] == f["pid"])
        last = next(e for e in reversed(mine[f["pid"]]) if e["step"] < f["step"])
        assert f["owed_after"] != pytest.approx(f["owed_before"], rel=1e-6), "the failed step changed nothing"
        assert redone["owed_before"] == pytest.approx(last["owed_after"], rel=1e-6, abs=1e-9), (f, redone)
        assert redone["owed_before"] == pytest.approx(f["owed_before"], rel=1e-6, abs=1e-9)
