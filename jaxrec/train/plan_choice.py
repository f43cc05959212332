"""`--plan`: a forced kind for every table, or `auto` (the planner)."""

from __future__ import annotations

from typing import Mapping

from jaxrec import planner
from jaxrec.sharding.plan import KINDS, uniform_plan
from jaxrec.errors import ConfigError


def choose(config, options, mesh_shape: Mapping[str, int]):
  """Returns the plan and the planner's `PlanResult` (its `report()` says why).

  A forced plan is checked against `--memory_per_device` and estimated like an automatic
  one, so both print the same table.
  """
  common = dict(memory_per_device_bytes=options.memory_per_device,
                optimizer_state_factor=config.sparse_tx(), batch_size=config.batch_size)
  if options.plan != "auto":
    if options.plan not in KINDS:
      raise ConfigError(f"--plan: unknown plan '{options.plan}' (known: auto, {', '.join(KINDS)})")
    plan = uniform_plan(options.plan, config.tables, mesh_shape.get("table", 1))
    result = planner.estimate_plan(plan, config.tables, config.features, dict(mesh_shape),
                                   **common)
    return plan, result
  result = planner.propose_plan(config.tables, config.features, dict(mesh_shape), **common)
  return result.plan, result
