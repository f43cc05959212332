"""A restart in progress: from a failure's detection (or a requested stop) to the first
step of every worker of the new generation (`resume`). A generation that ends before
that reports `recovery_failed`, and the next attempt counts on."""

from __future__ import annotations

from typing import Sequence


def begin(detected: float, reason: str, now: float, pending: dict | None = None) -> dict:
  """A recovery from `reason` detected at `detected`; `pending`: the one the stopped
  generation had not finished (this is then its next attempt)."""
  return {"detected": detected, "reason": reason, "stop_s": now - detected,
          "attempt": (pending or {}).get("attempt", 0) + 1}


def failed(rec: dict, ended_by: str, now: float) -> dict | None:
  """`recovery_failed` details: what the generation was recovering from, which attempt,
  and what ended it before every worker finished a step; None when `rec`'s failure was
  already reported (SIGINT/SIGTERM while the supervisor stops that generation)."""
  if rec.get("failed"):
    return None
  rec["failed"] = True
  return {"reason": rec["reason"], "attempt": rec["attempt"], "ended_by": ended_by,
          "seconds_since_detection": round(now - rec["detected"], 3)}


def resumed(rec: dict, procs: Sequence) -> dict:
  """`resume` details once every worker of `procs` (`watching.WorkerProc`s) reported
  its first step: seconds since the detection and their breakdown."""
  done = max(q.first["time"] for q in procs)
  launch = min(q.launched for q in procs)
  init = [q.initialized["time"] for q in procs if q.initialized]
  compile_s = max(float(q.first["step_time_s"]) for q in procs)
  initialized = max(init) if init else launch
  breakdown = {
      "stop_s": rec["stop_s"], "replan_s": rec.get("replan_s", 0.0),
      "restart_s": initialized - launch,                    # spawn, imports, join
      "restore_s": max(done - compile_s - initialized, 0.0),  # setup, state, restore
      "compile_s": compile_s}                               # first step (compiles)
  return {"reason": rec["reason"], "attempt": rec["attempt"],
          "step": min(int(q.first["step"]) for q in procs),
          "seconds_since_detection": round(done - rec["detected"], 3),
          "detected_at": rec["detected"], "first_step_at": done,
          "breakdown": {k: round(v, 3) for k, v in breakdown.items()}}
