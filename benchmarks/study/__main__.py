"""``python -m benchmarks.study {list,run,report}``: see ``benchmarks.study``."""
from benchmarks.study.cli import main

main()
