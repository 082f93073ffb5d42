"""The raw logs of a study's runs, compacted into one gzip-compressed JSON-lines file.

A run (a study row, a benchmark cell) writes its files into a scratch directory while it runs;
when it ends they are folded into the study's archive (``runs.jsonl.gz``, ``cells.jsonl.gz``) and
the scratch directory goes. Every line of the archive is one record, tagged by its run:

    {"run": "A-cnn-lad", "file": "A-cnn-lad.json", "json": {...}}      a JSON file, parsed
    {"run": "A-cnn-lad", "file": "A-cnn-lad.txt", "line": "..."}       one line of a text file, in order

Text is split at "\\n" and joined back exactly. The checkout's absolute path is written as a path
relative to the repository (logs name files inside it). The file is rewritten whole, sorted by
run and file, with no timestamp in the gzip header: saving the same logs gives the same bytes.
"""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

from benchmarks.procs import ROOT


def relative(text: str) -> str:
    """``text`` with the checkout's absolute path made repository-relative."""
    return text.replace(f"{ROOT}/", "").replace(str(ROOT), ".")


class Archive:
    """The archive at ``path``: {run: {file name: parsed JSON or text}}, loaded on first use."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._runs: dict[str, dict[str, object]] | None = None

    @property
    def runs(self) -> dict[str, dict[str, object]]:
        if self._runs is None:
            self._runs = {}
            if self.path.exists():
                with gzip.open(self.path, "rt", encoding="utf-8", newline="\n") as f:
                    for line in f:
                        rec = json.loads(line)
                        files = self._runs.setdefault(rec["run"], {})
                        if "json" in rec:
                            files[rec["file"]] = rec["json"]
                        else:
                            files[rec["file"]] = (files[rec["file"]] + "\n" + rec["line"]
                                                  if rec["file"] in files else rec["line"])
        return self._runs

    def get(self, run: str, file: str, default=None):
        return self.runs.get(run, {}).get(file, default)

    def put(self, run: str, file: str, value) -> None:
        """Record ``value`` (str: a text file; anything else: a JSON file) as ``file`` of ``run``."""
        self.runs.setdefault(run, {})[file] = relative(value) if isinstance(value, str) else json.loads(
            relative(json.dumps(value)))

    def put_dir(self, run: str, directory: Path) -> None:
        """Record every file of ``directory`` (``*.json`` parsed, others as text) as files of ``run``."""
        for p in sorted(directory.iterdir()):
            if not p.is_file():
                continue
            text = p.read_text(errors="replace")
            if p.suffix == ".json":
                try:
                    self.put(run, p.name, json.loads(text))
                    continue
                except json.JSONDecodeError:  # cut short: kept as text
                    pass
            self.put(run, p.name, text)

    def drop(self, run: str, file: str | None = None) -> None:
        """Forget ``run`` (or one of its files)."""
        if file is None:
            self.runs.pop(run, None)
        else:
            self.runs.get(run, {}).pop(file, None)

    def save(self) -> Path:
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
            for run in sorted(self.runs):
                for name in sorted(self.runs[run]):
                    value = self.runs[run][name]
                    if isinstance(value, str):
                        recs = [{"run": run, "file": name, "line": s} for s in value.split("\n")]
                    else:
                        recs = [{"run": run, "file": name, "json": value}]
                    for rec in recs:
                        gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(self.path)
        return self.path
