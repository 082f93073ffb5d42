"""workloads.tasks: one map of task and compressor names; old names keep their meaning."""
import argparse
from pathlib import Path

import pytest

import hvd_gradq
from workloads import tasks

ROOT = Path(__file__).resolve().parents[1]


def test_every_task_names_its_model_data_and_example():
    assert set(tasks.TASKS) == {"cnn", "lstm", "transformer", "wgan"}
    for w in tasks.TASKS.values():
        assert (ROOT / w.example).is_file() and w.example.startswith("examples/")
        assert callable(w.model) and callable(w.data) and w.title


def test_compressor_names_have_one_meaning():
    assert ("none", "fp16", "stock", *hvd_gradq.CODECS) == tasks.EXAMPLE_COMPRESSORS
    assert tuple(hvd_gradq.CODECS) == tasks.DROPIN and "shared_scale" in tasks.DROPIN
    assert set(tasks.BENCH_COMPRESSORS) < set(tasks.COMPRESSORS) and "powersgd" in tasks.COMPRESSORS
    stock2, lad2 = tasks.COMPRESSORS["stock2"], tasks.COMPRESSORS["lad2"]
    assert stock2.stock and stock2.path == "stock" and stock2.bits == 2
    assert not lad2.stock and (lad2.codec, lad2.bits, lad2.budget) == ("shared_scale", 4, 2.0)
    assert tasks.COMPRESSORS["jointsq20"].ratio == 20.0 and tasks.COMPRESSORS["qsgd4"].codec == "qsgd"
    assert not set(tasks.ALIASES) & set(tasks.COMPRESSORS)  # an old name is never also a new one
    assert tasks.COMPRESSORS["lad2f"].metric == "lad_first_order" and tasks.COMPRESSORS["lad2r"].metric == "lad"
    assert (tasks.COMPRESSORS["topk20"].codec, tasks.COMPRESSORS["topk20"].ratio) == ("topk", 20.0)
    assert tasks.COMPRESSORS["mixed10h"].budget == 1.0 and tasks.COMPRESSORS["mixed07h"].budget == 0.7
    peers = {n: (c.hook, c.rank) for n, c in tasks.COMPRESSORS.items() if c.path == "ddp"}
    assert peers == {"powersgd": ("powersgd", 4), "powersgd8": ("powersgd", 8), "ddp_fp16": ("fp16", None),
                     "ddp_bf16": ("bf16", None), "ddp_none": (None, None)}
    assert set(tasks.DDP_COMPRESSORS) == set(peers) and not set(peers) & set(tasks.BENCH_COMPRESSORS)


def test_old_names_are_accepted_and_mapped_to_the_new_ones():
    p = argparse.ArgumentParser()
    p.add_argument("--compressor", type=tasks.compressor_name, choices=tasks.EXAMPLE_COMPRESSORS)
    p.add_argument("--solver", type=tasks.solver_name, choices=tasks.SOLVERS)
    args = p.parse_args(["--compressor", "uniform", "--solver", "uniform"])
    assert (args.compressor, args.solver) == ("stock", "same_bits")
    assert p.parse_args(["--compressor", "gradq-uniform"]).compressor == "shared_scale"
    assert [tasks.compressor_name(f"uniform{b}") for b in (2, 4, 8)] == ["stock2", "stock4", "stock8"]
    with pytest.raises(SystemExit):
        p.parse_args(["--compressor", "lanes"])
    with pytest.raises(ValueError, match="unknown compressor"):
        tasks.make_optimizer("stock", None, None, None, None)  # an example name, not a benchmark's
