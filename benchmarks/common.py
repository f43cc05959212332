"""Helpers shared by the benchmark scripts: JSON-line output and timing."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def emit(benchmark: str, **fields: Any) -> dict:
  """Prints one JSON line `{"benchmark": NAME, ...}` to stdout and returns it."""
  record = {"benchmark": benchmark, **fields}
  print(json.dumps(record), flush=True)
  return record


def time_calls(fn: Callable[[], Any], warmup: int = 3, iters: int = 20) -> float:
  """Median seconds per call of `fn` (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  times.sort()
  return times[len(times) // 2]
