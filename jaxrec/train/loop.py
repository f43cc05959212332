"""`train_and_evaluate`: the whole run, readable top to bottom.

mesh + plan → embedding collection → state (fresh or restored) → data → jitted steps →
loop (log, eval, checkpoint) → final eval and checkpoint. Writes into the workdir:
`config.gin`, `plan.json`, `metrics.jsonl`, `tb/`, `checkpoints/`, `profile.jsonl`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Sequence

import gin
import jax
import numpy as np

from jaxrec.checkpoint import offloaded as offloaded_lib
from jaxrec.data import pipeline
from jaxrec.embedding import optimizers as sparse_optimizers
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.errors import ConfigError, DataError, JaxrecError, OutputError
from jaxrec.files import workdir_lock
from jaxrec.kernels import platform
from jaxrec.models import bf16_hardware, item_frequency
from jaxrec import elastic, files, offload, planner, schedules, signals, workdir_layout
from jaxrec.offload import snapshots as snapshots_lib, telemetry
from jaxrec.sharding import mesh as mesh_lib
from jaxrec.planner.result import format_bytes
from jaxrec.sharding.plan import Plan, uniform_plan
from jaxrec.train import (budget_hint, config_changes, config_gin, data_adapter, early_stop,
                          mesh_choice)
from jaxrec.train import state as state_lib
from jaxrec.train import step as step_lib
from jaxrec.train import (predictions, process_agreement, rerun_warnings, run_records,
                          step_memory, termination, workdir_checks)
from jaxrec.train.evaluation import EvalStopped, evaluate, owed as eval_owed
from jaxrec.train.evaluation import stop_check as eval_stop
from jaxrec.train.config import ExperimentConfig, RunOptions
from jaxrec.train.placement import MAX_STEPS_IN_FLIGHT, device_batch, steps_in_flight  # noqa: F401
from jaxrec.train.writers import METRICS_FILE, MetricsWriter, Progress

log = logging.getLogger("jaxrec")

MAX_ROLLBACKS = 3   # --on_nan=rollback gives up after this many in one run
REPORT_TABLES = 40   # tables (and notes) the start-up log's plan report lists; W/plan.json all


class TrainingError(JaxrecError):
  """Training cannot go on (e.g. non-finite loss under `--on_nan=stop`)."""


def setup(config: ExperimentConfig, options: RunOptions, devices=None, workdir=None
          ) -> tuple[EmbeddingCollection, Plan, dict]:
  """Mesh, plan and embedding collection; every check that can fail runs here, before
  anything is compiled. `workdir`: a run's, whose checkpoint's plan and mesh
  `--mesh=auto --plan=auto` resumes (`mesh_choice`)."""
  options.validate()
  platform.tuning()   # `GpuTuning` gin bindings: checked (and used) before anything compiles
  devices = list(jax.devices() if devices is None else devices)
  # an evaluate-only run builds no training batch: batch_size is checked if it trains
  config.validate(len(devices), train=workdir is None
                  or not data_adapter.evaluates_only(workdir, options))
  if config.batch_size % len(devices):   # evaluates only: plan for the batch that runs
    config = dataclasses.replace(config, batch_size=config.eval_batch_size)
  state_lib.check_model(config)   # bindings that need the input shapes: before the planner
  early_stop.check_model(options.early_stop_metric, config.model)
  slow_bf16 = bf16_hardware.slow_bf16_warning(config.model, jax.default_backend())
  if slow_bf16:
    log.warning("%s", slow_bf16)
  # the dense model's bytes on each device, its input `collection.dim` wide: the widest table
  dense = state_lib.dense_bytes(config, max(t.dim for t in config.tables))
  host = budget_hint.host_budget(options.memory_per_device, options.plan, devices,
                                 dense.total, jax.process_count())
  if host is not None:   # CPU devices share the host: the default 16 GiB each was OOM-killed
    log.info("planning with --memory_per_device=%dMiB: the host's memory shared by its %d CPU "
             "devices (%d%% of it, half for a checkpoint's copy, less the dense model); give "
             "--memory_per_device to plan with another budget", host >> 20, len(devices),
             100 * budget_hint.HOST_FRACTION)
    options = dataclasses.replace(options, memory_per_device=host)
  choice = mesh_choice.choose(config, options, len(devices), jax.process_count(), workdir)
  mesh = mesh_lib.make_mesh(choice.mesh, devices)
  # Offloaded tables (gin `OffloadConfig`) appear to the collection as their device caches.
  plan, result, tables, off = choice.planned
  collection = EmbeddingCollection.create(tables, config.features, plan, mesh,
                                          config.sparse_tx())
  logq = " and logQ estimate" if state_lib.uses_logq(config) else ""
  result = dataclasses.replace(result, notes=result.notes + (
      f"not in the budget: the dense model's parameters, gradients and optimizer state"
      f"{logq}, {format_bytes(dense.total)} on every device, and the steps' activations "
      "(measured when they compile, before the first step: a log line): leave room for them "
      "in --memory_per_device",))
  return collection, plan, {"mesh": choice.mesh, "plan_result": result, "offload": off,
                            "why": choice.why, "dense_bytes": dense}


def _no_checkpoint(ckpt) -> bool:
  """Whether the workdir holds no checkpoint (a run that failed before its first save: a
  store it created serves no later run, which starts afresh; a failure to tell: False)."""
  try:
    return ckpt.latest_step() is None
  except Exception:  # pylint: disable=broad-except
    return False


def train_and_evaluate(config: ExperimentConfig, options: RunOptions, workdir: str
                       ) -> dict[str, Any]:
  """Trains for `options.num_steps` steps (resuming from `workdir` if it has checkpoints).

  Returns the last logged metrics (with the final eval's keys). Process 0 holds the
  workdir's lock (`files.workdir_lock`): a second run in the same workdir is refused.
  """
  process_agreement.check(options, gin.config_str)   # a job's processes: one run
  workdir_checks.check_workdir(workdir)
  # a new workdir is removed again when the run is refused before it writes anything (a bad
  # --mesh or plan, data errors): no empty directory with only its lock file is left
  # SIGTERM: before the first step, stop at the next `signals.check()`; then checkpoint
  # after the step in progress and raise `termination.Terminated`
  with files.made_dir(workdir), termination.sigterm_requests(
      jax.process_count() == 1 and not elastic.is_supervised()) as terminated:
    if jax.process_index() != 0:   # the processes of one job share the workdir
      return _train_and_evaluate(config, options, workdir, terminated)
    if not elastic.is_supervised():   # a launcher's job holds it between its generations
      elastic.check_not_launched(workdir)
    with workdir_lock(workdir):
      return _train_and_evaluate(config, options, workdir, terminated)


def _check_item_freq_batch(restored, batch_size: int) -> None:
  """A two-tower's logQ item-frequency state counts time in steps of the global batch
  (`models.item_frequency`): resumed with another `batch_size`, its gaps were silently
  scaled (up to 2x in 10% of the buckets, measured)."""
  saved = (restored.meta or {}).get("batch_size")
  if "item_freq" in restored.state and saved is not None and int(saved) != batch_size:
    raise ConfigError(f"ExperimentConfig.batch_size = {batch_size}, but the checkpoint was "
                      f"trained with {saved}, and its item-frequency estimate "
                      "(TwoTower.logq_correction) counts time in steps of that batch: keep "
                      f"ExperimentConfig.batch_size = {saved}, or start a fresh --workdir")


def _train_and_evaluate(config: ExperimentConfig, options: RunOptions, workdir: str,
                        terminated: termination.SigtermRequests | None = None
                        ) -> dict[str, Any]:
  collection, plan, info = setup(config, options, workdir=workdir)
  signals.check()   # Ctrl-C (deferred by scripts/train.py) while planning: stop before data
  is_main = jax.process_index() == 0
  mesh = collection.mesh

  # A run already trained to --num_steps only evaluates: it opens no training data (gone,
  # or slow to index, e.g. when re-evaluating on new --eval_data) unless its restore falls
  # back to an earlier step. Data errors come before anything starts or compiles, and
  # before the plan's report (a missing file's error is then not 20+ lines below it).
  evaluate_only = data_adapter.evaluates_only(workdir, options)
  data_adapter.check_predictions_path(config, options)   # not over the data it scores
  source, eval_data = process_agreement.opened_data(   # the same on every process
      lambda: (None if evaluate_only else data_adapter.train_iterator(config, options),
               data_adapter.eval_data(config, options)), ("--train_data", "--eval_data"))
  offloaded_bytes = offload.host_bytes(config.tables, info["offload"], collection.optimizer)
  saved_bytes = budget_hint.saved_bytes(collection)   # a checkpoint's host copy of the tables
  shared = None   # the host warning before the state is made; step_memory's counts the steps
  if is_main:
    log.info("mesh %s (%s), plan (--plan=%s):\n%s", mesh_lib.format_mesh(info["mesh"]),
             info["why"], options.plan, info["plan_result"].report(max_tables=REPORT_TABLES))
    hint = budget_hint.note(options.memory_per_device, jax.local_devices()[0])
    if hint:
      log.info("%s", hint)
    dense = info["dense_bytes"]
    shared = budget_hint.host_warning(info["plan_result"], mesh.local_devices,
                                      offloaded=offloaded_bytes, dense=dense.resident,
                                      gradients=dense.gradients,
                                      saved=saved_bytes)
    for warning in (shared, budget_hint.eval_warning(info["plan_result"], collection,
                                                     config.eval_batch_size)):
      if warning:
        log.warning("%s", warning)
  data_adapter.warn_preprocessed_skips(options.bad_rows,
                                       *[s for s in (source, eval_data) if s is not None])
  if source is not None:
    data_adapter.warn_synthetic_eval(config, options)
  if eval_data is not None:
    data_adapter.warn_eval_count(config, options)
  initial_data_state = source.get_state() if source is not None else {}
  # keep=None: snapshots go only in prune_snapshots, once no checkpoint on disk needs them
  # (a count cannot tell: a save in flight or a rejected step holds one too)
  tier = offload.make_tier(collection, config, info["offload"], options.seed, workdir,
                           keep=None, evaluates=eval_data is not None,
                           trains=source is not None, kept=options.most_checkpoints_kept(),
                           row_keyed=step_lib.row_keyed_tables(config))
  # the tier reads ahead (prefetch) and remaps the ids of offloaded tables to cache slots
  wrap = tier.wrap if tier is not None else (lambda it: it)
  train_it = None if source is None else wrap(source)
  snapshots = workdir_layout.snapshots_dir(workdir)
  try:   # a failure (e.g. out of memory) from here on hands the store claims back
    ckpt = data_adapter.checkpointer(workdir, options)
    if ckpt.latest_step() is None:
      state = state_lib.create(config, collection, options.seed)
    else:   # restoring: only shapes and shardings are needed, not fresh values
      state = state_lib.abstract(config, collection, options.seed)
  except BaseException:
    if tier is not None:
      tier.close(refused=True)
    raise
  shardings = state_lib.shardings(state, collection)
  # with the fields a caller gave in Python (the library API) written as bindings
  operative_gin, unwritten = config_gin.recorded(config, gin.operative_config_str())
  meta = {"plan": plan.to_json(), "mesh": info["mesh"], "seed": options.seed,
          "gin": operative_gin, "batch_size": config.batch_size,
          "vocab": config_changes.vocab_record(),   # by fingerprint (vocab_changes)
          # the layout a copy prints (`convert_checkpoint.py --plan`) stacks by bag size too
          "features": [dataclasses.asdict(f) for f in config.features]}
  if tier is not None:   # checkpoint conversion reads these tables from the snapshots
    meta["offload"] = {"snapshots": os.path.abspath(snapshots),
                       "tables": {n: {"rows": t.spec.rows, "cache_rows": t.cache.cache_rows,
                                      "auto": n in info["offload"].auto_added,
                                      **offload.store_paths(tier)[n]}
                                  for n, t in tier.tables.items()}}

  def resume_from(restored) -> dict:
    """Points the offload tier and the data stream at a restored checkpoint."""
    _check_item_freq_batch(restored, config.batch_size)
    if tier is not None:   # tables saved on the device are written to their stores
      at = int(restored.state["step"])
      offload.warn_moved_stores(tier, restored.meta, ckpt.step_dir(at), workdir)
      found = offloaded_lib.snapshot_of(ckpt.step_dir(at), own_only=True)   # as the restore
      tier.restore(at, os.path.dirname(found[0]) if found else snapshots, restored.host_tables)
    if train_it is not None:
      set_data_state(restored)
    state = restored.state
    if "item_freq" in state:   # a fresh estimate (the checkpoint had none) counts from here
      state["item_freq"] = item_frequency.started_at(state["item_freq"], int(state["step"]))
    return state

  def set_data_state(restored) -> None:
    """Points the data stream at `restored`'s position ({}: a tables-only import). A data
    mismatch's hint names this run's checkpoint directory."""
    try:
      train_it.set_state(restored.data_state or initial_data_state)
    except (ConfigError, DataError) as e:
      if pipeline.RESTART_HINT not in str(e):
        raise
      raise type(e)(str(e).replace(pipeline.RESTART_HINT,
                                   pipeline.restart_hint(ckpt.directory))) from None

  def prune_snapshots() -> None:
    """Drops offload snapshots of steps no kept checkpoint restores from (also those a run
    left when its tables moved back to the device)."""
    # all_steps() lists a save in flight and no longer the steps it will rotate out, which
    # stay on disk (and are what a restart restores) until it commits
    kept = sorted(set(ckpt.all_steps()) | set(ckpt.steps_on_disk()))
    old = snapshots_lib.unneeded(snapshots, kept) if is_main else []
    if old:   # logged first: removing a large table's snapshot can take a minute (a small
      big = tier is None or sum(snapshots_lib.store_bytes(t.store) for t in   # one's: a line
                                tier.tables.values()) >= snapshots_lib.LOG_MIN_BYTES  # a save)
      log.log(logging.INFO if big else logging.DEBUG, "removing offload snapshots of steps %s "
              "(no checkpoint kept: %s)", old, kept)
      snapshots_lib.prune(snapshots, kept)

  def save_checkpoint(state, step: int, force: bool, evaluates: bool,
                      data_state: dict | None = None) -> None:
    writer.flush_events()   # the lines of the steps it saves: a rerun does not log them again
    if tier is not None:   # flush and snapshot the offloaded tables of this step
      ckpt.wait()   # the last save commits, rotating the oldest out (the save waits anyway)
      prune_snapshots()   # ... whose snapshot went after this one: keep + 2 copies at peak
      tier.save(state, step, snapshots)
      elastic.report_alive("save", checkpoint=step)
    ckpt.save(step, state, collection, data_state=data_state or train_it.get_state(),  # its
              meta=dict(meta, evaluates=evaluates), force=force)   # eval follows: `evaluates`
    elastic.report_alive("save", checkpoint=step)
    prune_snapshots()

  def keep_trained(state, step: int, position: int) -> None:
    """A training batch's data error mid-run: saves the steps trained since the last
    checkpoint, resuming at that batch (not with a non-finite loss among them, nor with
    offloaded tables, whose tier stopped at the error, nor in a job of several processes,
    whose save the others, past the error or not, would not join: those steps are trained
    again)."""
    ckpt.wait()
    if tier is not None or jax.process_count() > 1 or step == (ckpt.latest_step() or 0):
      return
    losses = np.asarray(jax.device_get([p[2]["loss"] for p in pending]), np.float64)
    if not np.isfinite(losses).all():
      return
    log.error("the training batch at data position %d failed: saving checkpoint %d first "
              "(the rerun resumes at that batch)", position, step)
    if losses.size:   # the window's loss line, as a checkpoint step has one
      writer.write(step, {"loss": float(losses.mean())})
    save_checkpoint(state, step, force=True, evaluates=False,
                    data_state=dict(train_it.get_state(), position=position))
    ckpt.wait()

  def fresh_dense():   # the dense values a tables-only checkpoint (an import) lacks
    return state_lib.create_dense(config, collection, options.seed)

  # the full specs of offloaded tables (the collection holds their caches): the checkpoint
  # may hold them whole, or be of a run that offloaded tables this one keeps on the device
  offloaded = {n: t.spec for n, t in tier.tables.items()} if tier is not None else None
  start = 0
  snapshot_check = info["offload"].snapshot_check   # of the offload snapshots restores read
  try:   # an error here (no valid checkpoint, the training data) leaves nothing running
    signals.check()   # ... as does Ctrl-C, also during the restore (between table blocks)
    try:
      restored = ckpt.restore(state, collection, init=fresh_dense, offloaded=offloaded,
                              snapshot_check=snapshot_check)
    except ConfigError as e:   # a changed model: with the bindings that changed
      raise config_changes.explained(e, operative_gin) from None
    if restored is not None:   # FTRL's state holds its rate: a changed one rescaled rows
      config_changes.check_stateful_optimizers(restored.meta, [t.name for t in config.tables],
                                               collection.optimizer)
    for note in ckpt.restore_warnings if is_main else ():   # under launch.py: its stderr
      elastic.report_warning(f"warning: {note}")
    if restored is not None:
      if train_it is not None:   # before the data position's check (a copy: warned)
        config_changes.check_read_as(restored.meta, operative_gin, options.train_data
                                     or config.train_data, int(restored.state["step"]),
                                     trains=True, position=bool(restored.data_state))
      state = resume_from(restored)
      start = int(state["step"])
      log.info("resumed from step %d of %s", start, ckpt.directory)
    elif tier is not None:   # a fresh run: a bad 'init': 'existing' store stops it here
      tier.open_stores()
    if train_it is None and start < options.num_steps and not early_stop.stopped_by(
        os.path.join(workdir, METRICS_FILE), options, start):   # fell back: it trains
      config.check_batch("batch_size", mesh.size, f" (this run trains: the restore fell back "
                         f"to step {start}, below --num_steps={options.num_steps})")
      (source,) = process_agreement.opened_data(
          lambda: (data_adapter.train_iterator(config, options),), ("--train_data",))
      data_adapter.warn_synthetic_eval(config, options)
      initial_data_state = source.get_state()
      train_it = wrap(source)
      if restored is not None:
        set_data_state(restored)
      # the training iterator's bindings are operative now: config.gin and the saves'
      # meta left out every make_train_iterator.* (a rerun of config.gin shuffled)
      operative_gin, unwritten = config_gin.recorded(config, gin.operative_config_str())
      meta["gin"] = operative_gin
    if restored is not None and train_it is None:   # only evaluates: read as it was trained
      config_changes.check_read_as(restored.meta, operative_gin,
                                   options.eval_data or config.eval_data, start)
    signals.check()
    if is_main:   # only now: a run refused by its restore leaves the last run's files
      resumed = None   # a resume that trains with another config: said, and kept
      if restored is not None and train_it is not None:
        resumed = config_changes.note(workdir, start, (restored.meta or {}).get("gin"),
                                      operative_gin)
      run_records.write(workdir, operative_gin, info["plan_result"],
                        trains=train_it is not None, options=options, unwritten=unwritten,
                        resumed=resumed)
  except BaseException:
    if tier is not None:
      tier.close(refused=True)
    ckpt.close()
    raise

  train_step = step_lib.make_train_step(config, collection, shardings,
                                        tier.keyed if tier is not None else ())
  step_args = tier.step_args if tier is not None else tuple
  eval_step = step_lib.make_eval_step(config, collection, shardings)
  bsharding = mesh_lib.batch_sharding(mesh)
  writer = MetricsWriter(workdir, enabled=is_main, purge_step=start + 1)   # TB: after `start`
  progress = Progress(options.num_steps, start, enabled=None if options.progress else False)
  stopper = early_stop.EarlyStop.of(options, ckpt)   # its state at `start`: metrics.jsonl's
  stopper.start_from(restored, start, meta)   # where training on this data began
  stopper.restore(writer.path if is_main else None, start)
  finished = start >= options.num_steps or stopper.stopped   # run again: evaluate only
  data_adapter.log_passes(None if finished else source, config, options, start)
  if restored is not None and not finished:
    writer.write(start, {"event": "resume", "checkpoint_step": start})
  elif restored is None and writer.had_records:   # a run killed before its first save:
    writer.write(start, {"event": "restart"})    # its lines past 0 are not this run's

  last: dict[str, Any] = {}
  pending: list[tuple[int, int, dict]] = []   # (step, data position, step outputs) unchecked
  in_flight = steps_in_flight(mesh)
  skip_positions: set[int] = set()                 # batches that gave a non-finite loss
  rollbacks = 0
  t_mark, steps_timed, paused = None, 0, 0.0       # paused: eval/checkpoint s in the window
  profiled = False                                 # a profile line holds the plan
  failing = None                                   # the error ending the run, if any
  try:
    # compiled now (the first calls reuse them): their activations are warned about first;
    # the time counts as the first step's (elastic's recovery breakdown: its compile_s)
    precompiled = time.perf_counter()
    step_memory.check(config, collection, state, None if finished or train_it is None
                      else train_step, eval_step if eval_data is not None else None,
                      info["plan_result"], info["dense_bytes"].resident, offloaded_bytes, shared,
                      is_main, workdir, step_args(), saved_bytes)   # adds them to plan.json
    precompiled = time.perf_counter() - precompiled
    step, sigterm, eval_stopped = start, False, False
    dense_behind = schedules.dense_steps_behind(state)   # an import's dense state is fresh
    if finished:   # the resume line carries the evaluation (maybe of other --eval_data)
      log.info("%s", stopper.rerun_note(start) if stopper.stopped else f"already trained to "
               f"step {start} (--num_steps={options.num_steps}): evaluating that checkpoint")
      if restored is not None:   # a synthetic eval set is the seed's
        data_adapter.warn_eval_seed(config, options, restored.meta)
        rerun_warnings.warn(workdir, options, restored, start, stopper.stopped)
      metrics, state = evaluate(eval_step, collection, state, eval_data, bsharding, tier,
                                model=config.model,
                                predictions=predictions.at(options.predictions, start))
      # with --bad_rows=skip, the eval rows dropped (a training run's log lines carry them)
      last = dict(metrics, **data_adapter.bad_row_metrics(eval_data), step=start)
      if restored is not None:
        writer.write(start, {"event": "resume", "checkpoint_step": start, **last},
                     data_adapter.bad_row_scalars(eval=eval_data))
    elif restored is not None and ((baseline := stopper.baseline_due(   # early stopping's
        writer.path if is_main else None, start)) or eval_owed(   # or owed by a stopped run
            writer.path if is_main else None, restored.meta, options.eval_every, start)):
      log.info("%s", stopper.start_note(start, baseline))
      metrics, state = evaluate(eval_step, collection, state, eval_data, bsharding, tier,
                                model=config.model,   # with early stopping, maybe the last
                                predictions=predictions.at(options.predictions, start,
                                                           stopper.metric is not None))
      writer.write(start, dict(metrics, **data_adapter.bad_row_metrics(eval_data)),
                   data_adapter.bad_row_scalars(eval=eval_data))
      stopper.observe(start, metrics, writer)
    tier_window = None if tier is None else telemetry.WindowStats(tier, step)
    while step < options.num_steps and not stopper.stopped:
      signals.check()   # Ctrl-C (deferred by scripts/train.py): between steps, not mid-compile
      if terminated is not None:   # SIGTERM from now on: a checkpoint after the step
        terminated.training()
      t_step = time.perf_counter()
      position = train_it.get_state()["position"]
      try:
        batch = next(train_it)
        if tier is not None:   # installs the batch's rows (also for a batch skipped below)
          state = tier.before_step(state, batch)
        if position in skip_positions:
          continue
        placed = device_batch(collection, batch, bsharding)   # checks the ids (`pack`)
      except DataError:   # a record preprocessing never writes: the steps since the last
        keep_trained(state, step, position)   # checkpoint are saved first
        raise
      t_host = time.perf_counter() - t_step
      state, metrics = train_step(state, placed, *step_args())
      step += 1
      pending.append((step, position, metrics))
      if in_flight is not None and len(pending) > in_flight:   # wait for that step back
        pending[-in_flight - 1][2]["loss"].block_until_ready()
      if t_mark is None:          # the first step compiles; time from its end
        jax.block_until_ready(metrics["loss"])
        t_mark, steps_timed = time.perf_counter(), 0
      else:
        steps_timed += 1
      # Under scripts/launch.py: progress for hang/straggler detection; True = the
      # supervisor asks this generation to save and stop (re-plan). A no-op otherwise.
      stop = elastic.report_progress(workdir, step, time.perf_counter() - t_step + precompiled,
                                     t_host)
      precompiled = 0.0
      sigterm = terminated is not None and terminated.is_set()
      stop = stop or sigterm
      done = step == options.num_steps
      is_eval = bool(options.eval_every and step % options.eval_every == 0) or done
      # an eval step of early stopping may be the last: it logs (the stop at 960 under
      # --log_every=100 left steps 901-960 without a loss line, `done:` naming step 900)
      is_log = (step % options.log_every == 0 or done or stop
                or (is_eval and stopper.metric is not None))
      is_ckpt = done or stop or (options.checkpoint_every and step % options.checkpoint_every == 0)
      is_ckpt = is_ckpt or (is_eval and stopper.metric is not None)   # each may be the best
      if not (is_log or is_eval or is_ckpt):
        continue
      # Waits for the window's steps: what follows (eval, checkpoint) is not training time.
      outputs = jax.device_get([x[2] for x in pending])
      losses = np.asarray([o["loss"] for o in outputs], np.float64)
      t_pause = time.perf_counter()
      bad = np.flatnonzero(~np.isfinite(losses))
      if bad.size:   # never checkpoint or log past a non-finite loss
        bad_step, bad_position, _ = pending[int(bad[0])]
        message = f"non-finite loss {losses[bad[0]]} at step {bad_step}"
        if options.on_nan == "stop" or rollbacks >= MAX_ROLLBACKS:
          writer.write(bad_step, {"event": "nan_stop", "bad_step": bad_step,
                                  "position": bad_position, "rollbacks": rollbacks})
          ckpt.wait()   # a save in flight commits first: the message names what is kept
          latest = ckpt.latest_step()
          kept = (f"the last checkpoint (step {latest}) in {ckpt.directory} is untouched"
                  if latest is not None else f"no checkpoint was saved in {ckpt.directory}")
          raise TrainingError(f"{message} (--on_nan={options.on_nan}"
                              f"{', rollback limit reached' if rollbacks else ''}); {kept}")
        rollbacks += 1
        skip_positions.add(bad_position)
        restored = ckpt.restore(state, collection, require_finite=True, init=fresh_dense,
                                offloaded=offloaded, snapshot_check=snapshot_check)
        if restored is None:      # nothing saved yet: start over from the initial state
          state = state_lib.create(config, collection, options.seed)
          if tier is not None:
            tier.reset()
          train_it.set_state(initial_data_state)
        else:
          state = resume_from(restored)
        step, dense_behind = int(state["step"]), schedules.dense_steps_behind(state)
        log.warning("%s: rolled back to step %d, skipping that batch", message, step)
        writer.write(step, {"event": "nan_rollback", "bad_step": bad_step,
                            "restored_step": step, "skipped_position": bad_position})
        stopper.restore(writer.path if is_main else None, step)
        pending, t_mark, steps_timed, paused = [], None, 0, 0.0
        continue
      record, scalars = {}, {}
      if is_log:
        record["loss"] = float(losses.mean())
        record.update(step_lib.window_record(outputs, config.dense_tx()))
        record.update(sparse_optimizers.logged_rates(collection.optimizer, step,
                                                     [t.name for t in collection.tables]))
        record.update(schedules.logged_rate(
            getattr(config.dense_tx(), "learning_rate", None), step - dense_behind,
            "dense_lr"))
        if steps_timed:
          elapsed = t_pause - t_mark - paused
          record["examples_per_sec"] = steps_timed * config.batch_size / elapsed
          if is_main:   # the plan in the run's first line, `same_plan` after it
            planner.append_profile(workdir, planner.profile_record(
                step, elapsed / steps_timed, None if profiled else plan, info["mesh"],
                steps=steps_timed, batch_size=config.batch_size))
            profiled = True
        if tier_window is not None:   # cache hits, stalls, store reads and writes
          record.update(tier_window.record(step))
        record.update(data_adapter.bad_row_metrics(train_it, eval_data))
        scalars = data_adapter.bad_row_scalars(train=train_it, eval=eval_data)
      logged = {}
      if is_ckpt:   # before the eval: an eval that fails loses no training
        if record:   # and the loss line before both: killed in the eval after the save
          writer.write(step, record, scalars)   # committed, the run resumed past a step
          logged, record, scalars = record, {}, {}   # that had no line
        save_checkpoint(state, step, force=done or stop or stopper.metric is not None,
                        evaluates=is_eval)
      if is_eval:
        try:
          metrics, state = evaluate(eval_step, collection, state, eval_data, bsharding, tier,
                                    stop=eval_stop(terminated, step, done), model=config.model,
                                    predictions=predictions.at(options.predictions, step,
                                                               done or stopper.metric is not None))
          record.update(metrics)
        except EvalStopped as e:   # SIGTERM (or the job's, under scripts/launch.py): the
          # checkpoint below, not the rest of the eval
          state, eval_stopped = e.state, True
        except BaseException as e:   # the window's loss line is kept (Ctrl-C, a bad example)
          if record:
            writer.write(step, record, scalars)
          if isinstance(e, (ConfigError, DataError)):   # e.g. too big for an offload cache
            state = e.state
            if not is_ckpt:   # between checkpoints: keep the steps since the last one
              log.error("the eval of step %d failed: saving checkpoint %d first", step, step)
              save_checkpoint(state, step, force=True, evaluates=True)
              ckpt.wait()
          raise
      late = terminated is not None and terminated.is_set() and not sigterm   # in the eval
      if late or (eval_stopped and not stop):   # or a stop the job's preemption cut it for
        sigterm, stop = sigterm or late, True
        if not is_ckpt:   # owed an eval only if this step had one (a stopped one)
          save_checkpoint(state, step, force=True, evaluates=is_eval)
        if not is_log:   # the steps since the last loss line end here
          record["loss"] = float(losses.mean())
      if record:
        writer.write(step, record, scalars)
      stopper.observe(step, record, writer)   # after the eval's line: the loop ends on a stop
      record = {**logged, **record}
      if is_log:
        progress.update(step, record["loss"], record.get("examples_per_sec"))
        last = dict(record, step=step)
        pending, steps_timed, paused = [], 0, 0.0
      if is_log:
        t_mark = time.perf_counter()
      else:   # the window goes on: leave out this step's eval and checkpoint time
        paused += time.perf_counter() - t_pause
      if stop:
        if not sigterm:   # (a worker's own SIGTERM, reported to the supervisor, said this too)
          preempted = elastic.preempted()
          log.info("stopping after step %d: %s", step,
                   f"the launcher got {preempted}: the job stops" if preempted else   # (Slurm: both)
                   "this worker got a SIGTERM; the elastic supervisor re-plans without it"
                   if elastic.got_sigterm() else "the elastic supervisor asked to re-plan")
          if preempted and is_main:   # as a bare run's SIGTERM stop says it
            writer.write(step, {"event": "terminated", "signal": preempted, "by": "launcher"})
        break
    ckpt.wait()   # the last save committed, older checkpoints rotated out
    prune_snapshots()
    if sigterm and (step < options.num_steps or eval_stopped):
      writer.write(step, {"event": "terminated", "signal": terminated.signal_name})
      during = f"during the eval of step {step}" if eval_stopped else f"after step {step}"
      then = ("evaluates it" if step == options.num_steps else "resumes from it")
      raise terminated.terminated(f"{during}: checkpoint {step} is saved in "
                                  f"{ckpt.directory}; the same command {then}")
  except BaseException as e:   # what `finally` must not hide behind a writer error
    failing = e
    raise
  finally:
    if tier is not None:   # failed before any checkpoint: nothing needs its new stores (a
      tier.close(refused=failing is not None and _no_checkpoint(ckpt))   # cache too small)
    if source is not None:   # its worker processes' prefetched batches (shared memory)
      source.close()
    try:
      ckpt.close()
    finally:   # the metrics and TensorBoard files closed whatever the checkpoints did (a
      try:     # full disk: tensorboardX's exit handler printed its flush's traceback)
        writer.close()
      except OutputError:   # after another error (maybe the same full disk): that one's told
        if failing is None:
          raise
      progress.close()
  return {**last, **stopper.summary()}
