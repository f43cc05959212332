"""Helpers shared by the benchmark scripts: JSON-line output and timing."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """`--help` with each flag's default, unless its help already says it (`(default: a temp
  dir, removed) (default: None)` read twice) or the flag is required."""

  def _get_help_string(self, action):
    if action.required or "default:" in (action.help or ""):
      return action.help
    return super()._get_help_string(action)


def check_at_least(error: Callable[[str], Any], values: Mapping[str, Any],
                   names: Iterable[str], low: int = 1) -> None:
  """Calls `error(message)` for the first flag in `names` whose value in `values` (`vars(args)`
  or absl's `FLAGS.flag_values_dict()`) is below `low`: a count of 0 timed nothing (NaN
  output) or failed later with a traceback."""
  for name in names:
    if values[name] < low:
      error(f"--{name} must be at least {low}, got {values[name]}")


def interruptible(main: Callable) -> Callable:
  """`main` with Ctrl-C as one line on stderr and exit code 130 (it was a traceback in
  every benchmark): the entry point of each benchmark script."""
  @functools.wraps(main)
  def run(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except KeyboardInterrupt:
      print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
      sys.exit(130)
  return run


def check_dir_flag(error: Callable[[str], Any], flag: str, path: str | None) -> None:
  """`error(message)` when `--flag=path` names something other than a directory (a file:
  a traceback after minutes of work) or a place no directory can be made (no parent)."""
  if path is None:
    return
  if os.path.exists(path):
    if not os.path.isdir(path):
      error(f"--{flag}: {path} is not a directory")
    return
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    error(f"--{flag}: cannot make {path} ({parent} is not a writable directory)")


def own_dir(error: Callable[[str], Any], flag: str, path: str, marker: str,
            outputs: Iterable[str] | None = None) -> None:
  """Makes `path` a directory holding `marker` (this benchmark's), without the `outputs`
  (names in it; None: everything) of an earlier run of it (its marker); an empty or new
  one is taken, anything else refused (a user's files there were deleted: a training run's
  checkpoints). Only the entries go: `path` may be a symlink."""
  check_dir_flag(error, flag, path)
  if os.path.isdir(path) and os.listdir(path):
    if not os.path.exists(os.path.join(path, marker)):
      error(f"--{flag}: {path} is not empty and not a directory of an earlier run of this "
            "benchmark; remove it or pick another")
    for name in os.listdir(path) if outputs is None else outputs:
      full = os.path.join(path, name)
      if os.path.isdir(full) and not os.path.islink(full):
        shutil.rmtree(full)
      elif os.path.lexists(full) and name != marker:
        os.remove(full)
  os.makedirs(path, exist_ok=True)
  open(os.path.join(path, marker), "w").close()


@contextlib.contextmanager
def scratch_dir(path: str | None, prefix: str) -> Iterator[str]:
  """`path`, or a new temp dir removed on any exit (Ctrl-C, an error): a temp dir removed
  only at the end stayed behind, hundreds of MB."""
  if path is not None:
    yield path
    return
  with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as tmp:
    yield tmp


def finite_or_none(value: Any) -> Any:
  """`value` with every NaN or infinite float (in dicts, lists, tuples) made None: `NaN` is
  not JSON (a strict parser rejected the line)."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: finite_or_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite_or_none(v) for v in value]
  return value


def emit(benchmark: str, **fields: Any) -> dict:
  """Prints one JSON line `{"benchmark": NAME, ...}` to stdout (non-finite numbers as null)
  and returns it."""
  record = finite_or_none({"benchmark": benchmark, **fields})
  print(json.dumps(record, allow_nan=False), flush=True)
  return record


# Thread-name prefixes (Linux `comm`, 15 characters) → what runs there. Threads Python
# starts keep the main thread's name (`python`, `python3.11`, a launcher's): `python`.
THREAD_GROUPS = (("tf_XLA", "xla"), ("ts_", "tensorstore"))


def thread_cpu_seconds() -> dict[str, tuple[str, float]]:
  """`{thread id: (group, CPU seconds so far)}` for this process's live threads (user +
  system; `python` for threads named as the main thread, which is every thread Python
  starts, then `THREAD_GROUPS`, `other` for the rest). Empty where `/proc/self/task` does
  not exist (not Linux)."""
  out: dict[str, tuple[str, float]] = {}
  if not os.path.isdir("/proc/self/task"):
    return out
  tick = os.sysconf("SC_CLK_TCK")
  with open(f"/proc/self/task/{os.getpid()}/comm") as f:
    main = f.read().strip()
  for tid in os.listdir("/proc/self/task"):
    try:
      with open(f"/proc/self/task/{tid}/stat") as f:
        stat = f.read()
      with open(f"/proc/self/task/{tid}/comm") as f:
        name = f.read().strip()
    except OSError:   # the thread ended meanwhile
      continue
    fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) "
    group = "python" if name == main else next(
        (g for prefix, g in THREAD_GROUPS if name.startswith(prefix)), "other")
    out[tid] = (group, (int(fields[11]) + int(fields[12])) / tick)
  return out


def thread_cpu_delta(before: dict, after: dict) -> dict[str, float]:
  """CPU seconds by group between two `thread_cpu_seconds` snapshots, over the threads
  alive at `after` (a thread that ended in between took its time with it: compare around
  work done by long-lived threads, e.g. thread pools)."""
  out: dict[str, float] = {}
  for tid, (group, sec) in after.items():
    out[group] = out.get(group, 0.0) + sec - before.get(tid, (group, 0.0))[1]
  return out


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
