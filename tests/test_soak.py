"""The shortened soak: 4 ranks, 100 steps, the codebook changing every 3 steps with random budgets,
random per-layer transports and float32/float64/float16 layers (benchmarks.soak)."""
import json

from benchmarks import soak
from benchmarks.archive import Archive


def test_four_ranks_stay_in_step_without_leaks(tmp_path):
    rc = soak.main(["--np", "4", "--steps", "100", "--out", str(tmp_path), "--timeout", "300", "--allow-dirty"])
    res = json.loads((tmp_path / "results.json").read_text())
    chk = res["checks"]
    assert rc == 0, chk["passed"]
    assert chk["codebook_disagreements"] == 0 and chk["param_digests_equal"]
    assert chk["allocations"] == 34 and chk["codebook_versions"] == 34  # steps 0, 3, ..., 99
    assert {0, 2, 8} <= set(chk["bits_seen"])
    ranks = res["run"]["ranks"]
    assert {r["dtypes"]["fc2.weight"] for r in ranks} == {"torch.float64"}
    assert {r["dtypes"]["fc3.weight"] for r in ranks} == {"torch.float16"}
    for m in chk["memory"]:
        assert m["rss_peak_growth_mb"] < 16 and m["fds"][0] == m["fds"][1] and m["threads"][0] == m["threads"][1]
    raw = Archive(tmp_path / "run.jsonl.gz").runs["soak"]  # the job's raw files, compacted
    assert sorted(raw) == ["log.txt", "rank0.json", "rank1.json", "rank2.json", "rank3.json"]
    assert raw["rank2.json"]["rank"] == 2 and not (tmp_path / "ranks").exists()
    assert res["commit"] and "commit " in (tmp_path / "SOAK.md").read_text()
