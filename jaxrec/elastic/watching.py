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
  inode: int | None = None          # of that file (a new one: the worker rotated it)

  def __post_init__(self):
    if self.slot is None:
      self.slot = self.index


def progress_end(workdir: str, process: int) -> tuple[int, int | None]:
  """The size and inode of process `process`'s progress file now (0, None if none): a new
  worker's lines start there (the file keeps every generation's)."""
  try:
    st = os.stat(worker_lib.progress_path(workdir, process))
  except FileNotFoundError:
    return 0, None
  return st.st_size, st.st_ino


def new_records(workdir: str, p: WorkerProc, generation: int) -> list[dict]:
  """The progress records of `generation` that worker `p` completed since the last call
  (a line still being written waits for the next; a torn one is skipped). When the worker
  rotated its file since (`worker.rotated_path`), the rest of the old one comes first."""
  path = worker_lib.progress_path(workdir, p.index)
  try:
    f = open(path, "rb")   # first: a rotation after it leaves this one readable
  except FileNotFoundError:
    return []
  with f:
    inode, data = os.fstat(f.fileno()).st_ino, b""
    if p.inode is not None and inode != p.inode:
      data, p.offset = _rest_of_rotated(path, p), 0
    p.inode = inode
    f.seek(p.offset)
    fresh = f.read()
  end = fresh.rfind(b"\n") + 1
  p.offset += end
  data += fresh[:end]
  records = []
  for line in data.decode(errors="replace").splitlines():
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(r, dict) and r.get("generation") == generation:
      records.append(r)
  return records


def _rest_of_rotated(path: str, p: WorkerProc) -> bytes:
  """What the worker wrote past `p.offset` into the file it has since rotated (ending in
  a newline; b"" when that file is gone or was rotated away again)."""
  try:
    with open(worker_lib.rotated_path(path), "rb") as f:
      if os.fstat(f.fileno()).st_ino != p.inode:
        return b""
      f.seek(p.offset)
      data = f.read()
  except FileNotFoundError:
    return b""
  return data if not data or data.endswith(b"\n") else data + b"\n"


def hung(procs: list[WorkerProc], now: float, hang_timeout: float,
         startup_timeout: float) -> list[WorkerProc]:
  """The running workers to treat as hung, [] if none: once any made no progress for
  `hang_timeout` seconds since it started (a step done, or other work reported: a generation
  at --num_steps only evaluates; from then on any record counts), or in `startup_timeout`
  since its launch. The culprits are the workers stopped by a signal (state `T`), else
  the one furthest behind (lowest step, then longest silent: before any step, one that
  never wrote its `joining` record is the one the others wait for in
  `jax.distributed.initialize`): the others wait for it in collectives."""
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
