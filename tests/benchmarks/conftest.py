"""The benchmark scripts import their folder's `common`, as `python benchmarks/X.py` finds
it; the tests that load them get benchmarks/ on `sys.path` here, once, whichever test
module runs first (a module that relied on another one's insert failed when run alone)."""

import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "benchmarks")
if BENCH not in sys.path:
  sys.path.insert(0, BENCH)
