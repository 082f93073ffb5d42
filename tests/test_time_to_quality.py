"""The time-to-quality driver (``benchmarks.time_to_quality``): its target and clock logic on
synthetic curves, and a tiny sweep on the emulated cluster (root only) that must leave a
well-formed results file."""
import json
import math
import sys

import pytest

from benchmarks.time_to_quality import REFERENCE, summarize, target_from, time_to_target, value_at
from tests.hvdrun import run_command
from tests.test_cluster import cluster_or_skip, leftovers


def curve(*points):
    return [{"step": s, "train_s": t, "valid_ppl": p} for s, t, p in points]


def test_time_to_target_is_the_first_evaluation_at_or_below_it():
    c = curve((0, 0.0, 900.0), (25, 10.0, 300.0), (50, 20.0, 149.0), (75, 30.0, 160.0), (100, 40.0, 120.0))
    assert time_to_target(c, 150.0) == {"step": 50, "train_s": 20.0, "valid_ppl": 149.0}
    assert time_to_target(c, 300.0)["step"] == 25  # "at or below"
    assert time_to_target(c, 100.0) is None
    # a non-finite evaluation never counts as reaching the target
    assert time_to_target(curve((0, 0.0, 900.0), (25, 5.0, math.nan), (50, 9.0, -math.inf)), 500.0) is None


def test_the_target_is_the_factor_times_the_references_mean_at_the_step():
    refs = [{"curve": curve((0, 0, 900.0), (400, 80.0, 130.0))}, {"curve": curve((0, 0, 900.0), (400, 81.0, 150.0))}]
    assert target_from(refs, 400, 1.05) == pytest.approx(1.05 * 140.0)
    with pytest.raises(ValueError, match="multiple of --eval-every"):
        value_at(refs[0]["curve"], 390)
    with pytest.raises(ValueError, match="no finite perplexity"):
        target_from([{"curve": curve((400, 80.0, math.nan))}], 400, 1.05)


def test_summary_ratios_and_a_seed_that_misses_the_target():
    def run(row, seed, points, **kw):
        return {"np": 2, "row": row, "seed": seed, "rate": "100mbit", "target": 150.0, "curve": curve(*points),
                "steps": points[-1][0], "s_per_step": points[-1][1] / max(points[-1][0], 1), **kw}
    runs = [run(REFERENCE, 0, [(0, 0, 900), (50, 10.0, 140)]), run(REFERENCE, 1, [(0, 0, 900), (50, 12.0, 145)]),
            run("none", 0, [(0, 0, 900), (50, 100.0, 140)]), run("none", 1, [(0, 0, 900), (50, 120.0, 140)]),
            run("rotated2", 0, [(0, 0, 900), (50, 20.0, 149)]), run("rotated2", 1, [(0, 0, 900), (50, 24.0, 149)]),
            run("topk20", 0, [(0, 0, 900), (50, 20.0, 149)]), run("topk20", 1, [(0, 0, 900), (50, 30.0, 151)]),
            run("powersgd", 0, [(0, 0, 900), (25, 5.0, math.nan)], diverged=True),
            {"np": 2, "row": "fp16", "seed": 0, "rate": "100mbit", "target": 150.0, "error": "boom"}]
    lines = {line["row"]: line for line in summarize(runs)}
    assert lines[REFERENCE]["mean_s"] == pytest.approx(11.0) and lines[REFERENCE]["x_reference"] == pytest.approx(1)
    assert lines["rotated2"]["mean_s"] == pytest.approx(22.0)
    assert lines["rotated2"]["x_reference"] == pytest.approx(2.0)
    assert lines["rotated2"]["speedup_vs_none"] == pytest.approx(110.0 / 22.0)
    # one seed short of the target: no mean, no ratio (a mean of the seeds that made it would flatter the row)
    assert lines["topk20"]["seeds"][1]["status"] == "not reached" and lines["topk20"]["mean_s"] is None
    assert lines["topk20"]["x_reference"] is None
    assert lines["powersgd"]["seeds"][0]["status"] == "diverged" and lines["powersgd"]["mean_s"] is None
    assert lines["fp16"]["seeds"][0]["status"] == "failed"


def test_a_tiny_sweep_on_the_emulated_cluster_writes_a_well_formed_report(tmp_path):
    out = tmp_path / "tq"
    with cluster_or_skip():  # the driver, our child, sees the hold and passes
        run = run_command([sys.executable, "-m", "benchmarks.time_to_quality", "--np", "2", "--rate", "100mbit",
                           "--rows", "rotated2,powersgd", "--seeds", "0", "--ref-steps", "4", "--eval-every", "2",
                           "--max-steps", "6", "--eval-tokens", "2000", "--run-timeout", "300", "--out", str(out),
                           "--allow-dirty"], timeout=900)
    assert run.returncode == 0, run.output[-4000:]
    assert leftovers() == [], "the sweep left cluster pieces behind"
    res = json.loads((out / "results.json").read_text())
    assert math.isfinite(res["targets"]["2"]) and res["targets"]["2"] > 1
    runs = {(r["row"], r["seed"]): r for r in res["runs"]}
    assert set(runs) == {(REFERENCE, 0), ("rotated2", 0), ("powersgd", 0)}
    ref = runs[(REFERENCE, 0)]
    assert ref["rate"] == "none" and ref["steps"] == 4 and [p["step"] for p in ref["curve"]] == [0, 2, 4]
    # the target is 1.05 x the reference's perplexity at step 4, so the reference reaches it
    assert res["targets"]["2"] == pytest.approx(1.05 * ref["curve"][-1]["valid_ppl"])
    for key in [("rotated2", 0), ("powersgd", 0)]:
        r = runs[key]
        assert "error" not in r, r.get("error")
        assert r["rate"] == "100mbit" and r["size"] == 2 and 1 <= r["steps"] <= 6
        assert all(math.isfinite(p["valid_ppl"]) for p in r["curve"])
        assert r["curve"][0]["step"] == 0 and r["curve"][0]["train_s"] == 0.0
        assert all(a["train_s"] <= b["train_s"] for a, b in zip(r["curve"], r["curve"][1:]))
        # stopped at the first evaluation at or below the target, or at the step cap
        hit = time_to_target(r["curve"], res["targets"]["2"])
        assert r["steps"] == (hit["step"] if hit else 6)
    assert runs[("rotated2", 0)]["payload_per_step"] < 4 * runs[("rotated2", 0)]["parameters"] / 8
    lines = {line["row"]: line for line in res["summary"]}
    assert lines[REFERENCE]["x_reference"] == pytest.approx(1.0)
    table = (out / "TQ.md").read_text()
    assert "## N = 2" in table and "| rotated2 |" in table and "powersgd (DDP)" in table
    assert (out / "perplexity_vs_time.png").stat().st_size > 0 and (out / "time_to_target.png").stat().st_size > 0
