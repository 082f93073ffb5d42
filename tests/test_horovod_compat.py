"""Horovod's own recipes with hvd_gradq swapped in, under real horovodrun: resuming with
broadcast_optimizer_state, process sets of one rank, sparse gradients, hvd.join(), elastic
shrinking to one worker, and the smaller cases of the audit (tests/workers/compat_check.py)."""
import json

import pytest

from tests.hvdrun import WORKERS, elastic_horovodrun, horovodrun, worker_records

WORKER = WORKERS / "compat_check.py"
GAP = 1e-5  # float rounding; a wrong factor (sum for mean, N for k ranks) shows as >= 0.3
# Horovod 0.28.1's words (horovod/torch/optimizer.py), which the drop-in keeps
STEP_WARNING = ("optimizer.step() called without optimizer.skip_synchronize() context after optimizer.synchronize(). "
                "This can cause training slowdown. You may want to consider using optimizer.skip_synchronize() "
                "context if you use optimizer.synchronize() in your code.")
ZERO_GRAD = ("optimizer.zero_grad() was called after loss.backward() but before optimizer.step() or "
             "optimizer.synchronize(). This is prohibited as it can cause a race condition.")
NP2 = [(2, "mpi"), (2, "gloo")]
ALL = [*NP2, (4, "mpi"), (4, "gloo")]  # 4 processes on 2 cores: slow, kept for the collective-heavy cases


def run_case(tmp_path, case, np_, mode) -> list[dict]:
    run = horovodrun(WORKER, "--case", case, "--out", tmp_path, np=np_, mode=mode, timeout=90 if np_ == 2 else 180)
    assert run.returncode == 0, run.output[-6000:]
    files = [tmp_path / f"{case}-rank{r}.json" for r in range(np_)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"ranks wrote no result: {missing}\n{run.output[-3000:]}"
    return [json.loads(f.read_text()) for f in files]


def ok(res, key):
    value = res[key]
    assert not (isinstance(value, dict) and value.get("error")), f"{key}: {value}"
    return value


def same(values) -> bool:
    return len(set(values)) == 1


@pytest.mark.parametrize("np_,mode", ALL)
def test_resume_recipe_with_broadcast_optimizer_state(tmp_path, np_, mode):
    """Rank 0 loads a checkpoint, broadcast_parameters + broadcast_optimizer_state, training: no hang
    (it hung before: Horovod stepped the drop-in in full on the ranks with empty state), every rank
    holds rank 0's optimizer state, and the drop-in's parameters stay identical (Horovod's own
    optimizer lets the state-materialising step apply weight decay on those ranks)."""
    reports = run_case(tmp_path, "resume", np_, mode)
    for rep in reports:
        for kind in ("dropin", "stock", "mixed", "wrapped"):
            for name in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad"):
                res = ok(rep, f"{kind}.{name}")
                assert res["state"] == [res["expected_state"]] * np_, (kind, name, res)
                assert same(res["params_after_broadcast"]) and same(res["params"]), (kind, name, res)
                assert res["finite"]
        assert rep["dropin.elastic_sync_handler"] == "GradqOptimizerStateHandler"
        assert set(rep["mixed.transports"].values()) == {"lowrank", "allgather", "allreduce", "float32"}, rep


@pytest.mark.parametrize("np_,mode", ALL[:3])
def test_process_set_of_one_rank_with_average(tmp_path, np_, mode):
    """At N = 1 Sum and Average are both the identity: no ReductionMismatchError (there was one), and
    the aggregate is the rank's own coded gradient."""
    for rep in run_case(tmp_path, "size_one", np_, mode):
        for kind in ("stock", "dropin"):
            res = ok(rep, kind)
            assert res["process_set_size"] == 1
            assert res["gap"][0] == 0.0 and max(res["gap"]) < GAP, (kind, res)
        assert rep["dropin"]["allocations"] >= 2  # the allocator decided on a one-rank process set


@pytest.mark.parametrize("np_,mode", NP2)
def test_sparse_gradients(tmp_path, np_, mode):
    """nn.Embedding(sparse=True): Horovod's sparse path (no compress call; was a TypeError in
    decompress), sparse_as_dense=True (was 'not the gradient of any parameter'; two embeddings of
    one shape are told apart), the drop-in with SGD and SparseAdam (gradients handed back sparse),
    and groups= refused with the fix named."""
    reports = run_case(tmp_path, "sparse", np_, mode)
    for rep in reports:
        exact = ok(rep, "stock.sparse_as_dense=False")
        assert max(exact["gap"]) < GAP and set(exact["packed"]) == {"decoder.weight", "decoder.bias"}, exact
        coded = ok(rep, "stock.sparse_as_dense=True")
        assert max(coded["gap"]) < GAP, coded
        assert coded["packed"]["words.weight"] and coded["packed"]["context.weight"], coded
        for key in ("dropin.sparse_as_dense=False", "dropin.sparse_as_dense=True", "dropin.SparseAdam"):
            res = ok(rep, key)
            assert max(res["gap"]) < 0.1, (key, res)  # 8-bit QSGD's own error, ~0.04
            assert res["grad_sparse"] == [True, True]
        for key in ("stock.sparse_as_dense=False", "stock.sparse_as_dense=True", "dropin.sparse_as_dense=False",
                    "dropin.SparseAdam"):
            assert same(rep[key]["params"]) and len(rep[key]["params"]) == np_, (key, rep[key])
        grouped = rep["stock.groups"]
        assert grouped["error"] == "ValueError" and "groups" in grouped["message"], grouped
        assert "sparse_as_dense=True or False" in grouped["message"]


@pytest.mark.parametrize("np_,mode", ALL)
def test_join_with_uneven_data(tmp_path, np_, mode):
    """Ranks call hvd.join() one after another; the others train on with the joined ranks' zeros and
    Average's division by N, exactly as plain Horovod reduces; after sync_codebook every rank
    trains from one codebook again."""
    for rep in run_case(tmp_path, "join", np_, mode):
        r = rep["rank"]
        for kind in ("stock", "dropin", "mixed"):  # mixed: low-rank factors and this step's rotated lanes
            res = ok(rep, kind)
            assert res["last"] == 0
            assert len(res["gap"]) == 2 + (3 if r == 0 else r - 1) + 3, res
            assert max(res["gap"]) < GAP, (kind, res)
            assert same(res["params"]) and len(res["params"]) == np_, res


@pytest.mark.parametrize("np_,mode", NP2)
def test_audit_cases(tmp_path, np_, mode):
    for rep in run_case(tmp_path, "audit", np_, mode):
        pre = ok(rep, "predivide")  # Horovod's prescale/postscale on the exact-integer float64 lanes
        assert max(pre["gap"]) < GAP and pre["packed"] >= 2, pre
        for kind in ("stock", "dropin"):  # model.parameters() for the compressor, no named_parameters
            assert same(ok(rep, f"unnamed.{kind}")["params"])
        dups = ok(rep, "duplicate_names")  # refused by Horovod, and by both of ours, at construction
        assert all(dups[k] and "duplicate" in dups[k].lower() for k in ("horovod", "compressor", "dropin")), dups
        text = ok(rep, "warning_text")
        assert text["warnings"] == [STEP_WARNING] and text["zero_grad"] == ZERO_GRAD, text
        ts = ok(rep, "torch_state")  # hvd.elastic.TorchState commit/restore keeps the compression state
        assert ts["moved"] and ts["restored"] and same(ts["params"]), ts
        late = rep["unfrozen_later"]
        assert late["error"] == "ValueError" and "did not require grad when the DistributedOptimizer was built" \
            in late["message"], late
        adasum = rep["adasum"]
        assert adasum["error"] == "ValueError" and "op=hvd.Adasum" in adasum["message"], adasum


def test_elastic_shrink_to_one_worker_and_back(tmp_path):
    """Horovod elastic, op=hvd.Average: 2 workers -> 1 -> 2, the stock path (compressor in the
    TorchState) and the drop-in side by side. At one worker no mismatch is raised (there was one)
    and every step's aggregate is exactly what the ranks coded; growing back starts both from one
    codebook."""
    run = elastic_horovodrun(tmp_path, WORKERS / "elastic_shrink_check.py", np=2, min_np=1, max_np=2, timeout=240)
    assert run.returncode == 0, run.output[-6000:]
    by_step = worker_records(tmp_path)
    sizes = [by_step[s][0]["size"] for s in sorted(by_step)]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes
    for step, recs in by_step.items():
        assert len(recs) == recs[0]["size"], (step, recs)
        for rec in recs:
            for kind in ("stock", "dropin"):
                assert isinstance(rec[kind], float) and rec[kind] < GAP, (step, kind, rec)
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["size"] == 2 and same(tuple(d) for d in final["digests"]), final
