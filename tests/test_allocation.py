"""Trigger + rank-0 allocation + broadcast under real horovodrun: every rank follows one codebook."""
import json
import math
import time

import pytest

from tests.hvdrun import WORKERS, horovodrun

WORKER = WORKERS / "alloc_check.py"


def rank_files(tmp_path, size):
    files = [tmp_path / f"rank{r}.json" for r in range(size)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"ranks wrote no result: {missing}"
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.parametrize("mode,np_,metric,solver,trigger", [
    ("mpi", 2, "lad", "lagrangian", "interval"),
    ("gloo", 2, "lad_first_order", "greedy", "similarity"),
    ("mpi", 4, "mse", "mckp_dp", "interval"),
])
def test_every_rank_switches_to_the_same_codebook_at_the_same_step(tmp_path, mode, np_, metric, solver, trigger):
    run = horovodrun(WORKER, "--out", tmp_path, "--metric", metric, "--solver", solver, "--trigger", trigger,
                     "--steps", "9", np=np_, mode=mode, timeout=300)
    assert run.returncode == 0, run.output[-6000:]
    results = rank_files(tmp_path, np_)
    head = results[0]
    for res in results[1:]:
        assert [s["version"] for s in res["steps"]] == [s["version"] for s in head["steps"]]
        assert [s["digest"] for s in res["steps"]] == [s["digest"] for s in head["steps"]]
        assert [(e["step"], e["version"]) for e in res["events"]] == [(e["step"], e["version"]) for e in head["events"]]
    assert len({json.dumps(d) for d in head["param_digests"]}) == 1, "ranks hold different parameters"
    events = head["events"]
    assert len(events) >= 2 and events[0]["step"] == 0
    if trigger == "interval":
        assert [e["step"] for e in events] == [0, 4, 8]
    else:  # similarity: never two allocations within k_min = 3 steps
        assert all(b["step"] - a["step"] >= 3 for a, b in zip(events, events[1:]))
    assert [e["version"] for e in events] == list(range(1, len(events) + 1))
    assert all(math.isfinite(s["loss"]) for s in head["steps"])
    # every layer started at bits=4; the allocations (budget 2.5) must have moved some of them
    assert any(b != 4 for b in head["steps"][0]["bits"].values()), head["steps"][0]["bits"]
    assert all(b in (0, 2, 3, 4, 6, 8) for s in head["steps"] for b in s["bits"].values())
    o = head["overhead"]
    assert o["allocations"] == len(events) and o["seconds"] > 0 and 0 < o["fraction"] < 1
    if metric == "lad":
        assert all(e["forwards"] > 0 for e in events)
    assert "codebook v" in head["summary"]
    assert head["channel"] == ("mpi4py" if mode == "mpi" else "horovod")


@pytest.mark.parametrize("mode,np_", [("mpi", 3), ("gloo", 2)])
def test_the_lad_table_spread_over_the_ranks_is_rank_0s_table_cell_for_cell(tmp_path, mode, np_):
    run = horovodrun(WORKER, "--out", tmp_path, "--steps", "5", "--spread-check", np=np_, mode=mode, timeout=300)
    assert run.returncode == 0, run.output[-6000:]
    head = rank_files(tmp_path, np_)[0]
    check = head["spread_check"]
    spread, alone = check["spread"], check["alone"]
    assert "error" not in spread and "error" not in alone, check
    assert spread["bits"] == alone["bits"]
    assert check["spread_table"] == check["alone_table"]  # bitwise: the same forwards, split
    assert spread["forwards"] == alone["forwards"] + (np_ - 1) * 4  # each rank: 2 gradient + 2 reference passes
    # every rank's allocation events in training took the spread path: the same versions everywhere
    assert all(e["forwards"] > 0 for e in head["events"])


@pytest.mark.parametrize("mode,metric,codec,transport", [
    ("mpi", "mse", "shared_scale", "auto"), ("mpi", "lad", "shared_scale", "auto"),
    ("gloo", "mse", "shared_scale", "allreduce"), ("gloo", "lad", "rotated", "allreduce"),
    ("gloo", "mse", "qsgd", "two_phase"), ("mpi", "lad", "qsgd", "two_phase")])
def test_a_failing_allocation_on_rank_0_ends_the_job_on_every_rank(tmp_path, mode, metric, codec, transport):
    start = time.monotonic()
    run = horovodrun(WORKER, "--out", tmp_path, "--fail", "--metric", metric, "--codec", codec,
                     "--transport", transport, "--steps", "3", mode=mode, timeout=120)
    assert run.returncode != 0
    assert time.monotonic() - start < 60
    for res in rank_files(tmp_path, 2):
        assert res["error"] == "RuntimeError" and "allocation on rank 0 failed at step 0" in res["message"], res
        assert "budget" in res["message"]


def test_probe_batches_travel_without_the_dataset_they_are_sliced_from():
    import collections
    import io

    import torch

    from hvd_gradq.exchange.reallocation import _compact

    data = torch.randn(100_000, 8)
    pair = collections.namedtuple("Pair", "x y")
    batches = [(data[10:20], data[:10, 0].long()), pair(data[5:7], {"mask": data[0]})]
    out = _compact(batches)
    buf = io.BytesIO()
    torch.save([out[0], tuple(out[1])], buf)
    assert buf.tell() < 20_000  # the slices, not the 3.2 MB they were cut from
    assert torch.equal(out[0][0], data[10:20]) and isinstance(out[1], pair) and torch.equal(out[1].y["mask"], data[0])
    assert out[0][0].untyped_storage().data_ptr() != data.untyped_storage().data_ptr()
