"""lorakern's benchmark suite (run by `lorakern bench`): providers, timers, reports.

Not imported by the library itself; it imports the library.
"""

from lorakern.bench.suite import BenchConfig, run_suite

__all__ = ["BenchConfig", "run_suite"]
