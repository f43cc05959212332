"""`--plan`: a forced kind for every table, or `auto` (the planner)."""

from __future__ import annotations

from typing import Mapping

from jaxrec.sharding.plan import KINDS, Plan, uniform_plan
from jaxrec.errors import ConfigError


def choose(config, options, mesh_shape: Mapping[str, int]) -> tuple[Plan, str]:
  """Returns the plan and a human-readable report of why."""
  if options.plan != "auto":
    if options.plan not in KINDS:
      raise ConfigError(f"--plan: unknown plan '{options.plan}' (known: auto, {', '.join(KINDS)})")
    plan = uniform_plan(options.plan, config.tables, mesh_shape.get("table", 1))
    return plan, f"plan forced by --plan={options.plan}"
  from jaxrec import planner  # pylint: disable=import-outside-toplevel
  result = planner.propose_plan(
      config.tables, config.features, dict(mesh_shape),
      memory_per_device_bytes=options.memory_per_device,
      optimizer=config.sparse_tx(), batch_size=config.batch_size)
  return result.plan, result.report()
