"""Helpers shared by the benchmark scripts: JSON-line output and timing."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def check_at_least(error: Callable[[str], Any], values: Mapping[str, Any],
                   names: Iterable[str], low: int = 1) -> None:
  """Calls `error(message)` for the first flag in `names` whose value in `values` (`vars(args)`
  or absl's `FLAGS.flag_values_dict()`) is below `low`: a count of 0 timed nothing (NaN
  output) or failed later with a traceback."""
  for name in names:
    if values[name] < low:
      error(f"--{name} must be at least {low}, got {values[name]}")


def emit(benchmark: str, **fields: Any) -> dict:
  """Prints one JSON line `{"benchmark": NAME, ...}` to stdout and returns it."""
  record = {"benchmark": benchmark, **fields}
  print(json.dumps(record), flush=True)
  return record


def interleaved_times(runners: dict, rounds: int, steps: int, warmup: int = 1
                      ) -> tuple[dict, dict]:
  """Wall and process-CPU seconds per step, each `{name: [[seconds] per round]}`: every
  round runs `steps` steps of each runner in turn (A A B B, A A B B, ...), after `warmup`
  untimed steps each. CPU time (all threads of this process) is far less sensitive than
  wall time to other processes on a shared machine; wall time is what the goal is about."""
  for run in runners.values():
    for _ in range(warmup):
      run.run()
  wall = {name: [] for name in runners}
  cpu = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      ws, cs = [], []
      for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        run.run()
        ws.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
      wall[name].append(ws)
      cpu[name].append(cs)
  return wall, cpu


def median(rounds_of_times) -> float:
  """Median over all rounds' times (`interleaved_times` output for one runner)."""
  return float(np.median([t for r in rounds_of_times for t in r]))
