"""jaxrec.elastic: multi-process training that survives workers and devices coming and going.

  worker      the worker side: `initialize_from_env` (jax.distributed from the supervisor's
              variables), `report_progress` (step timings, stop requests),
              `report_alive` (working between steps: eval, save), `stop_eval` (a
              preemption stops an eval), `report_warning` (a warning the supervisor prints)
  options     the supervisor's settings (`scripts/launch.py` flags), checked
  supervisor  starts and watches the workers; on failure, hang, capacity change or a
              straggler: stop, re-plan, restart from the latest checkpoint
  stopping    requested stops (the stop file, its checkpoint, its deadline), also on the
              launcher's SIGTERM: save at the next check step, then stop
  scaling     the supervisor's capacity decisions: processes available, plan, re-plan
  capacity    the capacity file (`N`, `N K` or JSON), read strictly
  replan      processes, mesh and plan for a capacity (the planner decides the plan)
  recovery    a restart's timings: `resume` (breakdown) or `recovery_failed`
  procs       process plumbing: ports, signals, states, worker logs, latest checkpoint
  stragglers  slow process / hot shard detection over step-time windows
  events      `W/events.jsonl`, one JSON object per decision

Workers only import `worker` (no supervisor machinery).
"""

from jaxrec.elastic.worker import (check_not_launched, got_sigterm, initialize_from_env,
                                   is_supervised, preempted, probe_local_devices,
                                   report_alive, report_progress, report_warning, stop_eval)

__all__ = ["check_not_launched", "initialize_from_env", "is_supervised",
           "probe_local_devices", "report_alive", "report_progress", "report_warning",
           "got_sigterm", "stop_eval", "preempted"]
