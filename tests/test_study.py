"""The study driver (benchmarks.study): the grid, the run order, the runner's bookkeeping and
the report built from synthetic logs in the compacted form. No training runs here."""
import pytest

from benchmarks import study
from benchmarks.archive import Archive
from benchmarks.study import Row, build_grid, plan, write_report


@pytest.fixture(scope="module")
def grid():
    return build_grid()


def test_grid_has_every_table(grid):
    tables = {e.table for e in grid.entries}
    assert tables == set("ABCDEFG") | {"R", "Q", "L"} == set(study.TABLES)
    assert len(grid.table("A")) == 8 and len(grid.table("B")) == 4 and len(grid.table("C")) == 9
    assert len(grid.table("R")) == 8 and len(grid.table("G")) == 4
    assert [len([e for e in grid.table("Q") if e.key[0] == m]) for m in ("cnn", "lstm", "trf")] == [8, 12, 4]
    assert [len([e for e in grid.table("L") if e.key[0] == m]) for m in ("lstm", "trf")] == [9, 8]
    assert "L" in grid.rows["A-lstm-fp32"].tables and "L" in grid.rows["Q-trf-fp32"].tables  # FP32 shared with A, Q


def test_ids_and_commands_are_unique(grid):
    assert len(grid.rows) == len({r.id for r in grid.rows.values()})
    assert len({r.key for r in grid.rows.values()}) == len(grid.rows)
    assert all(e.row in grid.rows for e in grid.entries)
    with pytest.raises(ValueError, match="duplicate row id"):
        grid.add("A", "A-cnn-fp32", "again", ["examples/fashion_mnist_cnn.py", "--bits", "7"], seed=0)


def test_identical_commands_are_shared(grid):
    lad = grid.rows["A-cnn-lad"]
    assert set(lad.tables) == {"A", "B", "C"}
    assert {e.label for e in grid.entries if e.row == "A-cnn-lad" and e.table == "C"} == {
        "similarity, tau 0.95 (k_min 20)", "similarity, k_min 20 (tau 0.95)"}
    assert sum(e.row == "A-cnn-lad" for e in grid.table("C")) == 2  # tau 0.95 and k_min 20 are one run
    assert {e.row for e in grid.table("B")} == {"B-mse-greedy", "A-cnn-greedy", "B-mse-lagrangian", "A-cnn-lad"}
    assert "B-lad-lagrangian" not in grid.rows


def test_commands(grid):
    lad = grid.rows["A-cnn-lad"]
    cmd = lad.command("docs/results/study/runs/A-cnn-lad.json")
    assert cmd[:2] == ["python", "examples/fashion_mnist_cnn.py"]
    assert cmd[-4:] == ["--log-json", "docs/results/study/runs/A-cnn-lad.json", "--threads", "1"]
    assert " ".join(cmd).count("--allocator lad --solver lagrangian --budget 2 ") == 1
    assert "--workers 4" in " ".join(cmd) and "--seed 0" in " ".join(cmd)
    assert "--max-steps 3" in " ".join(lad.command("x", smoke=True))
    real = grid.rows["R-real-lad"]
    assert real.exclusive and not grid.rows["R-sim-lad"].exclusive
    assert real.command("x")[:6] == ["launch/hvdrun", "-np", "2", "-H", "localhost:2", "python"]
    assert "--workers" not in real.argv and "--workers 2" in " ".join(grid.rows["R-sim-lad"].argv)
    assert "--refit-every 50" in " ".join(grid.rows["F-alq3"].argv)
    assert "--bits 2" in " ".join(grid.rows["F-terngrad2"].argv)
    assert grid.rows["E-topk1000"].seed == 4 and grid.rows["G-trf-lad2"].seed == 1


def test_priority_order(grid):
    ids = [r.id for r in plan(grid)]
    assert ids[:4] == ["A-cnn-fp32", "A-cnn-uniform", "A-cnn-greedy", "A-cnn-lad"]
    assert ids[4:8] == ["A-lstm-fp32", "A-lstm-uniform", "A-lstm-greedy", "A-lstm-lad"]
    first = list(dict.fromkeys(i.split("-")[0] for i in ids))
    assert first == ["A", "B", "C", "E", "F", "G", "D", "Q", "L", "R"]
    assert all(i.startswith("R-") for i in ids[-8:])


def test_seed_copies(grid):
    ids = [r.id for r in plan(grid, extra_seeds=[1])]
    assert ids[-8:] == [f"{e.row}-s1" for e in grid.table("A")]
    copy = grid.rows["A-cnn-lad"].with_seed(3)
    assert copy.id == "A-cnn-lad-s3" and copy.base == "A-cnn-lad" and copy.argv[copy.argv.index("--seed") + 1] == "3"
    both = [r.id for r in plan(grid, tables={"A", "E"}, seeds=[4])]
    assert "A-cnn-fp32-s4" not in both  # the same command as E-fp32 (seed 4): run once
    assert "A-cnn-lad-s4" in both and "E-fp32" in both
    assert [r.id for r in plan(grid, only=["C-static", "A-cnn-lad"])] == ["A-cnn-lad", "C-static"]
    with pytest.raises(SystemExit):
        plan(grid, tables={"Z"})
    with pytest.raises(SystemExit):
        plan(grid, only=["no-such-row"])


def test_run_records_failures_and_goes_on(tmp_path, grid):
    """Rows are plain processes here (python -c): one fails, one times out, one cannot start, one writes
    its log."""
    fail = Row("fail", ("A",), "fail", 0, ("-c", "raise ValueError('boom')"))
    slow = Row("slow", ("A",), "slow", 0, ("-c", "import time; time.sleep(60)"))
    ok = Row("ok", ("A",), "ok", 0,
             ("-c", "import sys; open(sys.argv[sys.argv.index('--log-json') + 1], 'w').write('{}')"))
    alone = Row("alone", ("R",), "no launcher", 0, ("-c", "pass"), launcher=("./no-such-launcher",))
    statuses = study.run_rows([fail, slow, alone, ok], tmp_path, tmp_path / "RESULTS.md", jobs=2, timeout=3,
                              grid=grid, commit="abc123")
    by = {s["id"]: s for s in statuses}
    res = study.Results(tmp_path, grid)  # what the runs left, from the archive
    assert [s["id"] for s in statuses][-2:] == ["alone", "ok"]  # a launcher row waits for the others, then runs alone
    assert by["alone"]["rc"] == 127 and "could not start" in res.output("alone")
    assert not by["fail"]["ok"] and by["fail"]["rc"] == 1
    assert by["slow"]["timed_out"] and by["slow"]["rc"] == 124 and by["slow"]["seconds"] < 20
    assert by["ok"]["ok"] and res.log("ok") == {}
    assert "ValueError: boom" in res.output("fail") and "process group killed" in res.output("slow")
    assert {res.status_record(i)["commit"] for i in by} == {"abc123"}
    assert (tmp_path / "RESULTS.md").exists() and "(commit abc123)" in (tmp_path / "RESULTS.md").read_text()
    assert not (tmp_path / "runs").exists()  # every row's scratch files went into runs.jsonl.gz
    assert res.status("fail") == "failed: ValueError: boom" and res.status("ok") == "done"
    assert study.run_rows([fail, ok], tmp_path, tmp_path / "RESULTS.md", grid=grid)[0]["id"] == "fail"  # ok is done


def _log(example, final, *, ratio=1.0, allocation=None, layers=None, codebooks=(), allocations=(), steps=4,
         variance=None, command="examples/x.py --seed 0", parameters=1000, workers=4):
    layers = layers or {"w": 1000}
    return {"example": example, "command": command, "args": {}, "mode": "simulated", "workers": workers,
            "parameters": parameters, "layers": layers, "layer_types": {n: "linear" for n in layers},
            "steps": [{"step": s, "loss": 1.0, "wire_bytes": 4 * ratio * 1000, "fp32_bytes": 4000, "seconds": 0.1,
                       **({"coding_variance": variance[s]} if variance else {})} for s in range(steps)],
            "evals": [{"step": steps // 2, "epoch": 1, "train_seconds": 1.0, **{k: v * 0.9 for k, v in final.items()}},
                      {"step": steps, "epoch": 1, "train_seconds": 2.0, **final}],
            "codebooks": list(codebooks), "allocations": list(allocations),
            "summary": {"final": {"epoch": 1, "train_seconds": 2.0, **final}, "mean_wire_ratio": ratio,
                        "wire_ratio": ratio, "allocation": allocation, "train_seconds": 2.0, "steps": steps}}


TRF_LAYERS = {"embedding.weight": 1000, "position.weight": 100, "blocks.layers.0.self_attn.in_proj_weight": 300,
              "blocks.layers.0.self_attn.in_proj_bias": 30, "blocks.layers.0.linear1.weight": 400,
              "blocks.layers.0.norm1.weight": 10, "decoder.weight": 1000, "decoder.bias": 100}
TRF_BOOKS = [
    {"step": 0, "version": 1, "bits": {"embedding.weight": 2, "position.weight": 4,
                                       "blocks.layers.0.self_attn.in_proj_weight": 3,
                                       "blocks.layers.0.self_attn.in_proj_bias": 32,
                                       "blocks.layers.0.linear1.weight": 4, "blocks.layers.0.norm1.weight": 32,
                                       "decoder.weight": 2, "decoder.bias": 8}},
    {"step": 2, "version": 2, "bits": {"embedding.weight": 4, "position.weight": 4,
                                       "blocks.layers.0.self_attn.in_proj_weight": 3,
                                       "blocks.layers.0.self_attn.in_proj_bias": 32,
                                       "blocks.layers.0.linear1.weight": 2, "blocks.layers.0.norm1.weight": 32,
                                       "decoder.weight": 0, "decoder.bias": 8}}]


def test_group_bits_forward_fill():
    log = _log("AustenTransformer", {"valid_ppl": 300.0}, layers=TRF_LAYERS, codebooks=TRF_BOOKS)
    names, bits = study.bits_over_steps(log)
    assert bits[names.index("embedding.weight")] == [2, 2, 4, 4]
    mean, final = study.group_bits(log)
    assert mean["embedding"] == pytest.approx((2400 / 1100 + 4400 / 1100) / 2) and final["embedding"] == 4
    assert mean["attention"] == 3 and mean["FFN"] == 3 and final["FFN"] == 2
    assert mean["decoder"] == 1 and final["decoder"] == 0 and mean["other"] == 8  # float32 layers left out
    assert study.layer_group("blocks.layers.1.linear2.bias") == "FFN" and study.layer_group("norm.bias") == "other"


def _write(runs, row_id, log):
    runs.put(row_id, f"{row_id}.json", log)
    runs.save()


def test_report_from_synthetic_logs(tmp_path, grid):
    runs = Archive(tmp_path / "runs.jsonl.gz")
    cnn_books = [{"step": 0, "version": 1, "bits": {"a": 2, "b": 32, "c": 3}},
                 {"step": 3, "version": 2, "bits": {"a": 4, "b": 32, "c": 0}}]
    _write(runs, "A-cnn-fp32", _log("FashionCNN", {"test_accuracy": 0.8125, "test_loss": 0.5},
                                    command="examples/fashion_mnist_cnn.py --workers 4 --compressor none --seed 0",
                                    parameters=116602))
    _write(runs, "A-cnn-fp32-s1", _log("FashionCNN", {"test_accuracy": 0.8075, "test_loss": 0.5}))
    _write(runs, "A-cnn-lad", _log("FashionCNN", {"test_accuracy": 0.7950, "test_loss": 0.6}, ratio=0.0625,
                                   allocation={"allocations": 3, "seconds": 1.5, "forwards": 6, "fraction": 0.02,
                                               "version": 3},
                                   layers={"a": 500, "b": 10, "c": 500}, codebooks=cnn_books, steps=6,
                                   allocations=[{"step": 0, "version": 1, "seconds": 0.5},
                                                {"step": 3, "version": 2, "seconds": 0.5}]))
    _write(runs, "A-lstm-lad", _log("AustenLSTM", {"valid_ppl": 250.5, "test_ppl": 240.25}, ratio=0.1))
    _write(runs, "G-trf-lad3", _log("AustenTransformer", {"valid_ppl": 300.0, "test_ppl": 310.0}, ratio=0.1,
                                    layers=TRF_LAYERS, codebooks=TRF_BOOKS))
    _write(runs, "F-alq3", _log("FashionCNN", {"test_accuracy": 0.7, "test_loss": 1.0}, ratio=0.1,
                                variance=[0.1, 0.3, None, 0.2]))
    _write(runs, "Q-lstm-gather3", _log("AustenLSTM", {"valid_ppl": 140.0, "test_ppl": 150.0}, ratio=0.1))
    _write(runs, "Q-lstm-gather3-s1", _log("AustenLSTM", {"valid_ppl": 150.0, "test_ppl": 160.0}, ratio=0.1))
    runs.put("A-cnn-uniform", "A-cnn-uniform.txt",
             "$ python ...\nTraceback (most recent call last):\nValueError: boom\n")
    runs.put("A-cnn-uniform", "A-cnn-uniform.status.json", {"id": "A-cnn-uniform", "rc": 1, "ok": False})
    runs.save()

    results = write_report(tmp_path, tmp_path / "RESULTS.md", grid)
    text = results.read_text()
    lines = text.splitlines()

    def row(prefix: str, after: str = "") -> str:
        start = text.index(after) if after else 0
        return next(line for line in text[start:].splitlines() if line.startswith(prefix))

    assert "generated by `python -m benchmarks.study report`" in text and "runs.jsonl.gz" in text
    assert lines[lines.index("## Reading") + 2] == study.PLACEHOLDER
    assert row("| FP32 |") == "| FP32 | 0.8125 | 1.0x | 32.00 | - | - | 2 |"
    assert row("| LAD |") == "| LAD | 0.7950 | 16.0x | 2.00 | 3 | 1.5 (2.0%) | 2 |"
    assert row("| Uniform |") == "| Uniform | failed: ValueError: boom |  |  |  |  |  |"
    assert row("| Greedy |").startswith("| Greedy | not run |")
    assert row("| LAD |", after="LSTM at 3 bits").startswith("| LAD | 250.50 | 240.25 | 10.0x | 3.20 | - |")
    assert row("| FP32 |", after="LSTM at 3 bits").startswith("| FP32 | not run |")
    assert row("| LAD / lagrangian |").startswith("| LAD / lagrangian | 0.7950 | 16.0x | 3 |")  # shared with A
    assert row("| MSE / greedy |").startswith("| MSE / greedy | not run |")
    assert row("| alq, 3 bits |") == "| alq, 3 bits | 0.7000 | 10.0x | 0.2 |"  # None steps are skipped
    assert row("| amq, 3 bits |").startswith("| amq, 3 bits | not run |")
    assert row("| LAD, 3 bits |") == ("| LAD, 3 bits | 300.00 | 310.00 | 3.09 / 4.00 | 3.00 / 3.00 | 3.00 / 2.00 | "
                                      "1.00 / 0.00 | 8.00 / 8.00 | 2.52 / 2.38 |")
    assert row("| LAD, 2 bits |").count("|") == row("| LAD, 3 bits |").count("|")
    assert row("| A-cnn-fp32 |", after="## Other seeds").startswith(
        "| A-cnn-fp32 | A,Q | test_accuracy | 0: 0.8125, 1: 0.8075 | 0.81 | 0.005 |")
    # Table Q: both seeds and their mean; a row not run says so
    assert row("| rotated, allgather, 3 bits |").startswith("| rotated, allgather, 3 bits | 140 | 150 | 145 | 3.20 |")
    assert row("| stock path (rotated lanes, last step's scales), 3 bits |").startswith(
        "| stock path (rotated lanes, last step's scales), 3 bits | not run | - | - |")
    assert "116,602 parameters" in text
    assert "python examples/fashion_mnist_cnn.py --workers 4 --compressor none --seed 0" in text  # the log's command
    assert "python examples/transformer_lm.py --workers 4" in text  # a planned command (G-trf-lad2: not run)
    assert "Status: 6 of 95 rows done, 1 failed, 88 not run." in text
    for png in ("table_a_curves.png", "bits_A-cnn-lad.png", "bits_G-trf-lad3.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"]({png})" in text
    assert not (tmp_path / "bits_G-trf-lad2.png").exists()  # not run
    assert not (tmp_path / "bits_A-lstm-lad.png").exists()  # its log has no codebooks

    # the hand-written Reading survives a rewrite; the tables follow the logs
    results.write_text(text.replace(study.PLACEHOLDER, "LAD wins on the CNN, by our numbers."))
    runs.drop("A-cnn-lad", "A-cnn-lad.json")
    runs.save()
    text = write_report(tmp_path, results, grid).read_text()
    assert "LAD wins on the CNN, by our numbers." in text and study.PLACEHOLDER not in text
    assert row("| LAD |").startswith("| LAD | not run |")


def test_cli_list_and_report(tmp_path, capsys):
    study.main(["list", "--tables", "G", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("G-trf-lad") == 4 and "examples/transformer_lm.py" in out and "not run" in out
    study.main(["report", "--out", str(tmp_path), "--allow-dirty"])
    assert (tmp_path / "RESULTS.md").exists()  # a scratch --out keeps its report beside its runs
    with pytest.raises(SystemExit, match="--smoke runs must not land in"):
        study.main(["run", "--smoke", "--only", "A-cnn-lad", "--out", str(study.ROOT / study.DEFAULT_OUT),
                    "--allow-dirty"])
