"""The three examples: a tiny configuration of each runs simulated (one process) and as a real
horovodrun -np 2 job, and writes a JSON log with the fields the study reads; the simulated mode
checkpoints and resumes to the same result as an uninterrupted run."""
import json
import subprocess
import sys

import pytest

from tests.hvdrun import ROOT, horovodrun, run_command

TINY = {
    "fashion_mnist_cnn.py": ["--train-limit", "2000", "--test-limit", "500", "--width", "8"],
    "austen_lstm_lm.py": ["--emb", "32", "--hidden", "32", "--vocab", "2000", "--eval-limit", "3000"],
    "transformer_lm.py": ["--dim", "32", "--ffn", "64", "--heads", "2", "--vocab", "2000", "--eval-limit", "3000"],
}
HEADLINE = {"fashion_mnist_cnn.py": "test_accuracy", "austen_lstm_lm.py": "valid_ppl", "transformer_lm.py": "valid_ppl"}


def check_log(path, example, workers, mode, steps):
    log = json.loads(path.read_text())
    assert log["mode"] == mode and log["workers"] == workers
    assert len(log["steps"]) == steps
    for s in log["steps"]:
        assert s["loss"] > 0 and 0 < s["wire_bytes"] < s["fp32_bytes"] and s["seconds"] > 0
    assert log["evals"] and HEADLINE[example] in log["evals"][-1]
    assert log["codebooks"] and all(set(c["bits"]) == set(log["layers"]) for c in log["codebooks"])
    assert set(log["layer_types"]) >= set(log["layers"])
    assert log["allocations"], "the interval trigger fires at step 0"
    assert log["summary"]["allocation"]["allocations"] == len(log["allocations"])
    assert "examples/" in log["command"]
    return log


ALLOC = ["--compressor", "shared_scale", "--bits", "4", "--allocator", "mse", "--solver", "greedy",
         "--budget", "2", "--trigger", "interval", "--interval", "2", "--epochs", "1", "--max-steps", "4",
         "--eval-every", "2"]


@pytest.mark.parametrize("example", sorted(TINY))
def test_example_runs_simulated_with_a_full_log(tmp_path, example):
    log = tmp_path / "log.json"
    run = run_command([sys.executable, ROOT / "examples" / example, "--workers", "3", *TINY[example], *ALLOC,
                       "--log-json", log], timeout=240)
    assert run.returncode == 0, run.output[-4000:]
    got = check_log(log, example, 3, "simulated", 4)
    assert [a["step"] for a in got["allocations"]] == [0, 2]
    gathered = {"allgather", "two_phase"} & set(got["summary"]["transports"].values())
    variances = [s["coding_variance"] for s in got["steps"]]
    if gathered:  # measured on the gather-coded layers (0-bit layers send nothing: they have none)
        assert all(v is None or v >= 0 for v in variances) and any(v is not None and v > 0 for v in variances)
    else:
        assert all(v is None for v in variances)


@pytest.mark.parametrize("example", sorted(TINY))
def test_example_runs_under_horovodrun(tmp_path, example):
    log = tmp_path / "log.json"
    run = horovodrun(ROOT / "examples" / example, *TINY[example], *ALLOC, "--log-json", log,
                     "--summary-json", tmp_path / "summary-{rank}.json", timeout=240)
    assert run.returncode == 0, run.output[-4000:]
    check_log(log, example, 2, "horovod", 4)
    ranks = [json.loads((tmp_path / f"summary-{r}.json").read_text()) for r in range(2)]  # every rank's end
    assert [s["rank"] for s in ranks] == [0, 1] and ranks[0]["param_digest"] == ranks[1]["param_digest"]
    assert ranks[0]["final_bits"] == ranks[1]["final_bits"] and ranks[0]["steps"] == ranks[1]["steps"] == 4
    assert "layers by transport:" in run.output


def test_simulated_checkpoint_resume_matches_the_uninterrupted_run(tmp_path):
    base = [sys.executable, ROOT / "examples" / "fashion_mnist_cnn.py", "--workers", "2", *TINY["fashion_mnist_cnn.py"],
            "--compressor", "qsgd", "--bits", "3", "--error-feedback", "on", "--max-steps", "3"]
    full, part = tmp_path / "full.json", tmp_path / "part.json"
    assert run_command([*base, "--epochs", "2", "--summary-json", full], timeout=240).returncode == 0
    ckpt = tmp_path / "ckpt.pt"
    assert run_command([*base, "--epochs", "1", "--checkpoint", ckpt], timeout=240).returncode == 0
    run = run_command([*base, "--epochs", "2", "--checkpoint", ckpt, "--resume", "--summary-json", part], timeout=240)
    assert run.returncode == 0 and "resumed from" in run.output, run.output[-4000:]
    a, b = json.loads(full.read_text()), json.loads(part.read_text())
    assert a["final"]["test_loss"] == b["final"]["test_loss"], "resumed training took another path"
    # another number of workers: refused with the mismatch named, unless the compression state is reset
    other = [*base[:3], "3", *base[4:], "--epochs", "2", "--checkpoint", ckpt, "--resume"]
    run = run_command(other, timeout=240)
    assert run.returncode != 0 and "saved by 2 ranks and this job has 3" in run.output
    assert run_command([*other, "--reset-compression"], timeout=240).returncode == 0


def test_examples_refuse_bad_combinations():
    for extra, message in ((["--workers", "2", "--compressor", "fp16"], "Horovod's own compression"),
                           (["--workers", "2", "--compressor", "none", "--allocator", "lad"], "--allocator needs"),
                           (["--workers", "-1"], "--workers must be >= 0")):
        run = subprocess.run([sys.executable, ROOT / "examples" / "fashion_mnist_cnn.py", *extra],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]


WGAN = ROOT / "examples" / "wgan_fashion_mnist.py"
WGAN_TINY = ["--width", "8", "--steps", "4", "--eval-every", "2", "--eval-samples", "200", "--batch-size", "16",
             "--min-elements", "64", "--refit-every", "2"]


def check_wgan_log(path, workers, mode):
    log = json.loads(path.read_text())
    assert log["mode"] == mode and log["workers"] == workers and "examples/wgan" in log["command"]
    assert [s["step"] for s in log["steps"]] == [0, 1, 2, 3]
    assert all(set(s) == {"step", "critic_loss", "gen_loss", "wasserstein"} for s in log["steps"])
    assert [e["step"] for e in log["evals"]] == [2, 4]
    assert all(e["fid"] > 0 and e["wall"] > 0 for e in log["evals"])
    fit = log["level_fit"]  # one ALQ level set per layer type, fitted at steps 0 and 2
    assert set(fit) >= {"conv", "linear"} and all(g["variance"] > 0 for g in fit.values())
    return log


def test_wgan_example_runs_simulated_and_under_horovodrun(tmp_path):
    log, png = tmp_path / "sim.json", tmp_path / "samples.png"
    run = run_command([sys.executable, WGAN, "--workers", "2", *WGAN_TINY, "--log-json", log, "--samples", png],
                      timeout=300)
    assert run.returncode == 0, run.output[-4000:]
    sim = check_wgan_log(log, 2, "simulated")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 < sim["payload_bytes"][0] < sim["payload_bytes"][1]  # coded vs float32 bytes per step
    log = tmp_path / "real.json"
    run = horovodrun(WGAN, *WGAN_TINY, "--log-json", log, timeout=300)
    assert run.returncode == 0, run.output[-4000:]
    real = check_wgan_log(log, 2, "horovod")
    assert real["level_fit"] == sim["level_fit"]  # the same data, levels and coding: the same fit
