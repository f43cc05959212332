"""`W/events.jsonl`: every decision of the elastic supervisor, one JSON object per line.

Each line has `time` (unix seconds), `event` (name) and the event's details, e.g.

  {"time": 1718000000.1, "event": "worker_exit", "generation": 0, "process": 1,
   "returncode": -9, "signal": "SIGKILL", "last_step": 37, "lost": true,
   "error": "killed by SIGKILL", "last_log_line": "step 37: loss=0.1342"}

See `EVENTS` for the names and docs/elastic.md, "Reading `W/events.jsonl`", for how to read them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from jaxrec import jsonl

EVENTS_FILE = "events.jsonl"

# Event names, in the order a run usually meets them.
EVENTS = {
    "start": "supervisor started: its flags and pid (a capacity file follows as `capacity`)",
    "supervisor_died": "the previous supervisor on this workdir ended without `give_up` or "
                       "`finished` (a second Ctrl-C or SIGTERM, kill -9, the OOM killer, its "
                       "machine went down): what it did last; this one resumes from the "
                       "latest checkpoint",
    "plan": "mesh and plan chosen for a generation (planner estimate, reason)",
    "launch": "workers of a generation started (pids, coordinator, command)",
    "warning": "a worker's first report of a warning for the user (also on the launcher's "
               "stderr)",
    "initialized": "a worker joined the distributed runtime",
    "restore": "a generation's workers started from a checkpoint step (0: fresh)",
    "resume": "first step done on a new mesh; seconds since the failure and breakdown",
    "recovery_failed": "a restarted generation ended before every worker finished a step",
    "worker_exit": "a worker ended (return code / signal; lost: its slot is gone; error: "
                   "the signal, or for an exit code the last log line)",
    "port_in_use": "process 0 could not host the coordinator: its port was taken",
    "hang": "a worker made no progress for --hang_timeout seconds (treated as dead)",
    "capacity": "available processes / devices changed (capacity file, lost or returned slot)",
    "stop": "the supervisor stopped a generation's workers (reason, seconds)",
    "replan": "new mesh and plan for the new capacity",
    "scale_up": "more capacity than in use: grow (after a clean stop)",
    "scale_down": "less capacity than in use: shrink",
    "rescale": "as many devices as in use, in other processes (e.g. 2 x 4 -> 1 x 8)",
    "straggler": "a process or shard persistently slower than the others",
    "sigterm": "a worker got SIGTERM from outside: its generation saves and stops, its slot "
               "is lost",
    "terminate": "the launcher got SIGTERM (or SIGHUP: `signal`) with steps trained since "
                 "the latest checkpoint: the workers save at their next check step (or cut "
                 "an eval) and exit, then the job stops (exit 143; 129 for SIGHUP); a second "
                 "signal kills them at once",
    "wait": "below --min_processes until lost or sitting-out slots return (--rejoin_after, "
            "a straggler's cool-down): the supervisor waits for them",
    "finished": "every worker ended normally at the last step",
    "give_up": "the supervisor stops: below --min_processes, no usable mesh, --max_restarts, "
               "user error, SIGINT / SIGTERM",
}


class EventLog:
  """Appends events to `W/events.jsonl` (thread-safe; one flushed line per event)."""

  def __init__(self, workdir: str, echo=None):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, EVENTS_FILE)
    self._lock = threading.Lock()
    self._echo = echo

  def repair_tail(self) -> None:
    """Drops a killed supervisor's torn last line. Only under the workdir's launch lock:
    a line the running supervisor is still writing looks torn too."""
    jsonl.repair_tail(self.path)

  def emit_now(self, event: str, **details: Any) -> bool:
    """`emit` without echo, from a signal handler: False, nothing written, when the
    interrupted code holds the lock (mid-`emit`: waiting would deadlock)."""
    if not self._lock.acquire(blocking=False):
      return False
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps({"time": round(time.time(), 3), "event": event, **details},
                           default=_default) + "\n")
      return True
    finally:
      self._lock.release()

  def emit(self, event: str, **details: Any) -> dict:
    record = {"time": round(time.time(), 3), "event": event, **details}
    line = json.dumps(record, sort_keys=False, default=_default)
    with self._lock, open(self.path, "a") as f:
      f.write(line + "\n")
    if self._echo is not None:
      self._echo(record)
    return record


def give_up_text(message: str, checkpoint: int | None, checkpoint_dir: str,
                 fix: str | None = None) -> str:
  """The `give_up` message: why, then what to do. A user error (`fix`: what to change) is not
  resumed by the same command, which stops the same way until the input is fixed."""
  if fix is not None:
    where = (f", then run again to resume from the latest checkpoint, step {checkpoint} in "
             f"{checkpoint_dir}" if checkpoint is not None else "")
    return f"{message}. Stopping; {fix}{where}."
  if checkpoint is None:
    return f"{message}. Stopping; no checkpoint was saved in {checkpoint_dir}."
  return (f"{message}. Stopping; the latest checkpoint is step {checkpoint} in "
          f"{checkpoint_dir} (run the same command again to resume).")


def unfinished_run(events: list[dict]) -> dict | None:
  """The previous supervisor's run in `events` (oldest first) when it ended without a word:
  its last `start` has no `give_up` or `finished` after it (a second signal exits at once,
  SIGKILL, the OOM killer, a machine that went down; its workers die with it,
  `worker.die_with_supervisor`). Returns `pid` (None from runs before `start` recorded it),
  `started`, `last_event`, `last_event_time` and `generation` (of its last `launch`, None
  if none started); None after a clean end or without a previous run."""
  starts = [i for i, e in enumerate(events) if e.get("event") == "start"]
  if not starts:
    return None
  run = events[starts[-1]:]
  if any(e.get("event") in ("give_up", "finished") for e in run):
    return None
  launches = [e.get("generation") for e in run if e.get("event") == "launch"]
  return {"pid": run[0].get("pid"), "started": run[0].get("time"),
          "last_event": run[-1].get("event"), "last_event_time": run[-1].get("time"),
          "generation": launches[-1] if launches else None}


def _default(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  return str(x)


def read_events(workdir: str) -> list[dict]:
  """Events of `workdir` (or of an events file), oldest first; a torn last line is skipped."""
  path = workdir if os.path.isfile(workdir) else os.path.join(workdir, EVENTS_FILE)
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out
