"""Benchmarks and study drivers: ``python -m benchmarks.<name>`` from a checkout (not part of the
installed ``hvd_gradq`` package). Each writes its summary markdown, results.json and plots under
docs/results/<study>/, its raw per-run logs compacted into one file there (``benchmarks.archive``),
and the commit it ran at (``benchmarks.provenance``); every command it starts runs through
``benchmarks.procs``."""
