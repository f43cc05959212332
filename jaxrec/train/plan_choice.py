"""`--plan`: a forced kind for every table, or `auto` (the planner); offload-aware."""

from __future__ import annotations

from typing import Mapping


def choose(config, options, mesh_shape: Mapping[str, int], processes: int = 1,
           recorded=None, device_only: bool = False):
  """Returns `offload.choose_plan`'s `(plan, PlanResult, tables, OffloadConfig)`: the plan,
  the planner's result (its `report()` says why), the tables the collection is built on
  and the offloaded ones.

  A forced plan is checked against `--memory_per_device` and estimated like an automatic
  one. Tables offloaded by gin `OffloadConfig` are planned as their device caches
  (see `jaxrec.offload.choose_plan`, which the trainer calls directly); offloading needs
  a job of one process (`processes`). `recorded`: a resumed checkpoint's
  `mesh_choice.Recorded`, whose plan is checked instead of `options.plan`
  (`train.mesh_choice.resumed`). `device_only`: plan without offloading by
  `OffloadConfig.auto` (`mesh_choice.auto_mesh` tries every mesh so first).
  """
  from jaxrec import offload  # pylint: disable=import-outside-toplevel
  return offload.choose_plan(config, options, mesh_shape, offload.OffloadConfig(),
                             processes=processes, may_auto_offload=not device_only,
                             **recorded_args(recorded))


def recorded_args(recorded) -> dict:
  """`offload.choose_plan`'s `recorded` and `recorded_offload` for a resumed checkpoint's
  `mesh_choice.Recorded` (or None): its plan, and the tables it offloaded."""
  if recorded is None:
    return {}
  return {"recorded": recorded.plan, "recorded_offload": recorded.offloaded}
