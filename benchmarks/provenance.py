"""Which code produced a result. Every benchmark driver refuses to run from a checkout with
uncommitted changes (``git status --porcelain``) unless given ``--allow-dirty``, and records the
commit (``git rev-parse HEAD``, plus "-dirty" when allowed dirty) in its results JSON and its
markdown.

Changes under the driver's own output directory do not count: they are its earlier results (a
resumed study, a hand-written Reading section), not code.

    provenance.add_argument(parser)
    commit = provenance.commit(args.allow_dirty, outputs=[out])
"""
from __future__ import annotations

import argparse
import contextlib
import subprocess
from pathlib import Path

from benchmarks.procs import ROOT

NOT_RECORDED = "not recorded"


def _git(*args: str, root: Path) -> str:
    run = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"`git {' '.join(args)}` failed in {root} (a benchmark runs from a git checkout of "
                         f"the project): {run.stderr.strip()}")
    return run.stdout


def changes(outputs: list[Path | str] = (), root: Path = ROOT) -> list[str]:
    """The ``git status --porcelain`` entries (untracked files one by one) outside ``outputs``."""
    raw = _git("status", "--porcelain", "-z", "--untracked-files=all", root=root)
    skip = []
    for o in outputs:
        p = Path(o) if Path(o).is_absolute() else root / o
        with contextlib.suppress(ValueError):  # outside the checkout: nothing of it is in git status
            skip.append(p.resolve().relative_to(root.resolve()).as_posix())
    fields = raw.split("\0")
    out, i = [], 0
    while i < len(fields) and fields[i]:
        entry = fields[i]
        paths = [entry[3:]]
        if set(entry[:2]) & {"R", "C"}:  # a rename or copy: "R  new", then the old path as its own field
            i += 1
            paths.append(fields[i])
        i += 1
        if all(any(p == s or p.startswith(s.rstrip("/") + "/") for s in skip) for p in paths):
            continue
        out.append(entry)
    return out


def commit(allow_dirty: bool, outputs: list[Path | str] = (), root: Path = ROOT) -> str:
    """``git rev-parse HEAD``; "-dirty" appended when the checkout has uncommitted changes outside
    ``outputs`` and ``allow_dirty``; without it such changes stop the driver (SystemExit)."""
    head = _git("rev-parse", "HEAD", root=root).strip()
    dirty = changes(outputs, root)
    if not dirty:
        return head
    if not allow_dirty:
        shown = "\n  ".join(dirty[:10]) + (f"\n  ... and {len(dirty) - 10} more" if len(dirty) > 10 else "")
        raise SystemExit(f"the checkout has uncommitted changes, so the results could not be tied to a commit:\n"
                         f"  {shown}\ncommit them, or pass --allow-dirty (the results then say {head}-dirty)")
    return f"{head}-dirty"


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-dirty", action="store_true",
                        help="run even with uncommitted changes in the checkout (the commit is recorded with "
                             "'-dirty')")
