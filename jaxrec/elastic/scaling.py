"""The supervisor's capacity decisions: how many processes it may use now (capacity file,
lost slots returning, stragglers sitting out), the plan for them, and when a running
generation should stop to re-plan (`Scaling`, a part of `supervisor.Supervisor`)."""

from __future__ import annotations

import dataclasses
import time

from jaxrec import signals
from jaxrec.elastic import replan


@dataclasses.dataclass
class Outcome:
  """How a generation ended (or should end): `kind` is finished | failure | planned |
  user_error | port_in_use (process 0 found the coordinator's port taken)."""
  kind: str
  reason: str
  lost: int = 0
  detected: float = 0.0
  message: str = ""   # a user error's text; a failure's with the worker's error (`worker 0
  slots: tuple[int, ...] = ()   # exited 1 without output`); the slots of the `lost` workers

  def failure_text(self) -> str:
    """A failure for a give-up message: the worker's error where there is one (--quiet
    hides the `worker_exit` event that says it), else `reason` (`worker 1 hung`)."""
    return self.message or self.reason


class Scaling:
  """Capacity and re-planning methods of `Supervisor` (they use its `o` options, `capacity`,
  `lost`, `quarantine`, `events`, `config`, `args`, `choice` and `detectors`)."""

  # ---------------------------------------------------------------------------- capacity
  def _available(self) -> int:
    return len(self._free_slots())

  def _free_slots(self) -> list[int]:
    """The slots (`0..N-1` of the capacity's N; on GPUs slot `s` holds devices `s*K` to
    `s*K+K-1`) neither lost nor sitting out, after returning those whose time is up. A
    generation runs its processes on the first of them (`Supervisor._launch`), so a lost
    or slow slot is not used again until it returns: counting them was not enough, as
    every generation started on slots `0..n-1` and a straggler on slot 0 stayed."""
    now = time.time()
    if self.o.rejoin_after > 0:
      back = sorted(s for s, t in self.lost.items() if now - t >= self.o.rejoin_after)
      if back:
        self.lost = {s: t for s, t in self.lost.items() if s not in back}
        self.events.emit("capacity", source="rejoin", returned=len(back), slots=back,
                         available=len(self._usable_slots()))
    over = sorted(s for s, t in self.quarantine.items() if now >= t)
    if over:
      self.quarantine = {s: t for s, t in self.quarantine.items() if s not in over}
      self.events.emit("capacity", source="straggler_cooldown_over", returned=len(over),
                       slots=over)
    return self._usable_slots()

  def _usable_slots(self) -> list[int]:
    return [s for s in range(self.capacity[0]) if s not in self.lost and s not in
            self.quarantine]

  def _read_capacity(self, initial: bool = False) -> bool:
    """Takes the capacity file's new statement, if any (it returns the lost slots); True
    if there was one."""
    new = self.capacity_reader.read(self.capacity[1], initial=initial)
    if new is None:
      return False
    old, self.capacity, self.lost = self.capacity, new, {}
    self.events.emit("capacity", source="file", num_processes=new[0],
                     devices_per_process=new[1], previous=list(old), initial=initial)
    return True

  def _capacity_fix(self) -> str | None:
    """What to change when the capacity file alone (read again by the same command) leaves
    no usable job; None when the flags' capacity, or the file's without lost slots, has one."""
    n, k = self.capacity
    if (n, k) == (self.o.num_processes, self.o.devices_per_process) or replan.best_choice(
        self.config, self.args, n, k, self.o.min_processes, self.o.platform)[0] is not None:
      return None
    return f"change {self.capacity_file} (it states {n} x {k}: no usable job) or remove it"

  def _plan(self, first: bool = False) -> tuple[replan.Choice | None, str, str]:
    """The largest usable process count, or `(None, why, give_up reason)`: `below_min`, or
    `no_usable_mesh` when enough processes are available but no mesh of them takes the
    config. The supervisor's first plan
    on the flags' capacity tries only those processes: a configuration that no mesh of them
    takes (e.g. a batch size the devices do not divide) was run silently on fewer
    processes, ignoring --num_processes (then `_first_plan_failed` is set). A capacity
    file's count is an upper bound, at start as later."""
    if not first:   # a rewrite made while the last generation stopped: planned on now (it
      self._read_capacity()   # was read only after the next launch, which then stopped)
    self._planned_on = self._capacity_key()
    available, k = len(self._planned_on[0]), self.capacity[1]
    first = first and (available, k) == (self.o.num_processes, self.o.devices_per_process)
    minimum = max(available, self.o.min_processes) if first else self.o.min_processes
    choice, reasons = replan.best_choice(self.config, self.args, available, k,
                                         minimum, self.o.platform)
    if choice is None and first and reasons:
      self._first_plan_failed = True
      return None, reasons[0], "user_error"
    if choice is None and available >= self.o.min_processes:
      # (each reason starts with its own count: `1 process(es): 1 process(es): ...` read
      # as one reason twice)
      return (None, "no usable mesh: " + "; ".join(reasons[:2]), "no_usable_mesh")
    if choice is None:
      failed = f"; the last failure: {self._last_failure}" if self._last_failure else ""
      return None, (f"only {available} process(es) x {k} device(s) available, below "
                    f"--min_processes={self.o.min_processes}{self._rejoin_hint()}{failed}"
                    ), "below_min"
    return choice, "", ""

  def _rejoin_hint(self) -> str:
    """Why lost slots stay lost, when no --rejoin_after returns them: a one-process job
    (the only one offloaded tables run in) stopped at its worker's first crash, though
    --max_restarts allows 10, and the message did not name the flag that restarts it."""
    lost = sorted(s for s in self.lost if s < self.capacity[0])
    if not lost or self.o.rejoin_after > 0:
      return ""
    return (f" (lost slot(s) {lost} never come back without --rejoin_after=S, which offers "
            "a lost slot again after S seconds, e.g. to restart a crashed worker where it ran)")

  def _wait_for_returns(self, why: str) -> bool:
    """Below --min_processes with slots that come back at known times (`--rejoin_after`,
    a straggler's cool-down): waits until enough have (a `wait` event says how long) and
    returns True, for the caller to plan again; False when they would not be enough. A
    capacity rewrite ends the wait early. Before, a job whose one worker got a SIGTERM
    gave up at once, though its slot was due back."""
    due = []   # when each slot of the capacity that is out now is back: both reasons over
    for s in range(self.capacity[0]):
      if s in self.lost and self.o.rejoin_after <= 0:
        continue                        # lost for good
      times = [self.lost[s] + self.o.rejoin_after] if s in self.lost else []
      times += [self.quarantine[s]] if s in self.quarantine else []
      if times:
        due.append(max(times))
    short = self.o.min_processes - len(self._usable_slots())
    if short <= 0 or short > len(due):
      return False
    until = sorted(due)[short - 1]
    n = self.capacity[0]
    self.events.emit("wait", reason=why, seconds=round(max(until - time.time(), 0), 3),
                     lost=sorted(s for s in self.lost if s < n),
                     sitting_out=sorted(s for s in self.quarantine if s < n))
    while time.time() < until + 0.01:   # past it: `_free_slots` returns them
      signals.check()
      if self._read_capacity():
        break
      time.sleep(min(self.o.poll_interval, max(until - time.time(), 0)))
    return True

  def _capacity_key(self) -> tuple:
    """What a plan depends on: the usable slots (after returns) and devices per slot."""
    return tuple(self._free_slots()), self.capacity[1]

  def _check_capacity(self, now: float) -> Outcome | None:
    """A stop to re-plan when the usable slots changed since the plan: another process
    count, or the same count on slots of which one is no longer usable (a capacity file
    shrunk below a running slot: it ran on as if the file still listed it)."""
    self._read_capacity()
    key = self._capacity_key()
    if key == self._capacity_seen:       # nothing changed since the last look
      return None
    self._capacity_seen = key
    usable = key[0]
    target, reasons = replan.best_choice(self.config, self.args, len(usable),
                                         self.capacity[1], self.o.min_processes,
                                         self.o.platform)
    if target is None:
      return self._no_usable_job(len(usable), now)
    new = (target.processes, target.devices_per_process)
    gone = sorted(set(self.slots) - set(usable))
    if new == (self.choice.processes, self.choice.devices_per_process) and not gone:
      if reasons:   # more capacity than the job can use: the file's change was seen
        self.events.emit("capacity", source="plan", generation=self.generation,
                         available=len(usable), running=list(new),
                         note=f"the job stays on {new[0]} process(es): {reasons[0]}")
      return None
    extra = {"note": f"slot(s) {gone} no longer in the capacity"} if gone else {}
    return Outcome("planned", self._emit_scale(new, len(usable), **extra), detected=now)

  def _no_usable_job(self, available: int, now: float) -> Outcome:
    """The capacity runs no job of --min_processes or more: the event, then the stop."""
    below = available < self.o.min_processes
    why = (f"below --min_processes={self.o.min_processes}" if below else
           f"no usable mesh for {self.o.min_processes} to {available} process(es) x "
           f"{self.capacity[1]} device(s)")
    self._emit_scale((available, self.capacity[1]), available,
                     note=f"{why}: the workers stop")
    return Outcome("planned", "capacity below minimum" if below else
                    "no usable job on the capacity", detected=now)

  def _emit_scale(self, target: tuple, available: int, **extra) -> str:
    """`scale_up` / `scale_down` (more / fewer devices than run; `rescale`: as many, in
    other processes) to `target`; its name."""
    cur = (self.choice.processes, self.choice.devices_per_process)
    kind = ("scale_up" if target[0] * target[1] > cur[0] * cur[1] else
            "scale_down" if target[0] * target[1] < cur[0] * cur[1] else "rescale")
    self.events.emit(kind, generation=self.generation, current=list(cur), target=list(target),
                     available=available, **extra)
    return kind

  def _check_stragglers(self, now: float) -> Outcome | None:
    found = [s for d in self.detectors for s in d.poll()]
    out = None
    for s in found:
      proc, note = int(s.entity.split("/")[0]), {}
      if self.o.replan_on_straggler and out is not None:
        note["note"] = f"the job is already re-planning for {out.reason}"
      act = self.o.replan_on_straggler and out is None and self._fewer_without_one(note)
      self.events.emit("straggler", generation=self.generation, **s.to_json(),
                       threshold=self.o.straggler_threshold, process=proc,
                       slot=self.slots[proc],
                       action="replan without it" if act else "report", **note)
      if act:
        self.quarantine[self.slots[proc]] = now + self.o.straggler_cooldown
        out = Outcome("planned", f"straggler {s.kind} {s.entity}", detected=now)
    return out

  def _fewer_without_one(self, note: dict) -> bool:
    """True when setting one slot aside runs fewer processes; else says why not in `note`."""
    running = self.choice.processes
    n = replan.without_one(self.config, self.args, self._available(), self.capacity[1],
                           self.o.min_processes, self.o.platform)
    if 0 < n < running:
      return True
    note["note"] = (f"without its slot the job would run {n} process(es), not fewer" if n else
                    "without its slot no job of --min_processes="
                    f"{self.o.min_processes} or more process(es) is usable")
    return False
