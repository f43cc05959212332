"""What the trainer calls (`train/loop.py`): plan with offloading, make the tier.

    plan, result, tables, off = offload.choose_plan(config, options, mesh_shape)
    collection = EmbeddingCollection.create(tables, ...)      # caches for offloaded tables
    tier = offload.make_tier(collection, config, off, options.seed, workdir, keep)
    train_it = tier.wrap(train_it)                            # if tier is not None
    ... state = tier.before_step(state, batch) before each train step, which takes
    ... tier.step_args() after the batch (make_train_step(..., keyed=tier.keyed))
    ... tier.save(state, step, workdir_layout.snapshots_dir(workdir)) before each save
    ... restored = ckpt.restore(..., offloaded={n: t.spec for n, t in tier.tables.items()})
    ... tier.restore(step, workdir_layout.snapshots_dir(workdir), restored.host_tables)
    ... state, logits = tier.eval_logits(state, batch, eval_fn) per eval batch
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Mapping, Sequence

import jax

from jaxrec import gin_usage, workdir_layout
from jaxrec.offload import owner
from jaxrec.offload.disk_space import filesystem, warn_disk_space
from jaxrec.offload.config import OffloadConfig, device_tables
from jaxrec.offload.planning import (plan_with_offload, with_offload_notes,
                                     with_auto_offloaded)
from jaxrec.offload.tier import OffloadTier
from jaxrec.sharding.plan import (Plan, check_plan_flag, is_plan_file, load_plan_file,
                                  plan_file_mesh_note, PlanTablesError, uniform_plan,
                                  warn_collapsed_kind)
from jaxrec.errors import BudgetError, ConfigError, in_order, some

_LOG = logging.getLogger(__name__)


def emb_init_key(seed: int) -> jax.Array:
  """The key `train.state.create` initialises the tables with (keep in sync with it)."""
  return jax.random.split(jax.random.key(seed), 3)[0]


def choose_plan(config, options, mesh_shape: Mapping[str, int],
                offload_config: OffloadConfig | None = None, processes: int = 1,
                recorded: Plan | None = None, recorded_offload: Sequence[str] | None = None,
                may_auto_offload: bool = True):
  """`train.plan_choice.choose` with offloading (gin `OffloadConfig`).

  Returns `(plan, result, tables, offload_config)`: `tables` are what the collection is
  built on (offloaded tables replaced by their caches). `--plan=auto` may offload more
  tables (`OffloadConfig.auto`); a forced kind or a plan file (`--plan=PATH.json`, e.g. what
  `scripts/plan.py --profile=W --json=PATH` proposes) offloads the configured ones. The
  estimates use the cached calibration (`scripts/plan.py --calibrate`) when one was taken
  on this platform, else the default coefficients. `processes`: of the job (offloading
  needs one: `check_one_process`). `recorded`: a plan to run instead of `options.plan` (the
  one a resumed checkpoint records, `train.mesh_choice`), checked as a plan file is;
  `recorded_offload`: the tables `OffloadConfig.auto` offloaded in that checkpoint (None:
  not known, found by planning as its run did). Those, or a plan file's `auto_offloaded`,
  are offloaded again when the plan is over budget with them whole
  (`with_given_plans_offload`). `may_auto_offload=False`: `--plan=auto` plans without
  offloading by `OffloadConfig.auto` (`plan_with_offload`).
  """
  from jaxrec import planner  # pylint: disable=import-outside-toplevel
  off = offload_config if offload_config is not None else OffloadConfig()
  sparse = config.sparse_tx()
  calibration = cached_calibration()
  common = dict(memory_per_device_bytes=options.memory_per_device,
                optimizer_state_factor=sparse, batch_size=config.batch_size,
                calibration=calibration)
  if options.plan == "auto" and recorded is None:
    result, off, tables = plan_with_offload(config.tables, config.features, mesh_shape, off,
                                            sparse, options.memory_per_device,
                                            config.batch_size, may_auto_offload,
                                            calibration=calibration)
    check_one_process(off, processes)
    return result.plan, result, tables, off
  if recorded is None and not is_plan_file(options.plan):
    check_plan_flag(options.plan)   # a kind, else the unknown plan is named

  def estimate(off):
    check_one_process(off, processes)
    tables = device_tables(config.tables, off, sparse)
    if recorded is not None:
      plan, mode = recorded, "checkpoint"
    elif is_plan_file(options.plan):
      plan = load_plan_file(options.plan, mesh_shape, " (--plan=auto re-plans)", tables)
      mode = "file"
    else:
      warn_collapsed_kind(options.plan, mesh_shape)
      plan, mode = uniform_plan(options.plan, tables, mesh_shape.get("table", 1)), "forced"
    try:
      return plan, planner.estimate_plan(plan, tables, config.features, dict(mesh_shape),
                                         mode=mode, **common), tables
    except ConfigError as e:
      if mode == "forced" and isinstance(e, BudgetError) and off.auto and may_auto_offload:
        raise BudgetError(f"--plan={options.plan}: {e}; OffloadConfig.auto offloads tables "
                          "only with --plan=auto (a forced kind keeps every table on the "
                          "devices)") from None
      if mode != "file":
        raise
      raise plan_file_error(e, options.plan, mesh_shape) from None

  if recorded is None and is_plan_file(options.plan):
    recorded_offload = checked_auto_offloaded(options.plan, config.tables)
  if (recorded is not None and recorded_offload is None and off.auto and may_auto_offload
      and processes == 1):
    try:   # a checkpoint from before its meta said which tables auto offloaded: as its run
      _, off, _ = plan_with_offload(config.tables, config.features, mesh_shape, off, sparse,
                                    options.memory_per_device, config.batch_size,
                                    calibration=calibration)
    except ConfigError:   # nothing fits this budget: the recorded plan's check says so
      pass
  off, (plan, result, tables) = with_given_plans_offload(
      estimate, off, recorded_offload, config.tables, config.features, config.batch_size,
      processes)
  return plan, with_offload_notes(result, config.tables, off, sparse), tables, off


def with_given_plans_offload(estimate, off: OffloadConfig, names, tables, features,
                             batch_size: int, processes: int = 1):
  """`(off, estimate(off))` for a given plan (a resumed checkpoint's, or a plan file such as
  a run's plan.json passed back), made over the caches of the tables `names` that
  `OffloadConfig.auto` offloaded: when it is over budget with the tables whole (or cannot be
  built so: a table over 2**31 rows), and `auto`
  is on in a job of one process, those tables are offloaded again as `auto` offloads them
  (checked whole it 'did not fit here'; offloaded unasked, a job that had room for them, or
  of several processes, was slower or refused). `scripts/plan.py` prices a plan file so
  too."""
  try:
    return off, estimate(off)
  except ConfigError as e:   # over budget, or not buildable whole (> 2**31 rows: a cache is)
    if names and not off.auto and isinstance(e, BudgetError):
      raise BudgetError(f"{e}; the plan's run offloaded {list(names)} by "
                        "OffloadConfig.auto, which is off here: bind OffloadConfig.auto = "
                        "True to offload them again") from None
    if not names or not off.auto or processes > 1:
      raise
  off = with_auto_offloaded(tables, features, off, names, batch_size)
  return off, estimate(off)


def type_of(e: ConfigError) -> type:
  """`BudgetError` for one (a plan over budget), else `ConfigError`: re-raised with a
  prefix, the class the callers branch on is kept."""
  return BudgetError if isinstance(e, BudgetError) else ConfigError


def plan_file_error(e: ConfigError, path: str, mesh_shape: Mapping[str, int]) -> ConfigError:
  """`e`, raised planning with plan file `path`, prefixed `--plan=PATH:` and, unless it is
  about the file's tables, with the hint that the file was made for another mesh (when it
  was); for train.py and `scripts/plan.py --plan` alike."""
  note = "" if isinstance(e, PlanTablesError) else plan_file_mesh_note(path, mesh_shape)
  return type_of(e)(f"--plan={path}: {e}{note}")


def checked_auto_offloaded(path: str, tables) -> tuple[str, ...] | None:
  """`plan_file_auto_offloaded`, a `ConfigError` when it names a table not in `tables`
  (ignored, the plan then 'did not fit' without a word of the field); also for
  `scripts/plan.py --plan`, which passed such a file that train.py then refused."""
  recorded = plan_file_auto_offloaded(path)
  unknown = in_order(set(recorded or ()) - {t.name for t in tables})
  if unknown:
    names = some([t.name for t in tables], quote=False)
    raise ConfigError(f"--plan: {path}: \"auto_offloaded\" names tables this config does "
                      f"not have: {unknown} (tables: {names})")
  return recorded


def plan_file_auto_offloaded(path: str) -> tuple[str, ...] | None:
  """The tables `OffloadConfig.auto` offloaded in the run or `scripts/plan.py` call that
  wrote plan file `path` (its `auto_offloaded`); None for a file that does not say (a bare
  plan, an older file) or does not read (`load_plan_file` names the fault)."""
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (OSError, ValueError):
    return None
  if isinstance(obj, dict) and isinstance(obj.get("proposed"), dict):
    obj = obj["proposed"]       # `scripts/plan.py --profile --json`: the plan it proposes
  if not isinstance(obj, dict) or "auto_offloaded" not in obj:
    return None
  names = obj["auto_offloaded"]
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise ConfigError(f"--plan: {path}: \"auto_offloaded\" {json.dumps(names)}: expected a "
                      "list of table names (those OffloadConfig.auto offloaded)")
  return tuple(names)


def check_one_process(off: OffloadConfig, processes: int) -> None:
  """Offloading is single-process: a `ConfigError` naming the tables (and whether
  `OffloadConfig.auto` chose them) when the job has several, before any data is read
  (and, planned by the elastic supervisor, before any worker starts)."""
  if processes > 1 and off.tables:
    names = ", ".join(f"'{t.name}'" for t in off.tables)
    chosen = ", ".join(map(repr, off.auto_added))
    why = (f" (OffloadConfig.auto offloaded {chosen}: the tables do not fit "
           "--memory_per_device; give more memory or devices)" if off.auto_added else "")
    raise ConfigError(f"offloaded tables {names} need one process, this job has "
                      f"{processes}{why}")


def cached_calibration():
  """`scripts/plan.py --calibrate`'s cached coefficients if they were measured on the
  platform this process runs on by this version of `calibrate`; None (the defaults)
  otherwise (a warning when only the version differs)."""
  from jaxrec import planner  # pylint: disable=import-outside-toplevel
  from jaxrec.kernels import platform  # pylint: disable=import-outside-toplevel
  cal = planner.load_calibration()
  if cal is None or cal.meta.get("platform") != platform.planning_backend():
    return None
  return cal if planner.is_current(cal, planner.default_cache_path()) else None


def warn_idle_settings(off: OffloadConfig) -> None:
  """Warns about the `OffloadConfig` settings gin bound for a run that offloads no table
  (no `tables`, and `auto` offloaded none): they had no effect, and the run said nothing
  (the unused-bindings warning counts them used: `OffloadConfig` is always built)."""
  # (not snapshot_check: it also checks the snapshots of an earlier run a restore reads)
  # (a rerun of W/config.gin binds every default: those are not said)
  fields = [f.name for f in dataclasses.fields(OffloadConfig)
            if f.init and f.name not in ("tables", "auto", "auto_added", "snapshot_check")
            and getattr(off, f.name) != f.default]
  bound = [f"OffloadConfig.{n} ({where})" for n in fields
           if (where := gin_usage.bound_at(f"OffloadConfig.{n}"))]
  if bound:
    why = ("OffloadConfig.auto found that every table fits on the devices" if off.auto
           else "OffloadConfig.tables is empty and OffloadConfig.auto is off")
    _LOG.warning("%s %s no effect: no table is offloaded (%s)", ", ".join(bound),
                 "has" if len(bound) == 1 else "have", why)


def warn_big_caches(tier: OffloadTier, off: OffloadConfig) -> list[str]:
  """Warns about each table offloaded by hand (not by `auto`) whose cache holds half its
  rows or more, which `auto` keeps on the device: the cache saves at most half the table's
  device memory, and the tier adds its store, buffer and look-ahead (a 5M-row table cached
  whole peaked at 1.64 GB of host memory, 1.18 GB on the device). Returns the warnings."""
  out = []
  for t in off.tables:
    rows, cache = tier.tables[t.name].spec.rows, tier.tables[t.name].cache.cache_rows
    if t.name not in off.auto_added and 2 * cache >= rows:
      out.append(f"OffloadConfig.tables['{t.name}']: its cache holds {cache:,} of the table's "
                 f"{rows:,} rows ({cache / rows:.0%}): offloading saves little device memory "
                 "and adds the tier's host memory and I/O; OffloadConfig.auto keeps such a "
                 "table on the device (drop it from OffloadConfig.tables, or give a smaller "
                 "cache)")
      _LOG.warning("%s", out[-1])
  return out


def make_tier(collection, config, offload_config: OffloadConfig, seed: int, workdir: str,
              keep: int | None = None, evaluates: bool = False, trains: bool = False,
              kept: int = 1, row_keyed: Sequence[str] = ()) -> OffloadTier | None:
  """The run's `OffloadTier` (None when no table is offloaded). Its stores start from the
  values `train.state.create(config, collection, seed)` gives on-device tables.
  `evaluates`: the run evaluates (`config.eval_batch_size`), see `warn_small_eval_caches`;
  `trains`: it trains (`config.batch_size`), see `warn_small_train_caches`, with `kept`
  checkpoints (`--keep_checkpoints`), see `warn_disk_space`; `row_keyed`: see
  `OffloadTier`."""
  if not offload_config.tables:
    warn_idle_settings(offload_config)
    return None
  tier = OffloadTier(collection, config.tables, offload_config, key=emb_init_key(seed),
                     workdir=workdir, keep=keep,
                     row_keyed=row_keyed)
  warn_big_caches(tier, offload_config)
  if evaluates:
    warn_small_eval_caches(tier, config.features, config.eval_batch_size)
  if trains:
    warn_small_train_caches(tier, config.features, config.batch_size // jax.process_count())
  for t in offload_config.tables:   # as --workdir and the data paths: the current directory
    if t.path and t.kvstore != "memory" and not os.path.isabs(t.path):
      _LOG.info("offloaded table '%s': store at %s ('path' '%s' is relative to the "
                "current directory)", t.name, tier.tables[t.name].store.path, t.path)
  warn_copied_snapshots(tier, workdir_layout.snapshots_dir(workdir))
  if trains:
    warn_disk_space(tier.tables, kept, workdir_layout.snapshots_dir(workdir))
  return tier


def warn_copied_snapshots(tier: OffloadTier, snapshots: str) -> list[str]:
  """Warns (and returns the warnings) for each store on another filesystem than the
  offload snapshots: a checkpoint hard-links a store's files into its snapshot, and where
  it cannot, copies them, the whole table each time (a helper's 256 MB store on a tmpfs
  left three 252 MB snapshots, with no word of it)."""
  warnings = []
  for name, t in tier.tables.items():
    where = filesystem(t.store.path)
    if t.store.off.kvstore == "memory" or where is None or where == filesystem(snapshots):
      continue
    size = t.spec.rows * t.spec.dim * jax.numpy.dtype(t.spec.dtype).itemsize
    warnings.append(
        f"offloaded table '{name}': its store {t.store.path} is on another filesystem than "
        f"the offload snapshots ({snapshots}), so each checkpoint copies the whole store "
        f"(the table alone is {size / 2**20:,.0f} MiB) where it would hard-link its files; "
        "put OffloadTable.path on the workdir's filesystem, or the workdir on the store's")
    _LOG.warning("%s", warnings[-1])
  return warnings


def store_paths(tier: OffloadTier) -> dict[str, dict[str, str]]:
  """`{table: {"path": absolute store directory}}`, recorded in each checkpoint's meta."""
  return {n: {"path": t.store.path} for n, t in tier.tables.items()}


def warn_moved_stores(tier: OffloadTier, meta: Mapping, where: str, workdir: str
                      ) -> list[str]:
  """Warns (and returns the warnings) for each offloaded table whose store directory the
  checkpoint at `where` (its `meta`) records elsewhere, in a store `workdir` owns: e.g. a
  relative `OffloadTable.path` in a run started from another directory. The run restores
  the step's snapshot into the new directory (nothing is lost); the old one stays on disk.
  (A store of another workdir, e.g. the original of a copied or imported checkpoint, is
  not this run's to report; nor is an old directory another table of this run now uses.)"""
  out = []
  then = (meta.get("offload") or {}).get("tables") or {}
  used = {t.store.path for t in tier.tables.values()}   # another table may now use `old`
  for name, t in tier.tables.items():
    old = (then.get(name) or {}).get("path")
    if (old and old not in used
        and owner.read_owner(old) == os.path.realpath(workdir)):
      why = (" (a relative 'path' in OffloadConfig.tables is relative to the current directory)"
             if t.store.off.path and not os.path.isabs(t.store.off.path) else "")
      out.append(f"offloaded table '{name}': checkpoint {where} was saved with its store at "
                 f"'{old}', this run's is '{t.store.path}'{why}; its snapshot is restored into "
                 f"'{t.store.path}', and '{old}' is no longer used (delete it by hand)")
      _LOG.warning("%s", out[-1])
  return out


def warn_small_train_caches(tier: OffloadTier, features, batch_size: int) -> list[str]:
  """Warns (and returns the warnings) for each offloaded table whose cache is smaller than
  the most distinct rows a training batch of this process (`batch_size` examples) can read:
  a batch that reads more stops the run, which may be many steps in (the batches that
  happened to read fewer trained). Only warnings: skewed ids rarely reach the bound."""
  def warning(name, cache_rows, per_example, bound):
    del per_example
    if bound > cache_rows:
      return (f"offloaded table '{name}': a training batch ({batch_size} examples) may read "
              f"up to {bound:,} distinct rows, more than its {cache_rows:,}-row cache; a "
              f"batch that reads more stops the run ({tier.config.cache_advice(name)})")
    return None
  return _cache_warnings(tier, features, batch_size, warning)


def warn_small_eval_caches(tier: OffloadTier, features, eval_batch_size: int) -> list[str]:
  """Warns (and returns the warnings) for each offloaded table whose cache is smaller than
  the most distinct rows an eval batch can read: an eval looks the batch up through the
  cache, so such a batch takes several passes (`eval_split`), each as slow as one over the
  whole batch; a cache smaller than one example's ids may stop the eval (e.g. a run that
  only evaluates, with a cache no training batch would fit). Each names the knob that sized
  the cache (`OffloadConfig.cache_advice`). `make_tier` calls it once per run, not per
  eval. Only warnings: real batches often read far fewer distinct rows."""
  def warning(name, cache_rows, per_example, bound):
    advice = tier.config.cache_advice(name)
    if per_example > cache_rows:
      return (f"offloaded table '{name}': one example may read up to {per_example:,} "
              f"distinct rows, more than its {cache_rows:,}-row cache; an eval batch with "
              f"such an example stops the run at that eval ({advice})")
    if bound > cache_rows:
      return (f"offloaded table '{name}': an eval batch ({eval_batch_size} examples) may "
              f"read up to {bound:,} distinct rows, more than its {cache_rows:,}-row cache; "
              "such a batch is evaluated in several passes, each costing a whole batch "
              f"({advice}, or lower ExperimentConfig.eval_batch_size for one pass)")
    return None
  return _cache_warnings(tier, features, eval_batch_size, warning)


def _cache_warnings(tier: OffloadTier, features, batch_size: int, warning) -> list[str]:
  """Logs and returns `warning(table, cache_rows, per_example, per_batch)` of each offloaded
  table where it is not None; `per_example` and `per_batch` are the most distinct rows one
  example and a batch of `batch_size` can read (the bags of the features reading the
  table, at most its rows: a cache of the whole table always fits)."""
  out = []
  for name, t in tier.tables.items():
    per_example = min(sum(f.max_len for f in features if f.table == name), t.spec.rows)
    text = warning(name, t.cache.cache_rows, per_example,
                   min(batch_size * per_example, t.spec.rows))
    if text:
      _LOG.warning("%s", text)
      out.append(text)
  return out
