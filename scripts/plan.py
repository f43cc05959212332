#!/usr/bin/env python3
r"""Propose (or check) a sharding plan and explain it: parses flags, calls `jaxrec.planner`.

  .venv/bin/python scripts/plan.py --gin_file=configs/dlrm_criteo.gin \
      --mesh=data=2,table=2,row=2,col=1 [--memory_per_device=16GiB] [--batch_size=N] \
      [--optimizer=sgd] [--json=PATH] [--plan=auto]
  .venv/bin/python scripts/plan.py --tables=big:10000000:64:4,small:1000:16 --mesh=table=4,row=2
  .venv/bin/python scripts/plan.py --calibrate      # time this machine, cache the coefficients
  .venv/bin/python scripts/plan.py --gin_file=... --profile=W   # re-plan from W/profile.jsonl
  .venv/bin/python scripts/plan.py --gin_file=... --plan=W/plan.json   # check a plan file
"""

import dataclasses
import logging
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# First, before jax: SIGINT / SIGTERM are recorded and raised between calibration
# measurements and search steps (`signals.check()`), never inside jax's gc callback.
from jaxrec import signals  # noqa: E402
signals.defer()

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config file(s) binding the tables.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings applied after the files.")
flags.DEFINE_string("tables", None, "Instead of gin: name:rows:dim[:pooling_factor[:zipf_alpha]]"
                    ",... (unique non-empty names; one feature per table).")
flags.DEFINE_string("mesh", None, "Mesh to plan for, e.g. data=2,table=2,row=2,col=1 "
                    "(default with --profile: the job's; with a plan file: the one it records), "
                    "or auto: the mesh train.py's --mesh=auto chooses on --devices devices.")
flags.DEFINE_integer("devices", None, "With --mesh=auto: the job's device count.")
flags.DEFINE_string("memory_per_device", "16GiB", "Device memory budget, e.g. 16GiB.")
flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's, else 512).")
flags.DEFINE_string("optimizer", None, "Sparse optimizer state: sgd|adagrad|rowwise_adagrad|"
                    "adam|ftrl or a factor of the table size (default: the config's, else "
                    "sgd); it replaces the default only: tables the config's "
                    "ExperimentConfig.table_optimizers names keep theirs.")
flags.DEFINE_string("plan", "auto", "auto (search), one kind forced on every table, or a "
                    "plan JSON file to check (a run's plan.json, this script's --json output).")
flags.DEFINE_string("json", None, "Also write the result as JSON to this path.")
flags.DEFINE_bool("calibrate", False, "Time this machine's primitives and cache them.")
flags.DEFINE_string("calibration_file", None, "Calibration cache (default "
                    "$JAXREC_CACHE_DIR/calibration.json, else "
                    "${XDG_CACHE_HOME:-~/.cache}/jaxrec/calibration.json).")
flags.DEFINE_integer("calibration_devices", 8, "Host CPU devices to calibrate with on CPU "
                     "(not given: the process's, 8 unless XLA_FLAGS sets another count).")
flags.DEFINE_string("profile", None, "Workdir (or profile.jsonl) of a job: fit the cost model "
                    "to its measured step times and propose a better plan.")


def _check_flags():
  """Flag values and combinations, before any planning (`ConfigError` names the flag)."""
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  if FLAGS.tables and (FLAGS.gin_file or FLAGS.gin_bindings):
    raise ConfigError("--tables and --gin_file/--gin_bindings: give the tables one way")
  if FLAGS.profile and FLAGS["plan"].present:
    raise ConfigError("--plan: not used with --profile (it proposes a plan from the profile)")
  from jaxrec.sharding.plan import check_plan_flag  # pylint: disable=import-outside-toplevel
  check_plan_flag(FLAGS.plan)   # as train.py and launch.py check it
  if FLAGS.batch_size is not None and FLAGS.batch_size <= 0:
    raise ConfigError(f"--batch_size must be positive, got {FLAGS.batch_size}")
  if FLAGS.optimizer is not None:
    from jaxrec.planner import inputs  # pylint: disable=import-outside-toplevel
    inputs.parse_optimizer(FLAGS.optimizer)   # before a --calibrate run, not after it
  if FLAGS.calibration_devices <= 0:
    raise ConfigError(f"--calibration_devices must be positive, got {FLAGS.calibration_devices}")
  if FLAGS.calibration_file and os.path.isdir(FLAGS.calibration_file):
    raise ConfigError(f"--calibration_file: '{FLAGS.calibration_file}' is a directory, not a "
                      "calibration file")
  if (FLAGS.calibration_file and not FLAGS.calibrate
      and not os.path.isfile(FLAGS.calibration_file)):
    raise ConfigError(f"--calibration_file: no such file '{FLAGS.calibration_file}' (write it "
                      "with --calibrate)")
  if FLAGS.json and os.path.isdir(FLAGS.json):
    raise ConfigError(f"--json: '{FLAGS.json}' is a directory; give a file path, e.g. "
                      f"{os.path.join(FLAGS.json, 'plan.json')}")
  if FLAGS.json and not _creatable(FLAGS.json):   # missing directories are made
    raise ConfigError(f"--json: cannot write '{FLAGS.json}': a file stands where its "
                      "directory would be")
  if FLAGS.calibrate and FLAGS.calibration_file and not _creatable(FLAGS.calibration_file):
    raise ConfigError(f"--calibration_file: cannot write '{FLAGS.calibration_file}': a "
                      "file stands where its directory would be")
  if FLAGS.calibrate and not FLAGS.calibration_file:   # found only after calibrating
    from jaxrec.planner import default_cache_path  # pylint: disable=import-outside-toplevel
    if not _creatable(str(default_cache_path())):
      raise ConfigError(f"cannot write the calibration cache '{default_cache_path()}': a file "
                        "stands where its directory would be ($JAXREC_CACHE_DIR, "
                        "$XDG_CACHE_HOME or ~/.cache; or give --calibration_file)")
  _check_auto_mesh_flags()
  if FLAGS.tables:   # before a --calibrate run, not after it
    from jaxrec.planner import inputs  # pylint: disable=import-outside-toplevel
    inputs.parse_tables_flag(FLAGS.tables)
    if FLAGS.mesh:
      _check_batch(FLAGS.batch_size or 512, inputs.parse_mesh(FLAGS.mesh), None)
  if FLAGS.calibrate and FLAGS.json and not (FLAGS.tables or FLAGS.gin_file):
    raise ConfigError("--json: --calibrate alone plans nothing to write; give the tables "
                      "(--gin_file or --tables) to plan with the new calibration")
  _check_outputs_spare_inputs()


# flags --mesh=auto does not take: it plans as train.py does, from the gin config alone
_NOT_WITH_AUTO_MESH = {
    "tables": "give the trainer's gin config with --gin_file",
    "profile": "--profile plans on the job's mesh",
    "optimizer": "bind ExperimentConfig.sparse_optimizer with --gin_bindings",
    "batch_size": "bind ExperimentConfig.batch_size with --gin_bindings",
    "calibration_file": "train.py prices with the cached calibration",
}


def _mesh_is_auto() -> bool:
  return (FLAGS.mesh or "").strip() == "auto"


def _check_auto_mesh_flags() -> None:
  """`--mesh=auto` previews train.py's choice: it needs the job's `--devices` and a gin
  config, and takes none of the flags train.py lacks."""
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  auto = _mesh_is_auto()
  if FLAGS.devices is not None and not auto:
    raise ConfigError("--devices: only with --mesh=auto (a mesh's axis sizes give its device "
                      "count)")
  if not auto:
    return
  if FLAGS.devices is None or FLAGS.devices <= 0:
    raise ConfigError("--mesh=auto: give the job's device count, e.g. --devices=8 (train.py "
                      "chooses among the meshes of all its devices)"
                      + ("" if FLAGS.devices is None else f"; got --devices={FLAGS.devices}"))
  for flag, instead in _NOT_WITH_AUTO_MESH.items():
    if FLAGS[flag].present:
      raise ConfigError(f"--{flag}: not with --mesh=auto, which plans as train.py does ("
                        f"{instead})")
  if not FLAGS.gin_file:
    raise ConfigError("--mesh=auto: give the trainer's gin config (--gin_file)")


def _auto_mesh(memory: int):
  """train.py's `--mesh=auto` choice on `--devices` devices for the parsed gin config and
  `FLAGS.plan`, as a fresh run makes it (no workdir's checkpoint is read), at `memory` per
  device (plan.py's 16 GiB default; train.py's on CPU devices is the host's share): prints
  the mesh and why, returns its `PlanResult`."""
  # pylint: disable=import-outside-toplevel
  from jaxrec import launch
  from jaxrec.sharding.mesh import format_mesh
  from jaxrec.train import mesh_choice
  from jaxrec.train.config import ExperimentConfig, RunOptions
  # pylint: enable=import-outside-toplevel
  config = launch.build(ExperimentConfig)
  config.validate(FLAGS.devices)
  options = RunOptions(mesh="auto", plan=FLAGS.plan, memory_per_device=memory)
  choice = mesh_choice.choose(config, options, FLAGS.devices)
  print(f"mesh: {format_mesh(choice.mesh)} ({choice.why})")
  return choice.planned[1]


def _check_batch(batch: int, mesh, config_batch) -> None:
  """The global batch must split over the mesh's devices (the planner's message named
  neither flag). Not with --profile: it plans for the batch of its records."""
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  n = math.prod(mesh.values()) if mesh else 1
  if not FLAGS.profile and batch % n:
    where = ("--batch_size" if FLAGS.batch_size else
             "the config's batch_size" if config_batch else "the default batch_size")
    mesh_flag = (f"--mesh={FLAGS.mesh}" + (f" --devices={FLAGS.devices}" if FLAGS.devices else "")
                 if FLAGS.mesh else "the --plan file's mesh")
    raise ConfigError(f"{where} {batch} is not a multiple of the {n} devices of {mesh_flag} "
                      "(batches are split over all devices)")


def _creatable(path: str) -> bool:
  """Whether the nearest existing ancestor of `path`'s directory is a directory."""
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  return os.path.isdir(parent)


def _check_outputs_spare_inputs():
  """An output (`--json`, `--calibration_file` with `--calibrate`) naming a file this run
  reads (`--gin_file`, the `--profile` file, `--calibration_file`) would overwrite it."""
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxrec.sharding.plan import is_plan_file  # pylint: disable=import-outside-toplevel
  profile = FLAGS.profile
  if profile and os.path.isdir(profile):
    profile = os.path.join(profile, "profile.jsonl")   # planner.PROFILE_FILE
  reads = [("--gin_file", p) for p in FLAGS.gin_file] + [("--profile", profile)]
  if is_plan_file(FLAGS.plan):
    reads.append(("--plan", FLAGS.plan))
  writes = [("--json", FLAGS.json)]
  if FLAGS.calibrate:
    writes.append(("--calibration_file", FLAGS.calibration_file))
  else:
    reads.append(("--calibration_file", FLAGS.calibration_file))
  for i, (out_flag, out) in enumerate(writes):
    others = reads + writes[i + 1:]
    for in_flag, path in others:
      if out and path and os.path.realpath(out) == os.path.realpath(path):
        raise ConfigError(f"{out_flag}: '{out}' is the {in_flag} file, writing it would "
                          "overwrite it; pick another path")


def _check_not_a_gin_file(path: str) -> None:
  """`--json` naming a gin file the config included (the `--gin_file`s themselves are
  checked before planning) replaced that config with plan JSON."""
  from jaxrec import gin_usage  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  for gin_file in gin_usage.files_read():
    if os.path.realpath(path) == os.path.realpath(gin_file):
      raise ConfigError(f"--json: '{path}' is a gin file the config includes, writing it "
                        "would overwrite it; pick another path")


def _write_json(path: str, obj) -> None:
  """Writes `obj` to `path` whole or not at all."""
  import json  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxrec.files import write_text_atomic  # pylint: disable=import-outside-toplevel
  try:   # any failure (Ctrl-C too) leaves no partial file behind
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))
  except OSError as e:
    raise ConfigError(f"--json: cannot write '{path}': {e.strerror or e}") from None


def _sparse_optimizer(optimizer):
  """The sparse optimizer object `optimizer` names (offload caches are sized by its state);
  one per table as it is (`inputs.planned_optimizer` made its default an object, or a
  factor: refused)."""
  from jaxrec.embedding import optimizers  # pylint: disable=import-outside-toplevel
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxrec.planner.cost_model import optimizer_key  # pylint: disable=import-outside-toplevel
  if isinstance(optimizer, optimizers.TableOptimizers):
    _sparse_optimizer(optimizer.default)
    return optimizer
  if hasattr(optimizer, "state_layout"):
    return optimizer
  key = optimizer_key(str(optimizer))
  if key not in optimizers.OPTIMIZERS:
    raise ConfigError(f"--optimizer: with offloaded tables give a name "
                      f"({', '.join(optimizers.OPTIMIZERS)}), not '{optimizer}'")
  return optimizers.sparse_optimizer(key)


def _offloaded(spec, optimizer):
  """Gin's `OffloadConfig` and the tables as the trainer builds them (each offloaded table
  as its device cache, `offload.device_tables`); None without one."""
  # pylint: disable-next=import-outside-toplevel
  from jaxrec.offload.config import OffloadConfig, device_tables
  off = OffloadConfig() if FLAGS.gin_file else None
  if off is None or not (off.tables or off.auto):
    return None
  return off, device_tables(spec.tables, off, _sparse_optimizer(optimizer))


def _plan_offloaded(spec, off, mesh, memory, optimizer, batch, cal):
  """`--plan` with offloaded tables, as `offload.choose_plan` plans them for the trainer:
  `auto` may offload more (`OffloadConfig.auto`; a plan file's `auto_offloaded` when it is
  over budget whole); the notes name each cache."""
  from jaxrec import planner  # pylint: disable=import-outside-toplevel
  from jaxrec.offload import hooks, planning  # pylint: disable=import-outside-toplevel
  from jaxrec.offload.config import device_tables  # pylint: disable=import-outside-toplevel
  from jaxrec.sharding.plan import is_plan_file  # pylint: disable=import-outside-toplevel
  sparse = _sparse_optimizer(optimizer)
  if FLAGS.plan == "auto":
    return planning.plan_with_offload(spec.tables, spec.features, mesh, off, sparse, memory,
                                      batch, calibration=cal)[0]

  def estimate(off):
    tables = device_tables(spec.tables, off, sparse)
    return _estimate_forced(tables, mesh, lambda plan, mode: planner.estimate_plan(
        plan, tables, spec.features, mesh, memory, sparse, batch, cal, mode=mode))
  names = hooks.plan_file_auto_offloaded(FLAGS.plan) if is_plan_file(FLAGS.plan) else None
  off, result = hooks.with_given_plans_offload(estimate, off, names, spec.tables,
                                               spec.features, batch)
  return planning.with_offload_notes(result, spec.tables, off, sparse)


def _refine(spec, off, memory, optimizer, mesh, cal, batch):
  """`--profile`: the fit and the plan it proposes, over the tables as the profiled run
  built them: offloaded ones as their caches, and under `OffloadConfig.auto` the tables
  its `auto` offloaded (its `W/plan.json`'s `auto_offloaded`), when the tables are over
  budget whole, as train.py prices the proposal given back with `--plan` (it was priced
  with them whole: 'does not fit', and its JSON named no `auto_offloaded`)."""
  from jaxrec import planner  # pylint: disable=import-outside-toplevel
  from jaxrec.offload import hooks, planning  # pylint: disable=import-outside-toplevel
  from jaxrec.offload.config import device_tables  # pylint: disable=import-outside-toplevel

  def refine(tables):
    return planner.refine_from_profile(
        FLAGS.profile, tables, spec.features, memory, optimizer,
        FLAGS.batch_size or spec.batch_size, cal, table_stats=spec.table_stats,
        mesh_shape=mesh, plan_batch_size=FLAGS.batch_size,
        batch_size_from="--batch_size" if FLAGS.batch_size else "the config's batch_size")
  if off is None:
    return refine(spec.tables)
  sparse = _sparse_optimizer(optimizer)
  workdir = FLAGS.profile if os.path.isdir(FLAGS.profile) else os.path.dirname(FLAGS.profile)
  names = hooks.plan_file_auto_offloaded(os.path.join(workdir, "plan.json"))
  off, result = hooks.with_given_plans_offload(
      lambda o: refine(device_tables(spec.tables, o, sparse)), off, names, spec.tables,
      spec.features, batch)
  notes = lambda r: r and planning.with_offload_notes(r, spec.tables, off, sparse)
  return dataclasses.replace(result, current=notes(result.current),
                             proposed=notes(result.proposed), explore=notes(result.explore))


def _estimate_forced(tables, mesh, estimate):
  """`estimate(plan, mode)` of `--plan`: a kind forced on every table, or a plan file read
  and checked as train.py does (`offload.choose_plan`: a warning when it records another
  mesh; errors prefixed `--plan=FILE:`)."""
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from jaxrec.sharding.plan import (is_plan_file, load_plan_file, uniform_plan,
                                    warn_collapsed_kind)
  if not is_plan_file(FLAGS.plan):
    warn_collapsed_kind(FLAGS.plan, mesh)
    return estimate(uniform_plan(FLAGS.plan, tables, mesh["table"]), f"forced {FLAGS.plan}")
  # pylint: disable-next=import-outside-toplevel
  from jaxrec.offload.hooks import checked_auto_offloaded, plan_file_error
  plan = load_plan_file(FLAGS.plan, mesh, " (--plan=auto re-plans)", tables)
  checked_auto_offloaded(FLAGS.plan, tables)   # as train.py does (it passed here)
  try:
    return estimate(plan, "file")
  except ConfigError as e:   # with train.py's hint when the file was made for another mesh
    raise plan_file_error(e, FLAGS.plan, mesh) from None


def _eval_warning(spec, result, optimizer, off):
  """train.py's warning for a plan (`result`; with `--profile` the proposed one) whose
  eval batch (`ExperimentConfig.eval_batch_size`) takes the embedding lookup over the
  budget (`budget_hint.eval_memory_warning`); None without a trainer's gin config (no
  eval: `--tables`, a planner-only file), and when it fits."""
  if not FLAGS.gin_file or result is None or spec.eval_batch_size is None:
    return None
  # pylint: disable=import-outside-toplevel
  from jaxrec.offload import planning
  from jaxrec.offload.config import device_tables
  from jaxrec.planner import cost_model, search
  from jaxrec.train import budget_hint
  # pylint: enable=import-outside-toplevel
  tables = spec.tables
  if off is not None:   # the stacks train.py builds: offloaded tables as their caches
    optimizer = _sparse_optimizer(optimizer)
    off = planning.with_auto_offloaded(spec.tables, spec.features, off,
                                       result.auto_offloaded, result.batch_size)
    tables = device_tables(spec.tables, off, optimizer)
  layouts = cost_model.build_layouts(tables, spec.features, result.plan, result.mesh_shape,
                                     optimizer)
  return budget_hint.eval_memory_warning(result, layouts, spec.features, optimizer,
                                         search.default_kernel(), search.default_dedup(),
                                         spec.eval_batch_size)


def _file_mesh():
  """The mesh a `--plan` file records (a run's plan.json, `--json` output), else None."""
  from jaxrec.sharding.plan import recorded_mesh  # pylint: disable=import-outside-toplevel
  return recorded_mesh(FLAGS.plan)


def _interrupted_text(name: str, cached: list) -> str:
  """What an interrupted run left: the outputs it had written and those it had not."""
  unwritten = [f"--json {FLAGS.json}"] if FLAGS.json else []
  if FLAGS.calibrate and not cached:
    unwritten.insert(0, "the calibration (the cache file is unchanged)")
  return (f"interrupted by {name}. Stopping"
          + (f"; the calibration is cached in {cached[0]}" if cached else "")
          + (f"; not written: {', '.join(unwritten)}" if unwritten else "") + ".")


def main(argv):
  absl_logging.set_verbosity(absl_logging.WARNING)   # jax's backend probing at INFO is noise
  del argv   # cli_flags.parse refuses arguments that are not flags
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  cached = []   # the calibration file, once written
  # a second signal exits at once: what is written so far is as the first one's line says
  signals.on_second_signal(lambda name: "error: " + _interrupted_text(
      f"{name} again (exited at once)", cached))
  with launch.user_errors(interrupted=lambda name: _interrupted_text(name, cached)):
    _check_flags()
    from jaxrec import planner  # pylint: disable=import-outside-toplevel
    from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
    if FLAGS.calibrate:
      cal = planner.calibrate(FLAGS.calibration_devices      # not given: what the process has
                              if FLAGS["calibration_devices"].present else None)
      try:
        path = planner.save_calibration(cal, FLAGS.calibration_file)
      except OSError as e:
        where = FLAGS.calibration_file or planner.default_cache_path()
        raise ConfigError(f"--calibration_file: cannot write '{where}': {e.strerror or e}"
                          ) from None
      cached.append(path)
      print(f"{cal.source}: cached in {path}")
    elif FLAGS.calibration_file:   # the user's file: used, with a warning when older
      cal = planner.load_calibration(FLAGS.calibration_file)
      if cal is not None:
        planner.is_current(cal, FLAGS.calibration_file)
    else:   # as train.py: the cache only when it was measured on this platform (another's
      from jaxrec.offload.hooks import cached_calibration  # pylint: disable=import-outside-toplevel
      cal = cached_calibration()   # was used here while train.py priced with the defaults)
    if not (FLAGS.tables or FLAGS.gin_file):
      if FLAGS.calibrate:
        return
      raise ConfigError("give the tables: --gin_file=configs/NAME.gin or --tables=name:rows:dim")
    from jaxrec.planner import inputs  # pylint: disable=import-outside-toplevel
    from jaxrec.sharding.plan import is_plan_file  # pylint: disable=import-outside-toplevel
    from jaxrec.train.config import parse_bytes  # pylint: disable=import-outside-toplevel
    if FLAGS.tables:
      spec = inputs.parse_tables_flag(FLAGS.tables)
    else:
      launch.parse_gin(FLAGS.gin_file, FLAGS.gin_bindings)
      spec = inputs.inputs_from_gin()
    batch = FLAGS.batch_size or spec.batch_size or 512
    optimizer = inputs.planned_optimizer(spec, FLAGS.optimizer)   # per table, as gin says
    memory = parse_bytes(FLAGS.memory_per_device, "--memory_per_device")
    auto = _mesh_is_auto()
    mesh = (None if auto else inputs.parse_mesh(FLAGS.mesh) if FLAGS.mesh else _file_mesh())
    _check_batch(batch, {"data": FLAGS.devices} if auto else mesh, spec.batch_size)
    offloaded = _offloaded(spec, optimizer)
    if auto:
      result = _auto_mesh(memory)
    elif FLAGS.profile:
      result = _refine(spec, offloaded[0] if offloaded else None, memory, optimizer, mesh, cal,
                       batch)
    elif mesh is None:
      why = " (the --plan file records no mesh)" if is_plan_file(FLAGS.plan) else ""
      raise ConfigError(f"--mesh is required, e.g. --mesh=data=2,table=2,row=2,col=1{why}")
    elif offloaded:
      result = _plan_offloaded(spec, offloaded[0], mesh, memory, optimizer, batch, cal)
    elif FLAGS.plan == "auto":
      result = planner.propose_plan(spec.tables, spec.features, mesh, memory, optimizer, batch,
                                    cal, table_stats=spec.table_stats)
    else:
      result = _estimate_forced(spec.tables, mesh, lambda plan, mode: planner.estimate_plan(
          plan, spec.tables, spec.features, mesh, memory, optimizer, batch, cal,
          table_stats=spec.table_stats, mode=mode))
    print(result.report())
    warning = _eval_warning(spec, getattr(result, "proposed", result), optimizer,
                            offloaded[0] if offloaded else None)
    if warning:
      logging.warning("%s", warning)
    signals.check()
    if FLAGS.json:
      _check_not_a_gin_file(FLAGS.json)
      _write_json(FLAGS.json, result.to_json())
      print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  from jaxrec import cli_flags  # noqa: E402  pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=cli_flags.parse)
