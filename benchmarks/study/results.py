"""The study's results: which rows are done, and the figures the tables show, read from the
compacted logs (``<out>/runs.jsonl.gz``)."""
from __future__ import annotations

import re
from pathlib import Path

from benchmarks.archive import Archive
from benchmarks.study.grid import ARCHIVE, LAYER_GROUPS, Grid, Row


def _last_line(text: str | None) -> str:
    if text is None:
        return "no output"
    lines = [s.strip() for s in re.split(r"[\r\n]", text) if s.strip()]
    return lines[-1][:160] if lines else "no output"


class Results:
    """The study's runs in ``<out>/runs.jsonl.gz``: a row is done (its log), failed (a status, no
    log) or not run. A row's files there: ``<id>.json`` (the example's log), ``<id>.status.json``
    (exit status, seconds, commit) and ``<id>.txt`` (its output)."""

    def __init__(self, out: Path, grid: Grid) -> None:
        self.out, self.grid = out, grid
        self.archive = Archive(out / ARCHIVE)

    def log(self, row_id: str) -> dict | None:
        log = self.archive.get(row_id, f"{row_id}.json")
        return log if isinstance(log, dict) else None  # text: a log cut short

    def output(self, row_id: str) -> str | None:
        return self.archive.get(row_id, f"{row_id}.txt")

    def status_record(self, row_id: str) -> dict | None:
        return self.archive.get(row_id, f"{row_id}.status.json")

    def status(self, row_id: str) -> str:
        """'done', 'failed: <last line of its output>' or 'not run'."""
        if self.log(row_id) is not None:
            return "done"
        st = self.status_record(row_id)
        if st is not None:
            why = _last_line(self.output(row_id))
            if st.get("rc") == 0:
                why = "exited 0 but wrote no log"
            return f"failed: {why}"
        return "not run"

    def smoke(self) -> bool:
        return any((self.status_record(r) or {}).get("smoke") for r in self.archive.runs)

    def copies(self) -> list[Row]:
        """Seed copies of grid rows that have a log or a status (found by their id: <row>-s<seed>)."""
        found = {}
        for run in sorted(self.archive.runs, key=lambda r: f"{r}.json"):
            m = re.fullmatch(r"(.+)-s(\d+)", run)
            if m and m.group(1) in self.grid.rows and (self.log(run) is not None or self.status_record(run)):
                copy = self.grid.rows[m.group(1)].with_seed(int(m.group(2)))
                found[copy.id] = copy
        return list(found.values())

    def cells(self, row_id: str, fns: list) -> list[str]:
        """``fn(log)`` for each column, or the row's status in the first cell."""
        log = self.log(row_id)
        if log is None:
            return [self.status(row_id), *[""] * (len(fns) - 1)]
        out = []
        for fn in fns:
            try:
                out.append(fn(log))
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                out.append("?")
        return out


def _final(log: dict, metric: str) -> float:
    final = log["summary"].get("final") or (log["evals"][-1] if log["evals"] else {})
    return final[metric]


def accuracy(log: dict) -> str:
    return f"{_final(log, 'test_accuracy'):.4f}"


def valid_ppl(log: dict) -> str:
    return f"{_final(log, 'valid_ppl'):.2f}"


def test_ppl(log: dict) -> str:
    return f"{_final(log, 'test_ppl'):.2f}"


def compression(log: dict) -> str:
    """fp32 bytes over the mean bytes on the wire per step."""
    r = log["summary"]["mean_wire_ratio"]
    return f"{1 / r:.1f}x" if r > 0 else "all layers dropped"


def bits_per_element(log: dict) -> str:
    return f"{32 * log['summary']['mean_wire_ratio']:.2f}"


def allocations(log: dict) -> str:
    a = log["summary"].get("allocation")
    return "-" if a is None else str(a["allocations"])


def allocation_seconds(log: dict) -> str:
    a = log["summary"].get("allocation")
    return "-" if a is None else f"{a['seconds']:.1f} ({100 * a.get('fraction', 0.0):.1f}%)"


def train_seconds(log: dict) -> str:
    return f"{log['summary']['train_seconds']:.0f}"


def coding_variance(log: dict) -> str:
    v = [s["coding_variance"] for s in log["steps"] if s.get("coding_variance") is not None]
    return f"{sum(v) / len(v):.4g}" if v else "-"


def layer_group(name: str) -> str:
    """The Transformer's layer groups of Table G."""
    if name in ("embedding.weight", "position.weight"):
        return "embedding"
    if "self_attn" in name:
        return "attention"
    if "linear1" in name or "linear2" in name:
        return "FFN"
    if name == "decoder.weight":
        return "decoder"
    return "other"


def bits_over_steps(log: dict) -> tuple[list[str], list[list[int]]]:
    """(layer names, bits[layer][step]): each codebook entry holds from its step to the next one's."""
    names = list(log["layers"])
    books = sorted(log["codebooks"], key=lambda c: c["step"])
    n = max(len(log["steps"]), books[-1]["step"] + 1 if books else 0)
    bits = [[32] * n for _ in names]
    for i, book in enumerate(books):
        end = books[i + 1]["step"] if i + 1 < len(books) else n
        for li, name in enumerate(names):
            b = book["bits"].get(name, 32)
            for s in range(book["step"], end):
                bits[li][s] = b
    return names, bits


def group_bits(log: dict) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Element-weighted mean bits per layer group over the run and at the end, over the coded
    layers (float32 ones, under --min-elements, are left out; None: no coded layer)."""
    names, bits = bits_over_steps(log)
    numel = log["layers"]
    n = len(bits[0]) if bits else 0
    mean: dict[str, float | None] = {}
    final: dict[str, float | None] = {}
    for group in (*LAYER_GROUPS, "all"):
        rows = [(numel[name], b) for name, b in zip(names, bits) if group in ("all", layer_group(name))]
        per_step = []
        for s in range(n):
            coded = [(w, b[s]) for w, b in rows if b[s] != 32]
            weight = sum(w for w, _ in coded)
            per_step.append(sum(w * v for w, v in coded) / weight if weight else None)
        seen = [v for v in per_step if v is not None]
        mean[group] = sum(seen) / len(seen) if seen else None
        final[group] = per_step[-1] if per_step else None
    return mean, final
