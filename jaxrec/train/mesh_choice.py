"""How a run picks its mesh and plan from `--mesh` and `--plan`: `scripts/train.py`
(`loop.setup`) and, for each generation, the elastic supervisor (`elastic.replan.choose`).

- `--mesh=SPEC`: that mesh (the supervisor adapts it to other device counts).
- `--mesh=auto`: the meshes `mesh.auto_mesh_candidates` lists, the first the plan fits: a
  plan file's recorded mesh when it has the devices, else the shapes closest to it; for
  `--plan=auto`, `data=N` (or `table=N` / `col=N` when the planner prices it
  `SPLIT_SPEEDUP` times faster), and when the tables do not fit it, the other meshes
  priced by the planner (`auto_mesh`), before `OffloadConfig.auto` offloads anything.
- `--mesh=auto --plan=auto` resuming a checkpoint that records its plan and mesh (a run's
  own save, or a `convert_checkpoint.py --format=checkpoint --mesh --plan` copy): that
  plan on that mesh when this run has as many devices; otherwise the planner as above, on
  the recorded mesh first when it has the devices (`afresh_meshes`).
  An explicit `--mesh` or `--plan` always wins.

`Choice.why` says which and why, for the run's log line.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Any, Callable, Mapping, Sequence

from jaxrec.errors import BudgetError, ConfigError
from jaxrec.sharding import mesh as mesh_lib
from jaxrec.sharding.plan import (Plan, is_plan_file, mesh_warning_held, recorded_mesh,
                                  stored_mesh, warn_once)
from jaxrec.train import plan_choice

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Recorded:
  """The plan and mesh a checkpoint step records (manifest `saved_plan`, `saved_mesh`), and
  the tables `OffloadConfig.auto` offloaded in it (meta `offload`; None when not known: a
  meta that does not read, or one from before the meta said which offloaded tables auto
  chose)."""

  plan: Plan
  mesh: dict[str, int]
  step_dir: str
  offloaded: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Choice:
  """The mesh shape, what `offload.choose_plan` returned for it, and why this mesh."""

  mesh: dict[str, int]
  planned: tuple        # (plan, PlanResult, tables, OffloadConfig)
  why: str


def recorded(workdir: str | None) -> Recorded | None:
  """What the newest checkpoint in `W/checkpoints` records (the one a restore tries
  first); None without one, for one that records no plan (a TorchRec import) and, with a
  warning (once per process: the elastic supervisor asks per generation and process
  count), for one whose records do not read (the restore then names its fault)."""
  from jaxrec.checkpoint import storage   # pylint: disable=import-outside-toplevel
  from jaxrec.train import data_adapter   # pylint: disable=import-outside-toplevel
  step = data_adapter.newest_saved_step(workdir) if workdir else None
  if step is None:
    return None
  step_dir = os.path.join(data_adapter.checkpoint_dir(workdir), str(step))
  try:
    manifest = storage.read_json(step_dir, storage.MANIFEST)
    if "saved_plan" not in manifest:
      return None
    plan, mesh = Plan.from_json(manifest["saved_plan"]), stored_mesh(manifest.get("saved_mesh"))
    if mesh is None:
      raise ValueError(f"saved_mesh {manifest.get('saved_mesh')!r} is not a mesh shape")
  except (OSError, ValueError, TypeError, AttributeError, ConfigError) as e:
    warn_once(f"checkpoint {step_dir}: its recorded plan and mesh do not read ({e}); "
              "--mesh=auto --plan=auto plans afresh", log)
    return None
  try:   # the restore names a meta that does not read
    tables = (storage.read_json(step_dir, storage.META).get("offload") or {}).get("tables")
    tables = tables or {}
    offloaded = (tuple(sorted(n for n, t in tables.items() if t["auto"]))
                 if all("auto" in t for t in tables.values()) else None)
  except (OSError, ValueError, TypeError, AttributeError, KeyError):
    offloaded = None
  return Recorded(plan, mesh, step_dir, offloaded)


def first_fitting(shapes: Sequence[Mapping[str, int]], plan_for: Callable[[dict], Any],
                  what: str) -> tuple[dict[str, int], Any]:
  """The first of `shapes` for which `plan_for(shape)` raises no ConfigError, and its
  value. With one shape, or when every shape fails with the same error (one that is not
  about the mesh), that error is raised as it is; otherwise a ConfigError (a BudgetError
  when each was over budget) naming `what` and the first three meshes tried, each with
  its reason. A plan file's other-mesh warning
  is logged for the shape taken only (`plan.mesh_warning_held`)."""
  errors = []
  with mesh_warning_held() as chosen:
    for shape in shapes:
      try:
        planned = plan_for(dict(shape))
      except ConfigError as e:
        if len(shapes) == 1:
          raise
        errors.append((shape, e))
        continue
      chosen(shape)
      return dict(shape), planned
  if errors and len({str(e) for _, e in errors}) == 1:   # not the mesh's fault (a table
    raise errors[0][1]                                  # the plan file names, ...): once
  n = math.prod(shapes[0].values()) if shapes else 0
  over = errors and all(isinstance(e, BudgetError) for _, e in errors)
  raise (BudgetError if over else ConfigError)(
      f"no mesh of {n} devices fits {what}: " + "; ".join(
          f"{mesh_lib.format_mesh(shape)}: {e}" for shape, e in errors[:3]))


def resumed(options, num_devices: int, workdir: str | None,
            plan_for: Callable[[dict, Recorded], Any]) -> tuple[Choice | None, str]:
  """`--mesh=auto --plan=auto` resuming: the Choice of the plan and mesh the newest
  checkpoint records, when this run has that many devices and `plan_for(mesh, recorded)`
  accepts the plan; else `(None, why)`, `why` (a log suffix) saying why not, or empty when
  there is nothing to resume (other flags, no checkpoint, no records). `scripts/train.py`
  (`choose`) and `scripts/launch.py` (`elastic.replan.choose`) both decide here."""
  saved = recorded(workdir) if (options.mesh, options.plan) == ("auto", "auto") else None
  if saved is None:
    return None, ""
  devices = math.prod(saved.mesh.values())
  if devices != num_devices:
    return None, (f"; checkpoint {saved.step_dir} records mesh "
                  f"{mesh_lib.format_mesh(saved.mesh)} ({devices} devices), this run has "
                  f"{num_devices}: planned afresh")
  try:
    planned = plan_for(saved.mesh, saved)
  except ConfigError as e:
    return None, f"; the plan checkpoint {saved.step_dir} records does not fit here ({e})"
  return Choice(saved.mesh, planned,
                f"the plan and mesh checkpoint {saved.step_dir} records: --mesh=auto "
                "--plan=auto resumes them (give --mesh or --plan to choose others)"), ""


def afresh_meshes(plan: str, num_devices: int, workdir: str | None) -> list[dict[str, int]]:
  """Meshes `--mesh=auto` plans afresh on, first to last, after `resumed` could not take a
  checkpoint's records: the recorded mesh when it has this run's devices (its plan no
  longer fits, e.g. at a lower --memory_per_device: a fresh plan on it may), then
  `auto_mesh_candidates`; past them `auto_mesh` prices the rest as a fresh run does. (The
  four shapes closest to the recorded mesh came next, first fit taken: a run shrunk and
  grown back, or resumed at a lower budget, ran a slower mesh than a fresh run's.)"""
  auto = mesh_lib.auto_mesh_candidates(plan, num_devices)
  saved = recorded(workdir)
  if saved is None or math.prod(saved.mesh.values()) != num_devices or saved.mesh in auto:
    return auto
  return [dict(saved.mesh)] + auto


def choose(config, options, num_devices: int, processes: int = 1,
           workdir: str | None = None) -> Choice:
  """Mesh and plan for a run of `num_devices` devices (module docstring); ConfigError when
  none fits."""

  def plan_for(shape, recorded=None, device_only=False):
    return plan_choice.choose(config, options, shape, processes, recorded, device_only)

  choice, why = resumed(options, num_devices, workdir, plan_for)
  if choice is not None:
    return choice
  if why:
    log.warning("--mesh=auto --plan=auto%s", why)
  if options.mesh != "auto":
    shapes = [mesh_lib.parse_mesh_spec(options.mesh, num_devices)]
    return Choice(*first_fitting(shapes, plan_for, ""), f"--mesh={options.mesh}")
  candidates = (afresh_meshes(options.plan, num_devices, workdir) if why else
                mesh_lib.auto_mesh_candidates(options.plan, num_devices))
  shape, planned, searched = auto_mesh_of(config, options.memory_per_device, candidates,
                                          plan_for, options.plan, num_devices, processes)
  return Choice(shape, planned, auto_why(options.plan, shape) + searched + why)


def auto_mesh_of(config, memory_per_device: int | None, candidates, plan_for, plan: str,
                 num_devices: int, processes: int) -> tuple[dict[str, int], Any, str]:
  """`auto_mesh` for `config`'s tables and gin `OffloadConfig` in a job of `processes`
  (train.py's `choose`, the elastic supervisor's `replan.choose`): configured offloading
  in a job of several is refused before any mesh is priced (none can help), and
  `OffloadConfig.auto` only offloads in a job of one."""
  from jaxrec import offload, planner   # pylint: disable=import-outside-toplevel
  off = offload.OffloadConfig()
  offload.check_one_process(off, processes)
  offload_auto = off.auto and processes == 1
  budget = memory_per_device or planner.DEFAULT_MEMORY_PER_DEVICE
  floors = [min_bytes_per_device(config.tables, o, config.sparse_tx(), num_devices)
            for o in ([off, most_offloaded(config, off)] if offload_auto else [off])]
  if off.auto and processes > 1:   # it would offload on data=N, then be refused there
    plan_for = functools.partial(plan_for, device_only=True)   # (one process only) before
  try:                                                         # a mesh that fits was priced
    return auto_mesh(candidates, plan_for, plan, num_devices, offload_auto,
                     *[f if f > budget else 0.0 for f in floors])
  except BudgetError as e:
    if not off.auto or processes == 1 or plan != "auto":   # (a forced kind or a plan file:
      raise                                                # only --plan=auto searches)
    raise BudgetError(f"{e}; OffloadConfig.auto offloads nothing in a job of several "
                      f"processes (this one has {processes}): the meshes were planned on "
                      "the devices only") from None


def most_offloaded(config, off):
  """`off` with every table `OffloadConfig.auto` may offload offloaded: the least any
  plan of its offloading pass keeps on the devices (`min_bytes_per_device`)."""
  from jaxrec import offload   # pylint: disable=import-outside-toplevel
  return offload.planning.with_auto_offloaded(   # (it takes only the tables auto may offload)
      config.tables, config.features, off, [t.name for t in config.tables], config.batch_size)


def min_bytes_per_device(tables, off, optimizer, num_devices: int) -> float:
  """A floor on what any plan of `tables` (offloaded ones as their caches) needs on one of
  `num_devices` devices: their rows and optimizer state (each table's own where
  `optimizer` is per table, `optimizers.TableOptimizers`) split evenly over all of them,
  no buffers. Above the budget no mesh fits, and `auto_mesh` prices none: with 200 tables
  that fit nowhere it priced 20 meshes (18 s) on 8 devices, 84 (158 s) on 64, and the
  elastic supervisor that for each process count it weighed."""
  from jaxrec import offload   # pylint: disable=import-outside-toplevel
  from jaxrec.embedding import optimizers   # pylint: disable=import-outside-toplevel
  return sum(t.rows * offload.row_bytes(t, optimizers.of(optimizer, t.name))
             for t in offload.device_tables(tables, off, optimizer)) / num_devices


def auto_mesh(candidates: Sequence[Mapping[str, int]], plan_for: Callable[..., Any],
              plan: str, num_devices: int, offload_auto: bool = False,
              over_every_mesh: float = 0.0, over_every_mesh_offloading: float = 0.0
              ) -> tuple[dict[str, int], Any, str]:
  """`--mesh=auto`'s mesh of `candidates`, its `plan_for(shape)` and a log suffix saying
  why when it is not the first that fits.

  With `--plan=auto` and every candidate over `--memory_per_device` (`BudgetError`: a
  fresh run's only candidate, `data=N`, holds every table whole on every device), the
  other meshes of `num_devices` are priced (`split_meshes`: one model axis first, then
  two or three) and the one with the lowest estimated step time is taken. Tables that
  `OffloadConfig.auto` would offload (`offload_auto`) are offloaded only when no mesh holds
  them on the devices: the search plans with `plan_for(shape, device_only=True)` first,
  then again offloading (`data=N` first: its caches sit on every device; of the others,
  those offloading the fewest tables, then the fastest: the estimate leaves the host
  store's cost out). `over_every_mesh`: when not 0, the bytes a device needs on any mesh,
  known to be over budget (`min_bytes_per_device`): the on-device pass prices no other;
  `over_every_mesh_offloading`: the same with every table auto may offload offloaded
  (`most_offloaded`), for the offloading pass (it took ~10 s to find no mesh for
  `skewed_synthetic`).
  """
  what = f"--plan={plan}"
  if plan != "auto" or num_devices < 2:
    return (*first_fitting(candidates, plan_for, what), "")
  passes = [functools.partial(plan_for, device_only=True), plan_for] if offload_auto else [
      plan_for]
  over, tried, failed, floor = None, [], [], 0.0
  for attempt in passes:
    offloading = offload_auto and attempt is not passes[0]
    floor = over_every_mesh_offloading if offloading else over_every_mesh
    offloads = "" if not offloading else (
        f"; no mesh of {num_devices} devices holds the tables on the devices: "
        "OffloadConfig.auto offloads")
    try:
      shape, planned = first_fitting(candidates, attempt, what)
    except BudgetError as e:
      over = e     # the last pass's: with OffloadConfig.auto, offloading did not fit either
    else:
      if offloading:
        return shape, planned, offloads
      return split_if_much_faster(shape, planned, attempt, num_devices)
    tried = [dict(c) for c in candidates]
    if floor:
      continue
    for tier in split_meshes(tried, num_devices):
      found, errors = cheapest(tier, attempt, _offloaded if offloading else None)
      if found is not None:
        from jaxrec.embedding import layout  # pylint: disable=import-outside-toplevel
        why = ("cannot stack the tables (over 2**31 rows on one table slice)"
               if layout.SLICE_OVERFLOW in str(over) else "over --memory_per_device")
        return (*found, offloads + (
            f"; {_listed(tried)} {why}: of the {len(tier)} meshes that "
            f"split tables {'on one axis' if _model_axes(tier[0]) == 1 else 'further'}, "
            "the one with the lowest estimated step time"))
      tried += tier
      failed += errors
  if floor and not failed:
    from jaxrec.planner.result import format_bytes  # pylint: disable=import-outside-toplevel
    offloaded = " (every table OffloadConfig.auto can offload as its cache)" if (
        offload_auto) else ""
    raise BudgetError(f"{over}; nor can any other mesh of {num_devices} devices: the "
                      f"tables{offloaded} and their optimizer state alone need "
                      f"{format_bytes(floor)} a device split over all of them")
  if len(tried) == len(candidates):   # the candidates were every mesh there is
    raise over
  finest = {"data": 1, "table": 1, "row": num_devices, "col": 1}   # splits rows the most
  shape, e = next((f for f in reversed(failed) if f[0] == finest), failed[-1])
  raise BudgetError(f"{over}; nor does any other mesh of {num_devices} devices ({len(tried)} "
                    f"tried; e.g. {mesh_lib.format_mesh(shape)}: {e})")


# `--mesh=auto --plan=auto` leaves data=N (every table `dp`) for table=N only when the
# estimate says table=N is at least this many times faster: the uncalibrated model
# overstates gaps between plans (docs/planner.md), and data=N is the simplest.
SPLIT_SPEEDUP = 2.0


def split_if_much_faster(shape: dict[str, int], planned, plan_for: Callable[..., Any],
                         num_devices: int) -> tuple[dict[str, int], Any, str]:
  """`(shape, planned, why)`: `shape` (with `planned`) unless it is data=N and the plan of
  table=N or col=N (the faster) is estimated `SPLIT_SPEEDUP` times faster. On data=N every
  table is replicated and every device applies the whole global batch's updates, which
  grows with the features:
  300 features (a third multi-hot) on 8 CPU devices took 2.58 s a step there and 1.38 s on
  table=8 (forced tw), which the planner priced 3-4x faster (the same per device for the
  shipped configs, which stay on data=N)."""
  if num_devices < 2 or _model_axes(shape):
    return shape, planned, ""
  splits = [{"data": 1, "table": num_devices, "row": 1, "col": 1},
            {"data": 1, "table": 1, "row": 1, "col": num_devices}]
  found, _ = cheapest(splits, plan_for)   # col=N too: its cw was priced 3.5x faster than
  if found is None:                       # data=N where table=N's was 1.3x (measured 1.3-1.6x)
    return shape, planned, ""
  split, other = found
  ratio = planned[1].step_time_s / max(other[1].step_time_s, 1e-30)
  if ratio < SPLIT_SPEEDUP:
    return shape, planned, ""
  return split, other, (f"; on data={num_devices} every table would be replicated (dp) and "
                        f"each device would apply every example's updates: the plan on "
                        f"{mesh_lib.format_mesh(split)} is estimated {ratio:.1f}x faster")


def split_meshes(tried: Sequence[Mapping[str, int]], num_devices: int
                 ) -> list[list[dict[str, int]]]:
  """The meshes of `num_devices` not in `tried`, in two tiers: those with one model axis
  (`table`, `row` or `col`) above 1, then those with two or three. The second is priced
  only when nothing in the first fits: it holds most of the shapes and the slowest
  searches (200 tables on 8 devices: ~1 s a mesh in the first, up to 27 s in the second)."""
  rest = [s for s in mesh_lib.candidate_meshes(None, num_devices)
          if s not in [dict(t) for t in tried]]
  tiers = [[s for s in rest if _model_axes(s) == 1], [s for s in rest if _model_axes(s) > 1]]
  return [t for t in tiers if t]


def cheapest(shapes: Sequence[Mapping[str, int]], plan_for: Callable[[dict], Any],
             first_by: Callable[[Any], float] | None = None
             ) -> tuple[tuple[dict[str, int], Any] | None, list[tuple[dict, ConfigError]]]:
  """`(shape, plan_for(shape))` of the shape whose plan (`[1]`, a PlanResult) has the
  lowest estimated step time (on a tie the one of fewer bytes per device, then the first
  of `shapes`: tw on table=8 went before cw on col=8 at 733 against 306 MiB a device; with
  `first_by`, the lowest `(first_by(planned), step time, bytes)`), or None when none fits;
  and `(shape, ConfigError)` of those that did not, in order."""
  best, errors = None, []
  key = lambda planned: ((first_by(planned) if first_by else 0), planned[1].step_time_s,
                         sum(planned[1].memory.values()))
  for shape in shapes:
    try:
      planned = plan_for(dict(shape))
    except ConfigError as e:
      errors.append((dict(shape), e))
      continue
    if best is None or key(planned) < key(best[1]):
      best = (dict(shape), planned)
  return best, errors


def _offloaded(planned) -> float:
  """How many tables `planned` offloads (`plan_choice.choose`'s OffloadConfig, its [3])."""
  return len(planned[3].tables)


def _model_axes(shape: Mapping[str, int]) -> int:
  return sum(1 for a in ("table", "row", "col") if shape.get(a, 1) > 1)


def _listed(shapes: Sequence[Mapping[str, int]]) -> str:
  if len(shapes) == 1:
    return mesh_lib.format_mesh(shapes[0])
  return f"the {len(shapes)} meshes tried first"


def auto_why(plan: str, shape: Mapping[str, int]) -> str:
  """Why `--mesh=auto` with `--plan=plan` took `shape`, for the log."""
  made_for = recorded_mesh(plan)
  if made_for is None:
    if is_plan_file(plan):
      return ("--mesh=auto with a plan file recording no mesh: the first mesh, from all on "
              "data on, that takes the plan, placing fewest of its tables as another kind")
    return f"--mesh=auto with --plan={plan}"
  if made_for == dict(shape):
    return f"the mesh --plan={plan} records"
  return (f"--plan={plan} records mesh {mesh_lib.format_mesh(made_for)} "
          f"({math.prod(made_for.values())} devices): the closest mesh of "
          f"{math.prod(shape.values())} devices that takes the plan")
