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


def test_demo_sends_at_most_a_sixth_of_fp32_bytes_at_2_bits(tmp_path):
    summary = tmp_path / "summary.json"
    run = horovodrun(ROOT / "examples" / "fashion_mnist_cnn.py", "--bits", "2", "--epochs", "1",
                     "--max-steps", "5", "--summary-json", summary)
    assert run.returncode == 0, run.output[-6000:]
    s = json.loads(summary.read_text())
    assert s["workers"] == 2 and s["bits"] == 2
    assert s["wire_ratio"] <= 1 / 6, s
    assert s["payload_bytes_per_step"] * 6 <= s["fp32_bytes_per_step"]
    assert 0.0 < s["test_accuracy"][0] <= 1.0
    assert "wire reduction:" in run.output and "test accuracy" in run.output


@pytest.mark.parametrize("codec,transport", [("qsgd", "auto"), ("jointsq", "two_phase")])
def test_demo_runs_the_drop_in_optimizer(tmp_path, codec, transport):
    summary = tmp_path / "summary.json"
    run = horovodrun(ROOT / "examples" / "fashion_mnist_cnn.py", "--compressor", codec, "--bits", "4",
                     "--transport", transport, "--epochs", "1", "--max-steps", "5", "--train-limit", "2000",
                     "--summary-json", summary)
    assert run.returncode == 0, run.output[-6000:]
    s = json.loads(summary.read_text())
    assert s["wire_ratio"] <= (1 / 4 if codec == "qsgd" else 1 / 8), s
    compressed = {t for t in s["transports"].values() if t != "float32"}
    assert compressed and compressed <= {"allgather", "two_phase"}, s  # neither codec is summable
    if transport != "auto":
        assert compressed == {transport}, s
    assert "layers by transport:" in run.output
