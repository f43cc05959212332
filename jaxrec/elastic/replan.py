"""Re-planning for a new capacity: which processes to use, the mesh and the plan.

The supervisor keeps the user's `scripts/train.py` flags and replaces `--mesh` and
`--plan` for each generation. The mesh for a device count keeps the model-parallel axes
(`table`, `row`, `col`) of the user's `--mesh` when they still divide it and changes
`data`; otherwise it takes the factorisation of the count closest to the user's shape
(`sharding.mesh.candidate_meshes`). The user's shape, not the previous generation's, is
the reference, so a run that shrinks and grows back returns to it. `--mesh=auto` picks as
the trainer does (`train.mesh_choice.first_fitting` over `mesh.auto_mesh_candidates`): a
`--plan` file's recorded mesh, or the closest that takes the plan; for `--plan=auto`,
`data=N` (or `table=N` when priced at least 2x faster) or, when the tables do not fit it,
the other meshes priced (`mesh_choice.auto_mesh`);
`--mesh=auto --plan=auto`
resuming a checkpoint that records its plan and mesh takes those when the device count
matches (`train.mesh_choice.resumed`; the workers then get `--mesh=auto --plan=auto` and
resume them likewise). A candidate is used when the batch sizes divide its device count
and the planner (`plan_choice.choose`: `--plan=auto` proposes, a forced kind is checked)
accepts it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from jaxrec.errors import ConfigError
from jaxrec.elastic.train_args import TrainArgs  # noqa: F401 (re-exported)
from jaxrec.sharding.mesh import candidate_meshes  # noqa: F401 (re-exported)

AXES = ("data", "table", "row", "col")


@dataclasses.dataclass(frozen=True)
class Choice:
  """What a generation runs: processes, devices each, mesh shape and plan."""

  processes: int
  devices_per_process: int
  mesh: Mapping[str, int]
  plan: str                        # the --plan flag value (auto or a kind)
  plan_kinds: Mapping[str, int]    # placements chosen: kind -> tables
  estimated_step_time_s: float
  resumed: str = ""                # why, when it is the plan and mesh a checkpoint records
  note: str = ""                   # why a checkpoint's recorded plan and mesh were not
  offloaded: tuple[str, ...] = ()  # tables offloaded (gin OffloadConfig, or its auto)

  @property
  def worker_mesh_plan(self) -> tuple[str, str]:
    """The workers' `--mesh` and `--plan`: `auto auto` for a resumed checkpoint's plan and
    mesh (the workers' `train.mesh_choice` takes them again), else the chosen mesh."""
    return ("auto", "auto") if self.resumed else (self.mesh_flag, self.plan)

  @property
  def mesh_flag(self) -> str:
    return ",".join(f"{a}={self.mesh.get(a, 1)}" for a in AXES)

  def to_json(self) -> dict:
    return {"processes": self.processes, "devices_per_process": self.devices_per_process,
            "devices": self.processes * self.devices_per_process, "mesh": dict(self.mesh),
            "plan": self.plan, "plan_kinds": dict(self.plan_kinds),
            "estimated_step_time_s": self.estimated_step_time_s,
            **({"resumed": self.resumed} if self.resumed else {}),
            **({"note": self.note} if self.note else {}),
            **({"offloaded": list(self.offloaded)} if self.offloaded else {})}


def load_config(args: TrainArgs):
  """Parses the run's gin files and bindings; returns its `ExperimentConfig`."""
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig  # pylint: disable=import-outside-toplevel
  # --train_data/--eval_data bind over the config's values, as scripts/train.py does
  launch.parse_gin(args.get("gin_file"), args.get("gin_bindings"), overrides={
      f"ExperimentConfig.{name}": args.get(name)
      for name in ("train_data", "eval_data") if args.get(name)})
  return launch.build(ExperimentConfig)


def _options(args: TrainArgs, mesh: str, host_budget: int | None = None):
  from jaxrec.train import config as config_lib  # pylint: disable=import-outside-toplevel
  memory = config_lib.parse_bytes(args.get("memory_per_device"), "--memory_per_device")
  return config_lib.RunOptions(
      mesh=mesh, plan=str(args.get("plan", "auto")),
      memory_per_device=memory if memory is not None else host_budget)


def _host_budget(config, args: TrainArgs, processes: int, devices: int) -> int | None:
  """The budget a worker's `train.loop.setup` plans with (`budget_hint.host_budget`): with
  `--plan=auto`, no `--memory_per_device` and one process of CPU devices, the host's share,
  not the default 16 GiB. The supervisor planned with 16 GiB: it chose `data=N` for tables
  that fit 16 GiB replicated, and the worker, handed that mesh, refused it as over its host
  budget (a user error ending the job) where `scripts/train.py` alone took a splitting mesh."""
  from types import SimpleNamespace  # pylint: disable=import-outside-toplevel
  from jaxrec.kernels import platform as platform_lib  # pylint: disable=import-outside-toplevel
  from jaxrec.train import budget_hint  # pylint: disable=import-outside-toplevel
  from jaxrec.train import state as state_lib  # pylint: disable=import-outside-toplevel
  if (args.get("memory_per_device") is not None or str(args.get("plan", "auto")) != "auto"
      or processes != 1 or platform_lib.planning_backend() != "cpu"):
    return None
  dense = state_lib.dense_bytes(config, max(t.dim for t in config.tables)).total
  return budget_hint.host_budget(None, "auto", [SimpleNamespace(platform="cpu")] * devices,
                                 dense, processes)


def check_mesh_flag(spec: str, processes: int, devices_per_process: int) -> None:
  """A `--mesh` (not `auto`) must fill the full-size job: `--mesh=data=3` on 2 x 4 devices
  was silently replaced by data=8 (a shrunk job adapts the mesh; the first one does not)."""
  if spec.strip() == "auto":
    return
  from jaxrec.sharding import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  try:
    mesh_lib.parse_mesh_spec(spec, processes * devices_per_process)
  except ConfigError as e:
    raise ConfigError(f"{e} (--num_processes={processes} x "
                      f"--devices_per_process={devices_per_process})") from None


def check_plan_flags(args: TrainArgs) -> None:
  """`--plan` and `--memory_per_device` values no mesh can fix (an unknown kind, an unreadable
  plan file, a size that does not parse) failed every mesh's planning: the job stopped
  'below --min_processes' (exit 2), not with the user error (exit 1)."""
  from jaxrec.sharding.plan import check_plan_flag  # pylint: disable=import-outside-toplevel
  check_plan_flag(str(args.get("plan", "auto")))
  _options(args, "auto")   # parses --memory_per_device


def choose(config, args: TrainArgs, processes: int, devices_per_process: int,
           platform: str | None = None) -> Choice:
  """Mesh and plan for `processes x devices_per_process` devices (ConfigError if none),
  priced for workers on `platform` (`cpu`, `gpu`; default this process's backend)."""
  if platform is not None:
    from jaxrec.kernels import platform as platform_lib  # pylint: disable=import-outside-toplevel
    with platform_lib.planning_for(platform):
      return choose(config, args, processes, devices_per_process)
  from jaxrec.sharding import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from jaxrec.train import mesh_choice, plan_choice  # pylint: disable=import-outside-toplevel
  n = processes * devices_per_process
  config.validate(n)                      # batch sizes divisible by the device count
  plan = str(args.get("plan", "auto"))
  user_mesh = str(args.get("mesh", "auto"))
  host = _host_budget(config, args, processes, n)
  options = _options(args, user_mesh, host)

  def plan_for(shape, recorded=None, device_only=False):
    return plan_choice.choose(config, _options(args, mesh_lib.format_mesh(shape), host), shape,
                              processes, recorded, device_only)

  resumed, why = mesh_choice.resumed(options, n, args.workdir, plan_for)
  if resumed is not None:     # as the trainer: a resumed checkpoint's plan and mesh
    return _choice(processes, devices_per_process, resumed.mesh, plan, resumed.planned,
                   resumed.why)
  searched = ""
  if user_mesh == "auto":   # as the trainer: a plan file's mesh, or the closest that fits;
    candidates = (mesh_choice.afresh_meshes(plan, n, args.workdir) if why  # records it
                  else mesh_lib.auto_mesh_candidates(plan, n))             # could not take
    shape, planned, searched = mesh_choice.auto_mesh_of(
        config, options.memory_per_device, candidates, plan_for, plan, n, processes)
  else:                     # a shrunk job keeps the model axes of --mesh where they fit
    candidates = kept_kind_first(plan, candidate_meshes(_spec_sizes(user_mesh), n),
                                 _spec_sizes(user_mesh))
    shape, planned = mesh_choice.first_fitting(candidates, plan_for, f"--plan={plan}")
    searched = _placed_as_note(plan, shape, _spec_sizes(user_mesh))
  return dataclasses.replace(_choice(processes, devices_per_process, shape, plan, planned),
                             note=(why + searched).removeprefix("; "))


def kept_kind_first(plan: str, candidates: list[dict[str, int]], user: Mapping[str, int]
                    ) -> list[dict[str, int]]:
  """`candidates` (closest to `--mesh`, `user`, first) reordered, for a forced kind, by how
  many of its axes over 1 each keeps, up to as many as `user` has (stable; more than the
  user's mesh is no better: `--mesh=data=8 --plan=cw` keeps `data=8`):
  `--mesh=data=2,table=2,row=2 --plan=twrw` shrunk to 5 devices took the closest, `data=5`,
  where every table is held whole on every device (placed as `dp`), over `row=5` or
  `table=5`, which keep them split."""
  from jaxrec.sharding.plan import KIND_AXES  # pylint: disable=import-outside-toplevel
  if plan not in KIND_AXES:
    return candidates

  def kept(shape):
    return sum(shape.get(a, 1) > 1 for a in KIND_AXES[plan])

  return sorted(candidates, key=lambda s: -min(kept(s), kept(user)))


def _placed_as_note(plan: str, shape: Mapping[str, int], user: Mapping[str, int]) -> str:
  """The replan event's note when a forced kind that the user's mesh places as itself is
  placed as another on `shape` (the warning saying so went only to the workers' logs)."""
  from jaxrec.sharding import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from jaxrec.sharding.plan import KIND_AXES, placed_as  # pylint: disable=import-outside-toplevel
  if plan not in KIND_AXES or math.prod(shape.values()) == 1 or placed_as(plan, user):
    return ""
  other = placed_as(plan, shape)
  if other is None:
    return ""
  return (f"; --plan={plan} is placed as {other} on {mesh_lib.format_mesh(shape)} (no mesh of "
          f"{math.prod(shape.values())} devices that fits keeps more of its axes)")


def _choice(processes: int, devices_per_process: int, shape: Mapping[str, int], plan: str,
            planned: tuple, resumed: str = "") -> Choice:
  """The Choice of `planned` (`plan_choice.choose`'s) on `shape`."""
  chosen, result, _, off = planned
  kinds: dict[str, int] = {}
  for p in chosen.placements.values():
    kinds[p.kind] = kinds.get(p.kind, 0) + 1
  return Choice(processes, devices_per_process, dict(shape), plan, kinds,
                float(result.step_time_s), resumed,
                offloaded=tuple(t.name for t in off.tables))


def _spec_sizes(spec: str) -> dict[str, int]:
  """`data=2,table=2` -> sizes (product not checked)."""
  from jaxrec.sharding import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  shape = {a: 1 for a in AXES}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, value = part.partition("=")
    if name.strip() not in AXES:
      raise ConfigError(f"--mesh: '{part}' is not AXIS=SIZE")
    shape[name.strip()] = int(value)
  mesh_lib.parse_mesh_spec(spec, math.prod(shape.values()))
  return shape


def best_choice(config, args: TrainArgs, available: int, devices_per_process: int,
                minimum: int = 1, platform: str | None = None
                ) -> tuple[Choice | None, list[str]]:
  """The largest process count in `[minimum, available]` that has a valid `choose`;
  `(None, reasons)` when none has."""
  reasons = []
  for n in range(available, max(minimum, 1) - 1, -1):
    try:
      return choose(config, args, n, devices_per_process, platform), reasons
    except ConfigError as e:
      reasons.append(f"{n} process(es): {e}")
  return None, reasons


def without_one(config, args: TrainArgs, available: int, devices_per_process: int,
                minimum: int = 1, platform: str | None = None) -> int:
  """Processes a re-plan would run with one of `available` slots set aside (a straggler's);
  0 when no count of at least `minimum` is usable. It can be the count running now (the
  config could not use every slot): then setting the slot aside changes nothing."""
  if available - 1 < max(minimum, 1):
    return 0
  choice, _ = best_choice(config, args, available - 1, devices_per_process, minimum, platform)
  return choice.processes if choice is not None else 0
