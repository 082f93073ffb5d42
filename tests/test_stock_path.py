"""hvd_gradq.Compressor through Horovod's own hvd.DistributedOptimizer, under real horovodrun: every
codec and transport against the drop-in (bit for bit) and against uncompressed Horovod, 0-bit layers,
the rank-0 allocator (and the simulation of the same steps), settings that disagree, construction errors."""
import json

import pytest

from tests.hvdrun import WORKERS, horovodrun

WORKER = WORKERS / "stock_check.py"
HEADER_BYTES = 64  # the placeholder: 8 words of int64 (Sum) or float64 (Average)


def results(tmp_path, case, np_):
    files = [tmp_path / f"{case}-rank{r}.json" for r in range(np_)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"ranks wrote no result: {missing}"
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.parametrize("np_,mode", [(2, "mpi"), (2, "gloo"), (4, "mpi"), (4, "gloo")])
def test_every_codec_and_transport_matches_the_dropin_and_conserves_against_horovod(tmp_path, np_, mode):
    run = horovodrun(WORKER, "--case", "matrix", "--out", tmp_path, np=np_, mode=mode, timeout=420)
    assert run.returncode == 0, run.output[-6000:]
    reports = results(tmp_path, "matrix", np_)
    from hvd_gradq.plan.planner import CODECS

    keys = reports[0]["results"].keys()
    assert {k.split("/")[0] for k in keys} == set(CODECS)
    seen = set()
    for key in keys:
        per_rank = [rep["results"][key] for rep in reports]
        stock, dropin = per_rank[0]["stock"], per_rank[0]["dropin"]
        assert len({json.dumps(r["stock"]["digests"]) for r in per_rank}) == 1, f"{key}: ranks diverged"
        if np_ == 2:  # a sum of two floats has one order: bit for bit
            assert stock["digests"] == dropin["digests"], f"{key}: the stock path and the drop-in differ"
        else:  # Horovod may fuse (and so sum) float32 tensors in another order: rounding apart
            assert per_rank[0]["max_difference"] < 1e-4, (key, per_rank[0]["max_difference"])
        assert stock["plans"] == dropin["plans"], f"{key}: bytes per layer differ"
        for r in per_rank:  # the aggregate = uncompressed Horovod's + what the residuals paid (float rounding)
            assert r["stock"]["conservation"] < 2e-5, (key, r["stock"]["conservation"])
        codec, _, op = key.split("/")
        for name, (transport, _bits, sent, _predicted) in stock["plans"].items():
            seen.add(transport)
            # Horovod's Sum carries one-allreduce lanes itself; every other layer sends the placeholder
            carried = op == "sum" and (transport == "float32" or (transport == "allreduce" and codec == "shared_scale"))
            assert stock["sent"][name][0] == sent + (0 if carried else HEADER_BYTES), (key, name, stock["sent"][name])
            if transport == "none":  # a 0-bit layer: nothing but the placeholder header
                assert sent == 0, (key, name)
    assert {"allreduce", "allgather", "two_phase", "lowrank", "none", "float32"} <= seen, seen


def test_the_allocator_on_the_stock_path_agrees_across_ranks_and_with_the_simulation(tmp_path):
    run = horovodrun(WORKER, "--case", "allocator", "--out", tmp_path, np=2, timeout=300)
    assert run.returncode == 0, run.output[-6000:]
    reports = results(tmp_path, "allocator", 2)
    a, b = reports
    assert a["events"] == b["events"] == [0, 3, 6], a["events"]  # the interval trigger, every 3 steps
    for sa, sb in zip(a["steps"], b["steps"]):
        assert sa == sb, "ranks hold different codebooks or parameters"
    bits = a["steps"][-1]["bits"]
    assert len({tuple(v[:2]) for v in bits.values()}) > 2, f"the allocation is not mixed: {bits}"
    assert a["steps"][-1]["version"] == 3
    for real, sim in zip(a["steps"], a["sim"]):  # the simulation of the same steps: same bits, same weights
        assert real["bits"] == sim["bits"] and real["params"] == sim["params"]
    assert "codebook v3, 3 allocations" in a["summary"], a["summary"]
    assert a["overhead"]["allocations"] == 3 and all(t["step"] > 0 for t in a["timings"])


@pytest.mark.parametrize("case,mode", [("mismatch_op", "mpi"), ("mismatch_op", "gloo"), ("mismatch_op_sum", "mpi"),
                                       ("mismatch_bits", "mpi"),
                                       ("mismatch_bits", "gloo"), ("mismatch_process_set", "mpi")])
def test_settings_that_disagree_stop_every_rank_at_the_first_step(tmp_path, case, mode):
    run = horovodrun(WORKER, "--case", case, "--out", tmp_path, np=2, mode=mode, timeout=120)
    assert run.returncode != 0
    for res in results(tmp_path, case, 2):
        assert res["step"] == 0, res
        if case == "mismatch_op":
            assert res["error"] == "ReductionMismatchError", res
            assert "op=hvd.Sum" in res["message"] and "averaged" in res["message"], res
        elif case == "mismatch_op_sum":  # found by the placeholders alone
            assert res["error"] == "ReductionMismatchError", res
            assert "op=hvd.Average" in res["message"] and "summed" in res["message"], res
        elif case == "mismatch_bits":
            assert res["error"] == "CodebookMismatchError", res
            assert "layer 'fc3.weight': bits 2 on rank 0, 4 on rank 1" in res["message"], res
        elif res["rank"] == 1:  # outside the compressor's process set
            assert "process_set" in res["message"], res
        else:  # rank 0 stops too (its placeholder reduced over 2 ranks where its set has 1, or Horovod shut
            # down under it when rank 1 raised): what it sees depends on which came first
            assert res["error"] is not None, res


def test_a_placeholder_digest_does_not_depend_on_when_a_first_round_completes(tmp_path):
    """Rotated lanes with this step's scales change a layer's scales once its statistics are summed;
    a placeholder built after that on one rank and before it on the other would stop the job with a
    codebook mismatch. Rank 1 is made slow so its statistics complete inside compress()."""
    run = horovodrun(WORKER, "--case", "late_statistics", "--out", tmp_path, np=2, mode="gloo", timeout=180)
    a, b = results(tmp_path, "late_statistics", 2)
    assert a["error"] is None and b["error"] is None, (a, b)
    assert run.returncode == 0, run.output[-6000:]
    assert "TwoAllreduces" in a["exchanges"], a["exchanges"]  # the two-round exchange was exercised
    assert len(a["steps"]) == 4 and a["steps"] == b["steps"]


def test_construction_errors_name_the_fix(tmp_path):
    run = horovodrun(WORKER, "--case", "errors", "--out", tmp_path, np=2, timeout=120)
    assert run.returncode == 0, run.output[-6000:]
    for rep in results(tmp_path, "errors", 2):
        err = rep["errors"]
        assert "lr=" in err["lad_without_lr"], err
        assert "summable" in err["allreduce_for_qsgd"], err
        assert "Adasum" in err["adasum"] and "hvd.DistributedOptimizer(op=hvd.Adasum)" in err["adasum"], err
        assert "hvd.DistributedOptimizer(opt, compression=comp)" in err["to_the_dropin"], err
        assert "Allocator(ranks=" in err["allocator_with_lowrank"], err
        assert "matches no parameter" in err["unknown_layer"], err
        assert "named_parameters" in err["optimizer_for_params"], err
