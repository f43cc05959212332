"""What the supervisor watches of each worker of a generation: its process, the progress
lines it writes (`W/workers/<p>.jsonl`, `worker.report_progress`) and whether it hangs.

Stdlib only (no jax): the launcher imports it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from typing import IO

from jaxrec.elastic import procs as proc_lib
from jaxrec.elastic import worker as worker_lib


@dataclasses.dataclass
class WorkerProc:
  """One worker process of the running generation, as the supervisor last saw it."""

  index: int
  popen: subprocess.Popen
  log: IO
  launched: float
  initialized: dict | None = None
  first: dict | None = None         # first step record
  working: bool = False             # reported work between steps (`report_alive`)
  last_step: int = 0
  last_seen: float = 0.0
  exited: int | None = None
  slot: int | None = None           # the capacity slot it runs on (default: its index)
  offset: int = 0                   # bytes of its progress file already read

  def __post_init__(self):
    if self.slot is None:
      self.slot = self.index


def progress_end(workdir: str, process: int) -> int:
  """The size of process `process`'s progress file now (0 if none): a new worker's lines
  start there (the file keeps every generation's)."""
  path = worker_lib.progress_path(workdir, process)
  return os.path.getsize(path) if os.path.exists(path) else 0


def new_records(workdir: str, p: WorkerProc, generation: int) -> list[dict]:
  """The progress records of `generation` that worker `p` completed since the last call
  (a line still being written waits for the next; a torn one is skipped)."""
  path = worker_lib.progress_path(workdir, p.index)
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    f.seek(p.offset)
    data = f.read()
  end = data.rfind(b"\n") + 1
  p.offset += end
  records = []
  for line in data[:end].decode(errors="replace").splitlines():
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(r, dict) and r.get("generation") == generation:
      records.append(r)
  return records


def hung(procs: list[WorkerProc], now: float, hang_timeout: float,
         startup_timeout: float) -> list[WorkerProc]:
  """The running workers to treat as hung, [] if none: once any made no progress for
  `hang_timeout` seconds since it started (a step done, or other work reported: a generation
  at --num_steps only evaluates; from then on any record counts), or in `startup_timeout`
  since its launch. The culprits are the workers stopped by a signal (state `T`), else
  the one furthest behind (lowest step, then longest silent): the others wait for it in
  collectives."""
  running = [p for p in procs if p.exited is None]
  stalled = False
  for p in running:
    started = p.first is not None or p.working
    limit = hang_timeout if started else startup_timeout
    since = p.last_seen if started else p.launched
    stalled = stalled or now - since > limit
  if not stalled:
    return []
  stopped = [p for p in running if proc_lib.state(p.popen.pid) in ("T", "t")]
  if stopped:
    return stopped
  low = min(p.last_step for p in running)
  return [min((p for p in running if p.last_step == low), key=lambda p: p.last_seen)]
