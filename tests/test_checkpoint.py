"""Checkpoint/resume of the compression state: bit-identical resume under horovodrun, and clear
errors (or an explicit reset) for a checkpoint from another world size or model."""
import json

import pytest
import torch

from hvd_gradq.exchange import state as checkpoint
from tests.hvdrun import WORKERS, horovodrun

WORKER = WORKERS / "resume_check.py"


def results(path, size):
    files = [path / f"rank{r}.json" for r in range(size)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"ranks wrote no result: {missing}"
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The uninterrupted run of each configuration, with its checkpoint after k1 = 5 steps."""
    cache = {}

    def get(config):
        if config not in cache:
            d = tmp_path_factory.mktemp(f"full-{config}")
            run = horovodrun(WORKER, "--phase", "full", "--config", config, "--ckpt", d / "ckpt.pt", "--out", d,
                             timeout=240)
            assert run.returncode == 0, run.output[-6000:]
            cache[config] = (d, results(d, 2))
        return cache[config]

    return get


@pytest.mark.parametrize("config", ["lanes", "gather", "jointsq", "stock", "stock_alloc", "lowrank", "lowrank16"])
def test_resumed_training_is_bit_identical_to_uninterrupted(tmp_path, saved, config):
    full_dir, full = saved(config)
    run = horovodrun(WORKER, "--phase", "resume", "--config", config, "--ckpt", full_dir / "ckpt.pt",
                     "--out", tmp_path, timeout=240)
    assert run.returncode == 0, run.output[-6000:]
    resumed = results(tmp_path, 2)
    for f, r in zip(full, resumed):
        assert r["losses"] == f["losses"][5:], "the resumed steps saw other losses"
        assert r["digest"] == f["digest"], f"rank {r['rank']}: parameters differ after resuming"
        if config != "stock":
            assert r["version"] == f["version"] and r["bits"] == f["bits"]
    assert len({r["digest"] for r in resumed}) == 1
    if config in ("lanes", "stock_alloc"):  # the interval trigger fired at 0, 3 before the checkpoint, 6, 9 after
        assert full[0]["allocations"] == [0, 3, 6, 9]
        assert resumed[0]["allocations"] == [0, 3, 6, 9]
        assert full[0]["version"] == 4


def test_a_checkpoint_from_another_world_size_is_refused_on_every_rank(tmp_path, saved):
    full_dir, _ = saved("lanes")
    run = horovodrun(WORKER, "--phase", "resume", "--config", "lanes", "--ckpt", full_dir / "ckpt.pt",
                     "--out", tmp_path, np=4, timeout=240)
    assert run.returncode != 0
    for res in results(tmp_path, 4):
        assert "saved by 2 ranks and this job has 4" in res["error"]
        assert "reset=True" in res["error"]


def test_reset_starts_the_compression_state_afresh(tmp_path, saved):
    full_dir, _ = saved("gather")
    run = horovodrun(WORKER, "--phase", "resume", "--config", "gather", "--ckpt", full_dir / "ckpt.pt",
                     "--out", tmp_path, "--reset", np=4, timeout=240)
    assert run.returncode == 0, run.output[-6000:]
    res = results(tmp_path, 4)
    assert len({r["digest"] for r in res}) == 1 and len(res[0]["losses"]) == 5


def test_a_checkpoint_of_another_model_names_the_layers(tmp_path, saved):
    full_dir, _ = saved("stock")
    run = horovodrun(WORKER, "--phase", "resume", "--config", "stock", "--ckpt", full_dir / "ckpt.pt",
                     "--out", tmp_path, "--width", "16", timeout=240)
    assert run.returncode != 0
    for res in results(tmp_path, 2):
        assert "different model" in res["error"] and "layers of another size" in res["error"]
        assert "features.0.0.weight" in res["error"]


# ---- the bundle checks (pure) --------------------------------------------------------------------------
LAYERS = {"a.weight": 100, "b.weight": 20}


def make_bundle(size=2, layers=LAYERS, config=None):
    return checkpoint.bundle([{"r": r} for r in range(size)], layers=layers, config=config or {"codec": "qsgd"})


def test_select_returns_this_ranks_part():
    state = make_bundle()
    assert checkpoint.select(state, rank=1, size=2, layers=LAYERS, config={"codec": "qsgd"}, owner="x") == {"r": 1}


@pytest.mark.parametrize("kwargs,needle", [
    ({"size": 4}, "saved by 2 ranks and this job has 4"),
    ({"layers": {"a.weight": 100}}, "layers only in the checkpoint: b.weight"),
    ({"layers": {**LAYERS, "c.bias": 3}}, "layers not in the checkpoint: c.bias"),
    ({"layers": {"a.weight": 101, "b.weight": 20}}, "a.weight (100 saved, 101 now)"),
    ({"config": {"codec": "uniform"}}, "saved with codec='qsgd' and this job uses codec='uniform'"),
])
def test_a_mismatch_is_named_with_the_way_out(kwargs, needle):
    want = {"size": 2, "layers": LAYERS, "config": {"codec": "qsgd"}, **kwargs}
    with pytest.raises(checkpoint.StateMismatchError) as info:
        checkpoint.select(make_bundle(), rank=0, owner="hvd_gradq.DistributedOptimizer", **want)
    assert needle in str(info.value) and "reset=True" in str(info.value)


def test_something_else_is_not_taken_for_a_state():
    problems = checkpoint.mismatches({"residuals": torch.zeros(3)}, size=2, layers=LAYERS, config={})
    assert len(problems) == 1 and "not a hvd_gradq compression state" in problems[0]
