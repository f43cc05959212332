"""Requested stops of a generation: the stop file, the checkpoint it waits for, its deadline.

The supervisor stops a running generation without losing steps by asking: it writes
`W/elastic/stop.<generation>`, every worker sees the file at its next multiple of
`--check_every` steps (`worker.report_progress`), they save that step and exit. It asks for
a re-plan (more capacity, a rescale, a straggler, a worker's SIGTERM) and, since the
launcher's own SIGTERM became a save-then-stop, for a preemption of the whole job:
Kubernetes and Slurm send SIGTERM to the launcher and SIGKILL a grace period later, and
the first SIGTERM killed the workers at once, losing every step since the last periodic
checkpoint (a bare `scripts/train.py` saved them).

Stdlib only (no jax): the launcher imports it.
"""

from __future__ import annotations

import dataclasses
import json
import os

from jaxrec.elastic import procs as proc_lib
from jaxrec.elastic import worker as worker_lib
from jaxrec.elastic.scaling import Outcome

TERMINATING = ("SIGTERM", "SIGHUP")   # the launcher's signals that save, then end the job


def terminate_reason(signal_name: str = "SIGTERM") -> str:
  """The stop reason of the launcher's SIGTERM (or SIGHUP, taken as it)."""
  return f"supervisor got {signal_name}"


def _terminating(reason: str) -> str | None:
  """The signal of a `terminate_reason`, or None for another stop (a re-plan's)."""
  return next((s for s in TERMINATING if reason == terminate_reason(s)), None)


@dataclasses.dataclass
class StopRequest:
  """A stop asked of a generation at `requested` (seconds since the epoch), for `outcome`;
  `checkpoint_before`: the newest checkpoint then; `step`: the furthest step a worker had
  reported then; `saved`: when the stop's own checkpoint (a newer one, at a check step, not
  before `step`) was first seen."""

  outcome: Outcome
  requested: float
  checkpoint_before: int | None
  step: int = 0
  saved: float | None = None
  saved_step: int | None = None

  def overdue(self, now: float, checkpoint: int | None, check_every: int,
              stop_timeout: float, stop_grace: float, reported: int | None = None) -> bool:
    """Whether the workers are past the time they had to stop by themselves: more than
    `stop_timeout` seconds since the request, or twice `stop_grace` since the stop's
    checkpoint appeared (after saving they still close their files and leave, and the save
    may come long after the request). `checkpoint`: the newest one now. A periodic one does
    not count when it is of a step before the request's (an asynchronous save committing
    after it) or off the check steps; one of the request's step itself does (the workers
    may have seen the request at that very step), then they may get only 2 x `stop_grace`
    to reach the check step, unless `reported` (the furthest step a worker has reported
    now) shows them training past it: then it was a periodic save committing late, and
    only a checkpoint of at least `reported` is the stop's (the request's step was a
    periodic checkpoint step whose save, 40 s for 1.3 GiB of tables, committed after the
    request: the workers trained on to the next check step and were killed 2 x stop_grace
    later in the middle of the stop's own save)."""
    if self.saved_step is not None and reported is not None and reported > self.saved_step:
      self.saved = self.saved_step = None
    if (self.saved is None and checkpoint is not None and checkpoint != self.checkpoint_before
        and checkpoint >= max(self.step, reported or 0)
        and checkpoint % max(check_every, 1) == 0):
      self.saved, self.saved_step = now, checkpoint
    return now - self.requested > stop_timeout or (
        self.saved is not None and now - self.saved > 2 * stop_grace)


def request(workdir: str, generation: int, outcome: Outcome, now: float,
            step: int = 0) -> StopRequest:
  """Asks generation `generation` (its furthest reported step: `step`) to checkpoint at its
  next check step and exit; for the launcher's SIGTERM (`terminate_reason`) an eval in
  progress stops too (`preempt`)."""
  _write(workdir, generation, outcome.reason, now, _terminating(outcome.reason))
  return StopRequest(outcome, now, proc_lib.latest_checkpoint(workdir), step)


def preempt(workdir: str, generation: int, stop: StopRequest,
            signal_name: str = "SIGTERM") -> None:
  """Marks the stop in force (a re-plan's, asked before the launcher's SIGTERM, or SIGHUP:
  `signal_name`) as a preemption's: the workers stop an eval in progress too
  (`worker.stop_eval`); a re-plan lets it end, a preemption's grace period would not."""
  _write(workdir, generation, stop.outcome.reason, stop.requested, signal_name)


def _write(workdir: str, generation: int, reason: str, now: float,
           preemption: str | None) -> None:
  """The stop file, whole or not at all (a worker reads it as it is replaced);
  `preemption`: the launcher's signal when the job ends (`worker.preempted`), else None."""
  path = worker_lib.stop_path(workdir, generation)
  with open(path + ".tmp", "w") as f:
    f.write(json.dumps({"reason": reason, "time": now,
                        worker_lib.PREEMPTION: preemption or False}))
  os.replace(path + ".tmp", path)


def clear_requests(workdir: str) -> None:
  """Removes the stop files of earlier generations (a new one starts)."""
  control = os.path.join(workdir, worker_lib.CONTROL_DIR)
  for f in os.listdir(control):
    if f.startswith("stop."):
      os.remove(os.path.join(control, f))


def sigterm_text(checkpoint_at_sigterm: int | None, latest: int | None, why_not: str,
                 signal_name: str = "SIGTERM") -> str:
  """The launcher's `give_up` message after its SIGTERM (or SIGHUP, `signal_name`): the
  workers saved a newer checkpoint, or `why_not` they did not."""
  if latest is not None and latest != checkpoint_at_sigterm:
    return f"stopped by {signal_name} after the workers saved step {latest}"
  return f"interrupted by {signal_name} ({why_not})"
