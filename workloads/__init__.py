"""Example workloads: the reference models, the offline datasets and the one map of task and
compressor names that ``examples/`` and ``benchmarks/`` share (``workloads.tasks``).

Not part of the installed ``hvd_gradq`` package: it is imported from a checkout of the
repository (the examples put the repository root on ``sys.path``; the benchmarks' and the tests'
process runner puts it on ``PYTHONPATH``).
"""
