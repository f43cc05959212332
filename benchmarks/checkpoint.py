#!/usr/bin/env python3
"""Checkpoint cost: how long one asynchronous save blocks the training loop, in steps.

Trains `configs/dlrm_criteo.gin` (26 tables x 100,000 rows x dim 16, DLRM dense part,
batch 512, SGD) with the real trainer pieces (`jaxrec.train`: setup, state, jitted step,
data iterator) and measures:

  step_s            median step time (batch preparation included, blocked until ready)
  save_blocked_s    median time `CheckpointManager.save` keeps the loop waiting (copy of
                    the state to host; the files are written in the background)
  ratio             save_blocked_s / step_s; goal: <= 2 (a save costs at most two steps)
  background_step_s  median step time while a save is being written (contention)
  save_total_steps  what a save costs a loop that waits for it 3 steps on, in steps: the
                    time from the save through 3 steps and the rest of its write, less 3
                    steps (`ratio` counts only the time it blocks; the write competes
                    with the steps for the CPU: 59 steps' time for 155 MB on 2 loaded cores)
  save_s            one save start to commit, with nothing else running
  restore_s         restore of the latest checkpoint onto the same mesh and plan (cold:
                    includes compilation, as after a restart)
  restore_other_s   restore onto half the devices (with --devices > 1)
  bytes             size of one checkpoint on disk

  .venv/bin/python benchmarks/checkpoint.py [--devices=8 --mesh=row=8 --plan=rw] [--saves=3]

Prints one JSON line: {"benchmark": "checkpoint", "ratio": ..., "goal": 2, ...}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# numpy only: before jax sees XLA_FLAGS
from common import (HelpFormatter, check_at_least, check_dir_flag, interruptible, own_dir,
                    scratch_dir)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_FILE = os.path.join(ROOT, "configs", "dlrm_criteo.gin")
MARKER = ".checkpoint_benchmark"   # in --workdir's checkpoints/: this benchmark's (emptied)


def _args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=HelpFormatter)
  p.add_argument("--devices", type=int, default=1, help="host (CPU) devices to simulate")
  p.add_argument("--mesh", default="auto",
                 help='--mesh of the timed run (scripts/train.py form)')
  p.add_argument("--plan", default="dp",
                 help='--plan of the timed run: a kind or auto')
  p.add_argument("--steps", type=int, default=20, help="steps timed for step_s")
  p.add_argument("--saves", type=int, default=3, help="saves timed for save_blocked_s")
  p.add_argument("--device_copy", default="auto", choices=("auto", "true", "false"),
                 help="CheckpointManager.device_copy: copy the tables on their devices and "
                 "to host in the background (auto: where devices have room; never on CPU)")
  p.add_argument("--workdir", default=None,
                 help="where to write: its checkpoints/ must be new, empty or of an earlier "
                 "run of this benchmark (it is emptied) (default: a temp dir, removed)")
  p.add_argument("--gin_bindings", action="append", default=[],
                 help='extra gin binding (repeatable)')
  args = p.parse_args()
  check_at_least(p.error, vars(args), ("devices", "steps", "saves"))
  if args.workdir is not None:   # before the training (a file failed after it)
    check_dir_flag(p.error, "workdir", args.workdir)
    own_dir(p.error, "workdir", os.path.join(args.workdir, "checkpoints"), MARKER)
  return p, args


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main():
  parser, args = _args()
  with scratch_dir(args.workdir, "jaxrec_ckpt_bench_") as workdir:
    _run(parser, args, os.path.join(workdir, "checkpoints"))


def _run(parser, args, ckpt_dir):
  """Trains, times the saves and restores into `ckpt_dir`, prints the JSON line."""
  if args.devices > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import gin
  import jax
  from absl import logging as absl_logging
  from common import emit
  from jaxrec.checkpoint import CheckpointManager
  from jaxrec.errors import JaxrecError
  from jaxrec.sharding import mesh as mesh_lib
  from jaxrec.train import data_adapter, loop
  from jaxrec.train import state as state_lib
  from jaxrec.train import step as step_lib
  from jaxrec.train.config import ExperimentConfig, RunOptions

  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    gin.parse_config_files_and_bindings([GIN_FILE], args.gin_bindings)
    config = ExperimentConfig()
  except (ValueError, TypeError) as e:   # gin: unknown configurable, bad value
    parser.error(f"--gin_bindings: {str(e).strip().splitlines()[0]}")
  options = RunOptions(mesh=args.mesh, plan=args.plan, progress=False)
  devices = jax.devices()   # XLA_FLAGS may have set another count before this script did
  if len(devices) < args.devices:
    parser.error(f"--devices={args.devices}: this process has {len(devices)} (XLA_FLAGS)")
  devices = devices[:args.devices]
  try:
    collection, plan, info = loop.setup(config, options, devices=devices)
  except JaxrecError as e:   # a bad --mesh or --plan names its flag
    parser.error(str(e))
  state = state_lib.create(config, collection, 0)
  train_step = step_lib.make_train_step(config, collection,
                                        state_lib.shardings(state, collection))
  it = data_adapter.train_iterator(config, options)
  bsharding = mesh_lib.batch_sharding(collection.mesh)

  def run_step(state):
    t0 = time.perf_counter()
    batch = loop.device_batch(collection, next(it), bsharding)
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics["loss"])
    return state, time.perf_counter() - t0

  for _ in range(3):
    state, _ = run_step(state)
  step_times = []
  for _ in range(args.steps):
    state, dt = run_step(state)
    step_times.append(dt)
  step_s = statistics.median(step_times)

  meta = {"plan": plan.to_json(), "mesh": info["mesh"]}
  step = 3 + args.steps
  blocked, background = [], []
  device_copy = {"auto": "auto", "true": True, "false": False}[args.device_copy]
  with CheckpointManager(ckpt_dir, max_to_keep=2, device_copy=device_copy) as mgr:
    device_copy_used = mgr.copies_on_device(state["emb"])
    t0 = time.perf_counter()
    mgr.save(step, state, collection, data_state=it.get_state(), meta=meta, force=True)
    first_blocked = time.perf_counter() - t0          # includes one-time compilation
    mgr.wait()
    totals = []
    for _ in range(args.saves):
      state, _ = run_step(state)
      step += 1
      t0 = time.perf_counter()
      mgr.save(step, state, collection, data_state=it.get_state(), meta=meta, force=True)
      blocked.append(time.perf_counter() - t0)
      for _ in range(3):   # the loop goes on while the save is written
        state, dt = run_step(state)
        step += 1
        background.append(dt)
      mgr.wait()   # the rest of the write: on 2 CPU cores it competes with the steps
      totals.append(time.perf_counter() - t0)
    state, _ = run_step(state)
    step += 1
    t0 = time.perf_counter()
    mgr.save(step, state, collection, data_state=it.get_state(), meta=meta, force=True)
    mgr.wait()
    save_s = time.perf_counter() - t0
    size = _du(str(mgr.step_dir(step)))

  template = state_lib.create(config, collection, 1)
  with CheckpointManager(ckpt_dir) as mgr:
    t0 = time.perf_counter()
    restored = mgr.restore(template, collection)
    jax.block_until_ready(restored.state)
    restore_s = time.perf_counter() - t0
  assert int(restored.state["step"]) == step
  del restored, template

  restore_other_s = None
  n = len(devices)
  if n > 1:
    half = devices[:n // 2]
    other, _, _ = loop.setup(config, RunOptions(mesh="auto", plan=args.plan, progress=False),
                             devices=half)
    template = state_lib.create(config, other, 1)
    with CheckpointManager(ckpt_dir) as mgr:
      t0 = time.perf_counter()
      jax.block_until_ready(mgr.restore(template, other).state)
      restore_other_s = time.perf_counter() - t0

  blocked_s = statistics.median(blocked)
  emit("checkpoint", ratio=round(blocked_s / step_s, 3), goal=2, goal_op="<=",
       ratio_meaning="save_blocked_s / step_s (lower is better)",
       step_s=round(step_s, 4), save_blocked_s=round(blocked_s, 4),
       save_blocked_runs_s=[round(b, 4) for b in blocked],
       first_save_blocked_s=round(first_blocked, 4),
       background_step_s=round(statistics.median(background), 4),
       save_total_steps=round((statistics.median(totals) - 3 * step_s) / step_s, 2),
       save_s=round(save_s, 3), restore_s=round(restore_s, 3),
       restore_other_s=None if restore_other_s is None else round(restore_other_s, 3),
       bytes=size, devices=n, mesh=info["mesh"], plan=args.plan,
       device_copy=args.device_copy, device_copy_used=device_copy_used,
       tables=len(collection.tables), platform=jax.devices()[0].platform)


if __name__ == "__main__":
  interruptible(main)()   # Ctrl-C: one line, exit 130
