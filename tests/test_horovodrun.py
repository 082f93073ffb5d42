"""The compressor inside the stock hvd.DistributedOptimizer, under real horovodrun -np 2."""
import json

import pytest

from tests.hvdrun import ROOT, WORKERS, horovodrun

MODES = ["mpi", "gloo"]


def rank_files(tmp_path, size=2):
    files = [tmp_path / f"rank{r}.json" for r in range(size)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"ranks wrote no result: {missing}"
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.parametrize("mode,rotation", [("mpi", 4096), ("gloo", 4096), ("mpi", 0)])
@pytest.mark.parametrize("op,bits", [("sum", 2), ("average", 3)])
def test_one_step_matches_uncompressed_within_the_quantization_bound(tmp_path, mode, rotation, op, bits):
    """rotation 4096: the default rotated lanes (a norm bound); 0: the unrotated lanes (elementwise)."""
    run = horovodrun(WORKERS / "step_check.py", "--case", "equivalence", "--op", op, "--bits", bits,
                     "--rotation", rotation, "--out", tmp_path, mode=mode)
    assert run.returncode == 0, run.output[-6000:]
    results = rank_files(tmp_path)
    for res in results:
        assert res["step0_float"] and res["step0_diff"] < 1e-5
        packed = {n: v for n, v in res["layers"].items() if v["packed"]}
        assert len(packed) == 6, res["layers"]
        for name, layer in res["layers"].items():
            assert layer["violation"] <= 0, (name, layer)
            assert layer["vs_uncompressed"] <= 0, (name, layer)
            assert layer["nbytes"] == layer["predicted"], (name, layer)
        for name, layer in packed.items():
            # genuinely packed: int64 lanes for Sum, exact integers in float64 for Average
            assert layer["dtype"] == ("torch.int64" if op == "sum" else "torch.float64"), layer
            assert layer["nbytes"] <= layer["numel"] * (bits + 3) / 8 + 128, (name, layer)
            assert layer["err"] > 0, f"{name}: a {bits}-bit payload cannot be lossless"
            assert layer.get("rotated", False) == bool(rotation), layer
        assert len(set(res["digests"])) == 1, "ranks hold different parameters"
    assert results[0]["digests"] == results[1]["digests"]


@pytest.mark.parametrize("mode", MODES)
def test_misconfigured_op_raises_the_same_clear_error_on_every_rank(tmp_path, mode):
    run = horovodrun(WORKERS / "step_check.py", "--case", "op_mismatch", "--out", tmp_path, mode=mode, timeout=120)
    assert run.returncode != 0
    for res in rank_files(tmp_path):
        assert res["error"] == "ReductionMismatchError", res
        assert res["step"] == 0
        assert "op=hvd.Sum" in res["message"] and "hvd.DistributedOptimizer" in res["message"]


@pytest.mark.parametrize("mode,case", [("mpi", "bits_mismatch"), ("gloo", "bits_mismatch"),
                                       ("mpi", "seed_mismatch")])
def test_ranks_disagreeing_on_bits_or_rotation_raise_on_every_rank(tmp_path, mode, case):
    run = horovodrun(WORKERS / "step_check.py", "--case", case, "--out", tmp_path, mode=mode, timeout=120)
    assert run.returncode != 0
    for res in rank_files(tmp_path):
        assert res["error"] == "CodebookMismatchError", res
        assert res["step"] == 0
        assert "same arguments on every rank" in res["message"]


def test_nan_on_one_rank_gives_nan_gradients_on_all_and_training_goes_on(tmp_path):
    run = horovodrun(WORKERS / "step_check.py", "--case", "nonfinite", "--out", tmp_path, timeout=120)
    assert run.returncode == 0, run.output[-6000:]
    results = rank_files(tmp_path)
    for res in results:
        assert res["all_nan"], "an AMP GradScaler must see the overflow on every rank"
        assert res["n_residuals"] == 6 and res["residuals_kept"], res
        assert res["finite_after"], res
        assert len(set(res["digests"])) == 1
    assert results[0]["digests"] == results[1]["digests"]


@pytest.mark.parametrize("mode,codec,transport", [("mpi", "rotated", "allreduce"), ("gloo", "rotated", "allreduce"),
                                                   ("gloo", "rotated", "two_phase"), ("mpi", "qsgd", "allgather")])
def test_nan_through_the_drop_in_is_skipped_by_a_grad_scaler_on_every_rank(tmp_path, mode, codec, transport):
    run = horovodrun(WORKERS / "step_check.py", "--case", "nonfinite_dropin", "--codec", codec, "--transport",
                     transport, "--bits", "3", "--op", "average", "--out", tmp_path, mode=mode, timeout=120)
    assert run.returncode == 0, run.output[-6000:]
    results = rank_files(tmp_path)
    for res in results:
        assert res["all_nan"], "the scaler must see the overflow on every rank"
        assert res["skipped"] and res["scale_halved"], res  # GradScaler skipped the step everywhere
        assert res["residuals_kept"] and res["codebook_kept"] and res["versions_advanced"] == [1], res
        assert transport in res["transports"] and res["finite_after"], res
        assert len(set(res["digests"])) == 1
    assert results[0]["digests"] == results[1]["digests"]
    if codec == "rotated":  # the nearest-rounded code keeps residuals: their keeping was checked
        assert all(res["n_residuals"] > 0 for res in results)


def summaries(tmp_path, size=2):
    """Every rank's summary (the examples write one per rank with {rank} in --summary-json); the
    ranks must end with the same parameters and report the same steps (their payloads may differ:
    a gathered layer's frame is each rank's own)."""
    got = [json.loads((tmp_path / f"summary-{r}.json").read_text()) for r in range(size)]
    assert [s["rank"] for s in got] == list(range(size))
    assert len({s["param_digest"] for s in got}) == 1, "the ranks ended with different parameters"
    for key in ("fp32_bytes_per_step", "steps", "workers", "transports"):
        assert len({json.dumps(s[key]) for s in got}) == 1, key
    return got


def test_demo_sends_the_readme_s_bytes_at_2_bits(tmp_path):
    """The README's demo figures, exactly: 466408 B of float32 gradients (116602 parameters) and
    51008 B on the wire per step at 2 bits with N = 2 (int64 lanes of 3 bits, 21 per word: 3.05
    bits per element, the rotation blocks' statistic words, headers, and the small layers in
    float32), a ratio of 0.109."""
    run = horovodrun(ROOT / "examples" / "fashion_mnist_cnn.py", "--bits", "2", "--epochs", "1",
                     "--max-steps", "5", "--summary-json", tmp_path / "summary-{rank}.json")
    assert run.returncode == 0, run.output[-6000:]
    every = summaries(tmp_path)
    assert {r["payload_bytes_per_step"] for r in every} == {51008}, every  # lanes: the same words on every rank
    s = every[0]
    assert s["workers"] == 2 and s["bits"] == 2
    assert s["fp32_bytes_per_step"] == 4 * 116602 == 466408, s
    assert s["payload_bytes_per_step"] == 51008, s
    assert s["wire_ratio"] <= 0.11, s
    assert 0.0 < s["test_accuracy"][0] <= 1.0
    assert "wire reduction: 9.1x fewer bytes than fp32 (51008 vs 466408 bytes per step)" in run.output


@pytest.mark.parametrize("codec,transport", [("qsgd", "auto"), ("jointsq", "two_phase")])
def test_demo_runs_the_drop_in_optimizer(tmp_path, codec, transport):
    run = horovodrun(ROOT / "examples" / "fashion_mnist_cnn.py", "--compressor", codec, "--bits", "4",
                     "--transport", transport, "--epochs", "1", "--max-steps", "5", "--train-limit", "2000",
                     "--summary-json", tmp_path / "summary-{rank}.json")
    assert run.returncode == 0, run.output[-6000:]
    s = summaries(tmp_path)[0]
    assert s["wire_ratio"] <= (1 / 4 if codec == "qsgd" else 1 / 8), s
    compressed = {t for t in s["transports"].values() if t != "float32"}
    assert compressed and compressed <= {"allgather", "two_phase"}, s  # neither codec is summable
    if transport != "auto":
        assert compressed == {transport}, s
    assert "layers by transport:" in run.output
