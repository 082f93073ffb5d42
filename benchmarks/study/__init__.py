"""The training-quality study behind docs/results/study/RESULTS.md: every table as a grid of
example runs, run and reported.

    python -m benchmarks.study list               # every row, its tables, its status and its command
    python -m benchmarks.study run --jobs 2       # the rows not yet done, in priority order
    python -m benchmarks.study report             # RESULTS.md and the plots in docs/results/study/

A row is one run of an example (examples/*.py) with ``--log-json <out>/runs/<id>.json --threads 1``;
when it ends, its log, its output and its status (exit status, seconds, the commit) go into
``<out>/runs.jsonl.gz`` (``benchmarks.archive``), and it is done when its log is there. Identical
commands in several tables run once and are shared. Tables (the shapes of the LAD, JointSQ and ALQ
papers; the numbers are ours):

* A  FP32 / uniform / greedy / LAD: the CNN at 2 bits, the LSTM at 3 bits (LAD Tables 1-2)
* B  distortion metric (MSE, LAD) x solver (greedy, Lagrangian), CNN at 2 bits (LAD Table 3)
* C  reallocation trigger: static, fixed interval, similarity tau and k_min (LAD Table 4)
* D  base quantizer (QSGD, natural, ALQ) x bits, with and without the allocator (LAD Fig. 3)
* E  JointSQ and top-k at 20x and 1000x against FP32 and 4-bit QSGD (the JointSQ paper)
* F  ALQ, AMQ, QSGDinf, NUQSGD, TernGrad at 3 bits: accuracy and coding variance (the ALQ paper)
* G  where the Transformer's bits go (embedding, attention, FFN, decoder)
* R  Table A's CNN rows as a real ``horovodrun -np 2`` job next to 2 simulated workers

``run`` runs rows as process groups (``benchmarks.procs``, killed at ``--timeout``), ``--jobs`` at a
time; a failed row is recorded (its output keeps the error) and the run goes on; the report is
rewritten after every finished row. ``--smoke`` appends tiny limits to every command (a check of
the plumbing, never numbers to report). ``run`` and ``report`` refuse a checkout with uncommitted
changes unless ``--allow-dirty`` (``benchmarks.provenance``).

Modules: ``grid`` (rows, tables, run order), ``runner``, ``results`` (what the logs say),
``report`` (RESULTS.md), ``plots``, ``cli``.
"""
from benchmarks.study.cli import main
from benchmarks.study.grid import (
    DEFAULT_OUT,
    PLACEHOLDER,
    ROOT,
    TABLES,
    Entry,
    Grid,
    Row,
    build_grid,
    plan,
)
from benchmarks.study.report import write_report
from benchmarks.study.results import Results, bits_over_steps, group_bits, layer_group
from benchmarks.study.runner import run_rows

__all__ = ["DEFAULT_OUT", "PLACEHOLDER", "ROOT", "TABLES", "Entry", "Grid", "Results", "Row", "bits_over_steps",
           "build_grid", "group_bits", "layer_group", "main", "plan", "run_rows", "write_report"]
