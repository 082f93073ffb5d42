"""The study's report: RESULTS.md, every table with the exact command of each of its rows, built
from the compacted logs; the hand-written Reading section is kept across rewrites."""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from benchmarks.provenance import NOT_RECORDED
from benchmarks.study.grid import (
    ARCHIVE,
    CNN,
    GENERATED,
    LAYER_GROUPS,
    LSTM,
    PLACEHOLDER,
    TABLES,
    TRF,
    Grid,
    Row,
    build_grid,
    log_arg,
    repo_path,
)
from benchmarks.study.plots import plots
from benchmarks.study.results import (
    Results,
    accuracy,
    allocation_seconds,
    allocations,
    bits_per_element,
    coding_variance,
    compression,
    group_bits,
    test_ppl,
    train_seconds,
    valid_ppl,
)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows], ""]


def _display(row: Row, res: Results, out: Path) -> str:
    """The exact command: the one the log recorded, or the one ``run`` would start."""
    log = res.log(row.id)
    if log is not None and log.get("command"):
        return " ".join(shlex.quote(a) for a in [*row.launcher, "python"]) + " " + log["command"]
    return " ".join(shlex.quote(a) for a in row.command(log_arg(out, row.id)))


def _commands(rows: list[tuple[Row, str]], res: Results, out: Path, title: str) -> list[str]:
    """A collapsed block with the exact command of every (row, its labels in this table)."""
    lines = [f"<details><summary>Commands ({title})</summary>", "", "```"]
    for r, label in rows:
        shared = f", shared by tables {','.join(r.tables)}" if len(r.tables) > 1 else ""
        lines += [f"# {r.id}: {label} (seed {r.seed}{shared})", _display(r, res, out)]
    return [*lines, "```", "", "</details>", ""]


def _table_rows(grid: Grid, name: str) -> list[tuple[Row, str]]:
    labels: dict[str, list[str]] = {}
    for e in grid.table(name):
        labels.setdefault(e.row, []).append(e.label)
    return [(grid.rows[i], "; ".join(dict.fromkeys(ls))) for i, ls in labels.items()]


def _section_a(grid: Grid, res: Results) -> list[str]:
    head = ["compression vs fp32", "bits/element on the wire", "allocations", "allocation s (share of wall)",
            "train s"]
    wire = [compression, bits_per_element, allocations, allocation_seconds, train_seconds]
    lines = ["CNN at 2 bits per element (Fashion-MNIST test accuracy after 1 epoch):", ""]
    cnn = [e for e in grid.table("A") if e.key[0] == "cnn"]
    lines += _md_table(["method", "test accuracy", *head],
                       [[e.label, *res.cells(e.row, [accuracy, *wire])] for e in cnn])
    lines += ["LSTM at 3 bits per element (perplexity after 1 epoch):", ""]
    lstm = [e for e in grid.table("A") if e.key[0] == "lstm"]
    lines += _md_table(["method", "valid ppl", "test ppl", *head],
                       [[e.label, *res.cells(e.row, [valid_ppl, test_ppl, *wire])] for e in lstm])
    return lines


def _simple(fns: list, header: list[str]):
    def section(grid: Grid, res: Results, name: str) -> list[str]:
        return _md_table(["row", *header], [[e.label, *res.cells(e.row, fns)] for e in grid.table(name)])
    return section


def _section_d(grid: Grid, res: Results) -> list[str]:
    by = {e.key: e.row for e in grid.table("D")}
    pairs = sorted({k[:2] for k in by}, key=lambda k: (["qsgd", "natural", "alq"].index(k[0]), k[1]))
    rows = []
    for codec, bits in pairs:
        fixed = res.cells(by[(codec, bits, "fixed")], [accuracy, compression]) if (codec, bits, "fixed") in by \
            else ["left out", ""]
        lad = res.cells(by[(codec, bits, "lad")], [accuracy, compression, allocations]) \
            if (codec, bits, "lad") in by else ["left out", "", ""]
        rows.append([codec, str(bits), fixed[0], lad[0], fixed[1], lad[1], lad[2]])
    return _md_table(["quantizer", "bits (budget)", "accuracy, fixed bits", "accuracy, LAD", "compression, fixed",
                      "compression, LAD", "allocations (LAD)"], rows)


def _fmt_bits(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _section_g(grid: Grid, res: Results) -> list[str]:
    def groups(log: dict) -> list[str]:
        mean, final = group_bits(log)
        return [f"{_fmt_bits(mean[g])} / {_fmt_bits(final[g])}" for g in (*LAYER_GROUPS, "all")]

    rows = []
    for e in grid.table("G"):
        log = res.log(e.row)
        if log is None:
            rows.append([e.label, res.status(e.row), *[""] * (len(LAYER_GROUPS) + 2)])
        else:
            rows.append([e.label, *res.cells(e.row, [valid_ppl, test_ppl]), *groups(log)])
    lines = ["Bits per element, element-weighted over the coded layers of each group: mean over the steps / "
             "at the end. Groups: embedding = embedding.weight + position.weight; attention = self_attn.*; "
             "FFN = linear1.* + linear2.*; decoder = decoder.weight; other = the rest (norms, biases). "
             "Layers sent as float32 (under --min-elements) are left out; '-' = no coded layer.", ""]
    return lines + _md_table(["run", "valid ppl", "test ppl", *LAYER_GROUPS, "all coded"], rows)


def _section_r(grid: Grid, res: Results) -> list[str]:
    by = {e.key: e for e in grid.table("R")}
    fns = [accuracy, compression, allocations, train_seconds]
    rows = []
    for key in dict.fromkeys(k[0] for k in by):
        real, sim = res.cells(by[(key, "real")].row, fns), res.cells(by[(key, "sim")].row, fns)
        rows.append([by[(key, "real")].label, real[0], sim[0], real[1], sim[1], real[2], sim[2], real[3], sim[3]])
    return _md_table(["method", "accuracy, real np=2", "accuracy, simulated 2", "compression, real",
                      "compression, simulated", "allocations, real", "allocations, simulated", "train s, real",
                      "train s, simulated"], rows)


def _section_by_model(grid: Grid, res: Results, table: str = "Q", note: str = "") -> list[str]:
    """Per model: each row's headline metric at seeds 0 and 1, their mean, and the wire figures."""
    copies = {c.id: c for c in res.copies()}
    lines = ["Simulated workers (4), 1 epoch; the metric per seed, then the mean of the seeds that ran "
             "(CNN: test accuracy; LSTM, Transformer: validation perplexity). Bits/element: one worker's "
             "bytes handed to the collectives per step over the elements, at seed 0." + note, ""]
    titles = {"cnn": "CNN (Fashion-MNIST)", "lstm": "LSTM (Austen, emb 128, hidden 256)",
              "trf": "Transformer (Austen)"}
    for model, title in titles.items():
        entries = [e for e in grid.table(table) if e.key[0] == model]
        if not entries:
            continue
        rows = []
        for e in entries:
            values = []
            for rid in (e.row, f"{e.row}-s1"):
                log = res.log(rid)
                values.append(None if log is None else _headline(log)[1])
            shown = ["-" if v is None else f"{v:.4g}" for v in values]
            if values[0] is None:
                shown[0] = res.status(e.row)
            if values[1] is None and f"{e.row}-s1" in copies:
                shown[1] = res.status(f"{e.row}-s1")
            done = [v for v in values if v is not None]
            mean = f"{sum(done) / len(done):.4g}" if done else "-"
            rows.append([e.label, *shown, mean, *res.cells(e.row, [bits_per_element, allocations, train_seconds])])
        lines += [f"{title}:", ""]
        lines += _md_table(["method", "seed 0", "seed 1", "mean", "bits/element on the wire", "allocations",
                            "train s (seed 0)"], rows)
    return lines


SECTIONS = {
    "A": _section_a,
    "B": lambda g, r: _simple([accuracy, compression, allocations, allocation_seconds],
                              ["test accuracy", "compression vs fp32", "allocations", "allocation s"])(g, r, "B"),
    "C": lambda g, r: ["Allocations count the one at step 0; the similarity trigger's defaults are tau 0.95, "
                       "k_min 20 (rows with the same command share one run).", "",
                       *_simple([accuracy, allocations, allocation_seconds, compression],
                                ["test accuracy", "allocations", "allocation s", "compression vs fp32"])(g, r, "C")],
    "D": _section_d,
    "E": lambda g, r: ["Top-k sends float32 values and int32 indices; its wire ratio is measured, not the nominal "
                       "ratio.", "",
                       *_simple([accuracy, compression, bits_per_element],
                                ["test accuracy", "measured compression vs fp32", "bits/element"])(g, r, "E")],
    "F": lambda g, r: ["Normalised variance: the mean over steps of sum ||Q(x) - x||^2 / sum ||x||^2 over the coded "
                       "layers (the log's `coding_variance`; '-' where the log has none).", "",
                       *_simple([accuracy, compression, coding_variance],
                                ["test accuracy", "compression vs fp32", "normalised variance"])(g, r, "F")],
    "G": _section_g,
    "R": _section_r,
    "Q": _section_by_model,
    "L": lambda g, r: _section_by_model(g, r, "L", " Low-rank factors travel in float32 (P with the summed header, "
                                     "then Q) unless the row says float16."),
}


def _headline(log: dict) -> tuple[str, float]:
    final = log["summary"].get("final") or {}
    name = "test_accuracy" if "test_accuracy" in final else "valid_ppl"
    return name, final[name]


def _section_seeds(grid: Grid, res: Results, out: Path) -> list[str]:
    copies = res.copies()
    if not copies:
        return []
    by_base: dict[str, list[Row]] = {}
    for c in copies:
        by_base.setdefault(c.base, []).append(c)
    rows = []
    for base, cs in by_base.items():
        values, metric = [], ""
        for r in [grid.rows[base], *sorted(cs, key=lambda c: c.seed)]:
            log = res.log(r.id)
            if log is not None:
                metric, v = _headline(log)
                values.append((r.seed, v))
        per_seed = ", ".join(f"{s}: {v:.4g}" for s, v in values) or "-"
        mean = f"{sum(v for _, v in values) / len(values):.4g}" if values else "-"
        spread = f"{max(v for _, v in values) - min(v for _, v in values):.4g}" if len(values) > 1 else "-"
        rows.append([base, ",".join(grid.rows[base].tables), metric, per_seed, mean, spread])
    lines = ["## Other seeds", "", "The same rows at other seeds (`run --seeds` / `--extra-seeds`).", ""]
    lines += _md_table(["row", "tables", "metric", "per seed", "mean", "max - min"], rows)
    return lines + _commands([(c, c.label) for c in copies], res, out, "other seeds")


def _kept_reading(results: Path) -> str | None:
    """The hand-written Reading section of an existing RESULTS.md (None: still the placeholder)."""
    if not results.exists():
        return None
    m = re.search(r"^## Reading\n(.*?)(?=^## |\Z)", results.read_text(), flags=re.S | re.M)
    if m is None or not m.group(1).strip() or PLACEHOLDER in m.group(1):
        return None
    return m.group(1).strip()


def _intro(grid: Grid, res: Results) -> list[str]:
    def params(script: str) -> str:
        for r in grid.rows.values():
            log = res.log(r.id)
            if r.example == script and log is not None and log["mode"] == "simulated" and log["workers"] == 4:
                return f"{log['parameters']:,} parameters, {log['summary']['steps']} steps in the epoch at " \
                       f"{log['workers']} workers; "
        return ""

    return [
        "These are this project's own measurements, taken on a 2-core CPU machine with short schedules: one epoch "
        "of each example, 4 workers simulated in one process, one thread per run. The tables follow the shapes of "
        "the LAD paper (Tables 1-4, Fig. 3), the JointSQ paper and the ALQ paper; no number here is taken from "
        "them, and with schedules this short the absolute numbers are far from the papers' converged ones.",
        "",
        "The simulated workers (`hvd_gradq.SimulatedWorkers`, `--workers N`) run the exact exchange code of a "
        "real Horovod job (encode, the collectives' byte routing, decode, error feedback, allocation on rank 0) "
        "on each worker's micro-batch; `tests/test_simulate.py` checks the simulation against a horovodrun job, "
        "and Table R compares a real `horovodrun -np 2` run with 2 simulated workers end to end.",
        "",
        "Models (small, so that the grid fits the machine):",
        "",
        f"* CNN: `examples/fashion_mnist_cnn.py`, a ResNet-style CNN on Fashion-MNIST ({params(CNN)}batch 64 per "
        "worker, SGD lr 0.05, momentum 0.9), evaluated on the 10k test images every 50 steps;",
        f"* LSTM: `examples/austen_lstm_lm.py --emb 128 --hidden 256`, a 2-layer word-level LSTM language model on "
        f"Jane Austen's novels ({params(LSTM)}vocabulary 10k, batch 20 x 35 tokens per worker, SGD lr 20, clip "
        "0.25), validation and test perplexity every 100 steps;",
        f"* TRF: `examples/transformer_lm.py`, a 2-block causal Transformer (dim 128, 4 heads, FFN 512) on the same "
        f"text ({params(TRF)}batch 16 x 35 tokens per worker, SGD lr 5, clip 0.25).",
        "",
        "Compression vs fp32 is the float32 gradient's bytes over the bytes one worker hands to the collectives "
        "per step, averaged over the steps (1 / the log's `summary.mean_wire_ratio`); bits/element is 32 times "
        "that ratio. Allocation seconds are rank 0's time deciding bits (probe passes and solver), with their "
        "share of the run's wall clock.",
        "",
        "Regenerate (the runs take hours; `run` skips rows whose log exists and rewrites this file after every "
        "row; `list` shows every row and its command):",
        "",
        "```",
        "python -m benchmarks.study run --jobs 2 && python -m benchmarks.study report",
        "```",
        "",
    ]


def write_report(out: Path, results: Path, grid: Grid | None = None, commit: str = NOT_RECORDED) -> Path:
    """Write ``results`` (markdown) and the plots into ``out`` from the logs in ``out``/runs.jsonl.gz;
    ``commit``: the code that writes it (each row's own commit is in its status record)."""
    grid = grid or build_grid()
    res = Results(out, grid)
    out.mkdir(parents=True, exist_ok=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    made = plots(grid, res, out)
    rel = Path(os.path.relpath(out.resolve(), results.parent.resolve()))
    statuses = [res.status(r) for r in grid.rows]
    done, failed = statuses.count("done"), sum(s.startswith("failed") for s in statuses)
    lines = ["# Study results", "",
             f"<!-- {GENERATED} (commit {commit}) from the logs in {repo_path(out / ARCHIVE)}; rewritten after "
             "every row: edit the script, not this file (the Reading section alone is kept across rewrites) -->", "",
             f"This file is {GENERATED} from the runs' JSON logs; the plots are in "
             f"`{rel.as_posix()}/`." if rel != Path(".") else f"This file is {GENERATED} from the runs' JSON logs.",
             ""]
    if res.smoke():
        lines += ["**SMOKE RUN: some rows ran with `--smoke` (3 steps on a slice of the data); their numbers check "
                  "the plumbing and mean nothing.**", ""]
    lines += _intro(grid, res)
    lines += [f"Status: {done} of {len(statuses)} rows done, {failed} failed, {len(statuses) - done - failed} not run.",
              "", "## Reading", "", _kept_reading(results) or PLACEHOLDER, ""]
    seeds = {name: sorted({grid.rows[e.row].seed for e in grid.table(name)}) for name in TABLES}
    for name, title in TABLES.items():
        lines += [f"## {title}", "", f"Seed {', '.join(map(str, seeds[name]))}.", ""]
        lines += [f"Note: {n}" for n in grid.notes.get(name, [])] + ([""] if grid.notes.get(name) else [])
        lines += SECTIONS[name](grid, res)
        lines += [f"![{p.stem}]({(rel / p.name).as_posix()})" for p in made.get(name, [])]
        lines += [""] if made.get(name) else []
        lines += _commands(_table_rows(grid, name), res, out, f"Table {name}")
    lines += _section_seeds(grid, res, out)
    results.write_text("\n".join(lines).rstrip() + "\n")
    return results
