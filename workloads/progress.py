"""Progress output for the examples' epochs and the benchmarks' sweeps.

On a terminal: a tqdm bar. Anywhere else (a log file, a pipe, a horovodrun job, whose launcher
prefixes every line with the rank, e.g. ``[1,0]<stdout>:``) no carriage-return bars, but one
plain line at every ~10% of the total and at the end. Shown by rank 0 only (``enabled``).
Under ``horovodrun --mpi`` a rank's stdout *is* a terminal (Open MPI gives the ranks a pty) whose
output is collected and tagged: a process started by a launcher counts as not interactive.
"""
from __future__ import annotations

import math
import os
import sys
import time

#: set by horovodrun / mpirun / Gloo in every rank: their output is collected, not a terminal
_LAUNCHED = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def say(text: str) -> None:
    """Print one line in one write (a launcher that tags its ranks' output tags every write, so
    ``print``'s separate writes of the text and of the newline would split the line)."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


def interactive() -> bool:
    """Is stdout a terminal of this process (and not one a launcher gave the ranks)?"""
    return sys.stdout.isatty() and not any(v in os.environ for v in _LAUNCHED)


class Progress:
    """``total`` steps; ``update()`` after each, ``write()`` for a line in between."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, every: float = 0.1) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.n = 0
        self.postfix = ""
        self.started = time.perf_counter()
        self.bar = None
        if enabled and interactive():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, file=sys.stdout, dynamic_ncols=True, mininterval=2.0)
        self._step = max(1, math.ceil(total * every))
        self._next = self._step

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if not self.enabled or (self.n < self._next and self.n != self.total):
            return
        while self._next <= self.n:
            self._next += self._step
        pct = 100 * self.n / self.total if self.total else 100.0
        say(f"{self.desc}: {self.n}/{self.total} ({pct:.0f}%), {time.perf_counter() - self.started:.0f} s"
            + (f", {self.postfix}" if self.postfix else ""))

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            say(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
