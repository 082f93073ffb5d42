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
    by_step = worker_records(tmp_path)
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
