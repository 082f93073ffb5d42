"""hvd_gradq.DistributedOptimizer's transports and the stock path's robustness, under real horovodrun."""
import json
import time

import pytest

from tests.hvdrun import WORKERS, horovodrun

WORKER = WORKERS / "transport_check.py"


def rank_files(tmp_path, size, prefix="rank"):
    files = [tmp_path / f"{prefix}{r}.json" for r in range(size)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"ranks wrote no result: {missing}"
    return [json.loads(f.read_text()) for f in files]


def check_exchange(results, size):
    by_config = list(zip(*[r["results"] for r in results]))
    seen_transports, rotated, rotated_gather = set(), 0, 0
    for config in by_config:
        head = config[0]
        label = f"{head['codec']}/{head['transport']}"
        assert len({json.dumps(c["params"]) for c in config}) == 1
        assert len(set(head["params"])) == 1, f"{label}: ranks hold different parameters"
        for name, steps in head["layers"].items():
            for step, info in enumerate(steps):
                where = f"{label} {name} step {step}: {info}"
                seen_transports.add(info["transport"])
                assert info["identical"], f"{where}: ranks decoded different values"
                if info["transport"] == "none":
                    assert info["nonzero"] == 0 and info["payload"] == 0, where
                    continue
                # error feedback loses nothing: what entered == decoded sum + what residuals kept
                assert info["conservation"] < 2e-6, where
                if "bound_violation" in info:
                    assert info["bound_violation"] <= 0, where
                rotated += info.get("rotated", False)
                rotated_gather += info.get("rotated_gather", False)
                if info["transport"] != "float32" and info["bits"] < 8 and step > 0:
                    assert info["err_max"] > 0, f"{where}: a lossy code cannot be exact"
                if info["transport"] == "allreduce" and step == 0:
                    continue  # the calibration step goes as float32 (documented)
                if info["codec"] == "jointsq":  # data dependent: the target size is an upper bound
                    assert 0.95 * info["predicted"] <= info["payload"] <= info["predicted"], where
                else:
                    assert info["payload"] == info["predicted"], where
    assert {"allreduce", "allgather", "two_phase", "none", "float32"} <= seen_transports
    assert rotated > 0, "no rotated lane layer was checked"
    if any(c[0]["codec"] == "rotated" and c[0]["transport"] != "allreduce" for c in by_config):
        assert rotated_gather > 0, "no rotated gather layer was checked"


@pytest.mark.parametrize("mode", ["mpi", "gloo"])
@pytest.mark.parametrize("np_", [2, 4])
def test_every_transport_aggregates_within_the_codec_bound_identically_on_all_ranks(tmp_path, mode, np_):
    run = horovodrun(WORKER, "--case", "exchange", "--out", tmp_path, np=np_, mode=mode, timeout=300)
    assert run.returncode == 0, run.output[-6000:]
    results = rank_files(tmp_path, np_)
    assert all(r["size"] == np_ for r in results)
    check_exchange(results, np_)
    if np_ == 4:  # two process sets of 2 ranks: lanes and chunks are sized for N = 2
        for pair in ((0, 1), (2, 3)):
            sets = [json.loads((tmp_path / f"set_rank{r}.json").read_text()) for r in pair]
            assert all(s["size"] == 2 for s in sets)
            check_exchange(sets, 2)
            stock = [json.loads((tmp_path / f"stock_set_rank{r}.json").read_text()) for r in pair]
            for res in stock:
                assert len(set(res["digest"])) == 1, "ranks of a process set diverged"
                assert sum(res["packed"].values()) >= 3, res
                assert set(res["lane_bits"].values()) == {3}, res  # 2 bits summed over N = 2 ranks


@pytest.mark.parametrize("mode", ["mpi", "gloo"])
def test_optimizer_features_with_compression(tmp_path, mode):
    run = horovodrun(WORKER, "--case", "optim", "--out", tmp_path, np=2, mode=mode, timeout=300)
    assert run.returncode == 0, run.output[-6000:]
    reports = rank_files(tmp_path, 2)
    for rep in reports:
        for key, res in rep.items():
            if key in ("rank", "errors", "link"):
                continue
            assert res["finite"] and res["moved"] > 0, (key, res)
            assert len(set(res["digest"])) == 1, f"{key}: ranks diverged"
            if "frozen_unchanged" in res:
                assert res["frozen_unchanged"], f"{key}: a frozen layer moved"
            if "bound_excess" in res:  # every step against uncompressed hvd.DistributedOptimizer
                excess = res["bound_excess"]
                assert len(excess) >= 8 and max(excess.values()) <= 0, (key, excess)
        for kind in ("stock", "dropin"):  # grouped allreduces change nothing but how they are fused
            for grouped in ("groups2", "groups_list"):
                assert rep[f"{kind}.{grouped}"]["digest"] == rep[f"{kind}.SGD"]["digest"], (kind, grouped)
        assert rep["dropin.predivide3"]["digest"] == rep["dropin.SGD"]["digest"]  # accepted, changes nothing
        checked = [k for k, res in rep.items() if isinstance(res, dict) and "bound_excess" in res]
        assert len(checked) == 2 * 16, checked  # 11 optimizers, bpps 2, 2 groupings, unused layer, freeze
        kinds = {k.split(".")[0] for k in rep if "." in k}
        assert kinds == {"stock", "dropin"}
        from hvd_gradq.plan.planner import CODECS

        assert all(f"dropin.codec.{c}" in rep for c in CODECS)
        for c in CODECS:  # the aggregate = uncompressed Horovod's + the mean of what the ranks' residuals paid
            assert rep[f"dropin.codec.{c}"]["conservation"] < 1e-5, (c, rep[f"dropin.codec.{c}"]["conservation"])
        link = rep["link"]
        assert link[0] == link[1] and link[0][0] > 0 and link[0][1] > 0, link  # rank 0's figures everywhere
        assert sum(k.startswith("dropin.") for k in rep) >= 15
        err = rep["errors"]
        assert "Adasum" in err["adasum"] and "hvd.Average or hvd.Sum" in err["adasum"]
        assert "hvd.Sum" in err["stock_adasum"]
        assert "codec=" in err["compression_arg"]
        assert "summable" in err["allreduce_for_qsgd"]
        assert "matches no parameter" in err["unknown_layer"]
        assert "gradient_predivide_factor needs op=hvd.Average" in err["predivide_with_sum"]
        # sparse gradients are densified and coded like any layer, with or without sparse_as_dense
        assert err["sparse_as_dense=False"] is None and err["sparse_as_dense=True"] is None
        assert len(set(err["sparse_digest"])) == 1


@pytest.mark.parametrize("case,mode", [
    ("version_mismatch", "mpi"), ("bits_mismatch", "mpi"), ("rotation_mismatch", "mpi"),
    ("lowrank_seed_mismatch", "mpi"), ("lowrank_factors_mismatch", "mpi"),
    ("bits_mismatch", "gloo"), ("bits_mismatch_lanes", "gloo"), ("bits_mismatch_lanes", "mpi"),
    ("bits_mismatch_two_phase", "gloo"), ("transport_mismatch", "mpi"), ("transport_mismatch", "gloo"),
    ("transport_mismatch_lanes", "gloo"), ("lowrank_factors_mismatch", "gloo")])
def test_codebook_disagreement_stops_every_rank_with_a_clear_error(tmp_path, case, mode):
    """Every rank compares the ranks' codebooks before it waits for any of the first step's
    collectives (ranks that disagree on a transport would otherwise wait in different ones), so the
    error names what differs; the payload digests catch the rest at every step."""
    start = time.monotonic()
    run = horovodrun(WORKER, "--case", case, "--out", tmp_path, np=2, mode=mode, timeout=120)
    elapsed = time.monotonic() - start
    assert run.returncode != 0
    assert elapsed < 60, f"the job took {elapsed:.0f}s to end"
    for res in rank_files(tmp_path, 2):
        assert res["error"] == "CodebookMismatchError", res
        assert res["step"] == 0
        assert "different codebook" in res["message"] and "hvd_gradq.DistributedOptimizer" in res["message"], res
        if case == "version_mismatch":
            assert "version 0 on rank 0, 1 on rank 1" in res["message"], res
        if case.startswith("transport_mismatch"):
            assert "transport 'allgather' on rank 0" in res["message"] or "transport 'allreduce' on rank 0" in \
                res["message"], res


def test_a_rank_holding_other_per_type_levels_is_stopped_by_the_digest(tmp_path):
    """Per-type ALQ levels (``level_groups=layer_types(model)``) are fitted on rank 0 after step 0 and
    shared; rank 1 then replaces the weights' type's inner levels by others (x 0.97). The fitted levels
    enter each layer's digest, so step 1 stops both ranks with the codebook error."""
    start = time.monotonic()
    run = horovodrun(WORKER, "--case", "levels_mismatch", "--out", tmp_path, np=2, timeout=120)
    assert run.returncode != 0 and time.monotonic() - start < 60
    for res in rank_files(tmp_path, 2):
        assert res["step"] == 1 and res["error"] == "CodebookMismatchError", res
        assert "different codebook" in res["message"], res


def test_ranks_that_disagree_on_a_low_rank_layer_s_rank_stop_with_a_clear_error(tmp_path):
    """Rank 0 sends rank-2 factors, rank 1 rank-3: the codebooks compared before the first step's
    collectives are waited for name the layers, the ranks and the fix on every rank."""
    start = time.monotonic()
    run = horovodrun(WORKER, "--case", "lowrank_rank_mismatch", "--out", tmp_path, np=2, timeout=120)
    assert run.returncode != 0 and time.monotonic() - start < 60
    for res in rank_files(tmp_path, 2):
        assert res["step"] == 0 and res["error"] == "CodebookMismatchError", res
        assert "layer 'fc1.weight': rank 2 on rank 0, 3 on rank 1" in res["message"], res
        assert "same arguments on every rank" in res["message"] and "rank=" in res["message"]


def test_ranks_at_different_steps_are_stopped_by_the_verdict_s_step_check(tmp_path):
    """With an allocator, rank 0's trigger verdict is summed with every rank's step each step; rank 1's
    count is made to run one ahead: both ranks read the mismatch from the same sum and raise the step
    error at the same step, so neither runs on into a step the other never joins."""
    start = time.monotonic()
    run = horovodrun(WORKER, "--case", "step_mismatch", "--out", tmp_path, np=2, timeout=120)
    assert run.returncode != 0 and time.monotonic() - start < 60
    results = rank_files(tmp_path, 2)
    for res, here in zip(results, (1, 2)):
        assert res["step"] == 1 and res["error"] == "RuntimeError", res
        assert f"ranks are at different steps ({here} here, 1 on the root, 1.5 on average over 2 ranks)" \
            in res["message"], res
