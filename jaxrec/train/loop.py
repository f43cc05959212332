"""`train_and_evaluate`: the whole run, readable top to bottom.

mesh + plan → embedding collection → state (fresh or restored) → data → jitted steps →
loop (log, eval, checkpoint) → final eval and checkpoint. Writes into the workdir:
`config.gin`, `plan.json`, `metrics.jsonl`, `tb/`, `checkpoints/`, `profile.jsonl`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxrec.data.batch import Batch
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.errors import ConfigError, JaxrecError
from jaxrec import planner
from jaxrec.sharding import mesh as mesh_lib
from jaxrec.sharding.plan import Plan, uniform_plan
from jaxrec.train import data_adapter, plan_choice
from jaxrec.train import state as state_lib
from jaxrec.train import step as step_lib
from jaxrec.train.config import ExperimentConfig, RunOptions
from jaxrec.train.metrics import EvalAccumulator
from jaxrec.train.writers import MetricsWriter, Progress

log = logging.getLogger("jaxrec")


class TrainingError(JaxrecError):
  """Training cannot go on (e.g. non-finite loss under `--on_nan=stop`)."""


def check_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir: '{workdir}' exists and is not a directory")
  os.makedirs(workdir, exist_ok=True)


def setup(config: ExperimentConfig, options: RunOptions, devices=None
          ) -> tuple[EmbeddingCollection, Plan, dict]:
  """Mesh, plan and embedding collection; every check that can fail runs here, before
  anything is compiled."""
  options.validate()
  devices = list(jax.devices() if devices is None else devices)
  if options.mesh == "auto":
    shape = mesh_lib.auto_mesh_shape(options.plan if options.plan != "auto" else "dp",
                                     len(devices))
  else:
    shape = mesh_lib.parse_mesh_spec(options.mesh, len(devices))
  config.validate(math.prod(shape.values()))
  mesh = mesh_lib.make_mesh(shape, devices)
  plan, result = plan_choice.choose(config, options, shape)
  collection = EmbeddingCollection.create(config.tables, config.features, plan, mesh,
                                          config.sparse_tx())
  return collection, plan, {"mesh": shape, "plan_result": result}


def _put(batch: Batch, sharding) -> Batch:
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def evaluate(eval_step, state, eval_data, sharding) -> dict[str, Any]:
  """Exact AUC / logloss over the whole eval set (padding masked out)."""
  acc = EvalAccumulator()
  for batch, mask in eval_data:
    logits = np.asarray(eval_step(state, _put(batch, sharding)))   # global [B], replicated
    labels, mask = batch.labels, mask
    if jax.process_count() > 1:
      labels, mask = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                      for x in (labels, mask))
    acc.add(logits, labels, mask > 0)
  return acc.result()


def train_and_evaluate(config: ExperimentConfig, options: RunOptions, workdir: str
                       ) -> dict[str, Any]:
  """Trains for `options.num_steps` steps (resuming from `workdir` if it has checkpoints).

  Returns the last logged metrics (with the final eval's keys).
  """
  check_workdir(workdir)
  collection, plan, info = setup(config, options)
  is_main = jax.process_index() == 0
  mesh = collection.mesh
  if is_main:
    with open(os.path.join(workdir, "plan.json"), "w") as f:
      json.dump(info["plan_result"].to_json(), f, indent=2, sort_keys=True)
    log.info("mesh %s, plan (--plan=%s):\n%s", mesh_lib.format_mesh(info["mesh"]),
             options.plan, info["plan_result"].report())

  state = state_lib.create(config, collection, options.seed)
  shardings = state_lib.shardings(state, collection)
  train_it = data_adapter.train_iterator(config, options)
  ckpt = data_adapter.checkpointer(workdir, options)
  start = 0
  if ckpt is not None:
    restored = ckpt.restore_latest(state, collection)
    if restored is not None:
      state, data_state = restored
      train_it.set_state(data_state)
      start = int(state["step"])
      log.info("resumed from step %d in %s", start, workdir)
  if is_main:
    with open(os.path.join(workdir, "config.gin"), "w") as f:
      f.write(gin.operative_config_str())

  train_step = step_lib.make_train_step(config, collection, shardings)
  eval_step = step_lib.make_eval_step(config, collection, shardings)
  eval_data = data_adapter.eval_data(config, options)
  bsharding = mesh_lib.batch_sharding(mesh)
  writer = MetricsWriter(workdir, enabled=is_main)
  progress = Progress(options.num_steps, start, enabled=None if options.progress else False)
  write_profile = is_main

  last: dict[str, Any] = {}
  pending: list[jax.Array] = []
  t_mark, steps_timed, paused = None, 0, 0.0   # paused: eval seconds inside the window
  try:
    step = start
    while step < options.num_steps:
      batch = next(train_it)
      collection.check_ids(batch.ids)
      state, metrics = train_step(state, _put(batch, bsharding))
      pending.append(metrics["loss"])
      step += 1
      if t_mark is None:          # the first step compiles; time from its end
        jax.block_until_ready(metrics["loss"])
        t_mark, steps_timed = time.perf_counter(), 0
      else:
        steps_timed += 1
      done = step == options.num_steps
      if step % options.log_every == 0 or done:
        losses = np.asarray(jax.device_get(pending), np.float64)
        now = time.perf_counter()
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
          first = step - len(losses) + 1 + int(bad[0])
          raise TrainingError(f"non-finite loss {losses[bad[0]]} at step {first} "
                              f"(--on_nan={options.on_nan})")
        record = {"loss": float(losses.mean())}
        if steps_timed:
          elapsed = now - t_mark - paused
          record["examples_per_sec"] = steps_timed * config.batch_size / elapsed
          if write_profile:
            planner.append_profile(workdir, planner.profile_record(
                step, elapsed / steps_timed, plan, info["mesh"], steps=steps_timed,
                batch_size=config.batch_size))
        record.update(data_adapter.bad_row_metrics(train_it, eval_data))
        if (options.eval_every and step % options.eval_every == 0) or done:
          record.update(evaluate(eval_step, state, eval_data, bsharding))
        pending, t_mark, steps_timed, paused = [], time.perf_counter(), 0, 0.0
        writer.write(step, record)
        progress.update(step, record["loss"], record.get("examples_per_sec"))
        last = dict(record, step=step)
      elif options.eval_every and step % options.eval_every == 0:
        t_eval = time.perf_counter()
        writer.write(step, evaluate(eval_step, state, eval_data, bsharding))
        paused += time.perf_counter() - t_eval
      if ckpt is not None and ((options.checkpoint_every and step % options.checkpoint_every == 0)
                               or done):
        ckpt.save(step, state, collection, train_it.get_state())
  finally:
    if ckpt is not None:
      ckpt.close()
    writer.close()
    progress.close()
  return last
