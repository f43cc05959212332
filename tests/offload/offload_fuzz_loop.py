"""The trainer's steps that the offload fuzz (`test_offload_fuzz`) runs by hand: a checkpoint
save as `loop.save_checkpoint` makes it, the `--on_nan=rollback` loop of
`loop._train_and_evaluate` (a non-finite loss rolls back to the last checkpoint, or to the
initial state, on the live tier, and skips that batch), and a slow eviction fetcher."""

from __future__ import annotations

import os
import time

import numpy as np

from jaxrec.checkpoint import CheckpointManager
from jaxrec.train import state as state_lib


def save(run, ckpt: CheckpointManager, step: int, workdir: str) -> None:
  """What the trainer's `save_checkpoint` does: flush and snapshot, then the checkpoint."""
  snaps = os.path.join(workdir, "offload_snapshots")
  run.tier.save(run.state, step, snaps)
  meta = {"offload": {"snapshots": snaps, "tables": {
      n: {"rows": t.spec.rows, "cache_rows": t.cache.cache_rows, "auto": False,
          "path": t.store.path} for n, t in run.tier.tables.items()}}}
  ckpt.save(step, run.state, run.collection, data_state=run.it.get_state(), meta=meta,
            force=True)
  ckpt.wait()


def slow_fetches(tier, delay: float, stall: int, idle: float = 3.0) -> None:
  """Delays each eviction's copy into the host buffer (the fetcher's `HostBuffer.put`) by
  `delay` s and, from fetch number `stall` (from 1) on, holds the fetcher, as a stalled
  host link would, until the planner waited for a fetch (it found a batch's rows in more
  evictions in flight than an install copies from: the `fetch_waits` path; then no more
  holds) or no install came for `idle` s (the run waits for the fetcher: a flush, an eval,
  the end; the next hold comes after the next install)."""
  count, quiet = [0], [None]   # fetches; `install_s` when a hold last ended idle
  for t in tier.tables.values():
    def put(rows, values, put=t.buffer.put):
      count[0] += 1
      installs, last = tier.stats().get("install_s"), time.monotonic()
      while (count[0] >= stall and installs != quiet[0]
             and not tier.stats().get("fetch_waits")):
        now = time.monotonic()
        if now > last + idle:
          quiet[0] = installs
          break
        if tier.stats().get("install_s") != installs:
          installs, last = tier.stats().get("install_s"), now
        time.sleep(0.01)
      time.sleep(delay)
      put(rows, values)
    t.buffer.put = put


def train_rolling_back(run, case, workdir: str) -> dict:
  """Trains `case` (variant `rollback`) on `run` (offloaded) as the trainer does with
  `--on_nan=rollback`: a checkpoint every `case.ckpt_every` steps, the losses checked at
  every checkpoint and every `case.log_every` steps; a non-finite one restores the last
  checkpoint (`ckpt.restore(require_finite=True)`, then the tier's snapshot and the data
  state, as `resume_from`) or, with none, the initial state (`tier.reset()`), and skips
  that batch from then on (its rows still installed, the step not run). Returns counts of
  what happened (`{"rollbacks to checkpoint": n, ...}`)."""
  steps = len(case.train_batches)
  initial = run.it.get_state()
  skip, pending, step, seen = set(), [], 0, {}
  offloaded = {n: t.spec for n, t in run.tier.tables.items()}
  with CheckpointManager(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
    while step < steps:
      position = run.it.get_state()["i"]
      batch = next(run.it)
      run.state = run.tier.before_step(run.state, batch)
      if position in skip:
        continue
      run.collection.check_ids(batch.ids)
      run.state, metrics = run.step_fn(run.state, run.put(batch), *run.tier.step_args())
      step += 1
      run.losses.append(float(metrics["loss"]))
      pending.append(position)
      done = step == steps
      is_ckpt = done or (case.ckpt_every and step % case.ckpt_every == 0)
      if not (is_ckpt or step % case.log_every == 0):
        continue
      bad = np.flatnonzero(~np.isfinite(run.losses[-len(pending):]))
      if bad.size:
        skip.add(pending[int(bad[0])])
        restored = ckpt.restore(run.state, run.collection, require_finite=True,
                                offloaded=offloaded)
        if restored is None:
          run.state = state_lib.create(case.config(), run.collection, 0)
          run.tier.reset()
          run.it.set_state(initial)
          what = "rollbacks to the start"
        else:
          at = int(restored.state["step"])
          run.tier.restore(at, os.path.join(workdir, "offload_snapshots"),
                           restored.host_tables)
          run.it.set_state(restored.data_state)
          run.state = restored.state
          what = "rollbacks to a checkpoint"
        seen[what] = seen.get(what, 0) + 1
        step = int(run.state["step"])
        del run.losses[step:]
        pending = []
        continue
      pending = []
      if is_ckpt and not done:
        save(run, ckpt, step, workdir)
  return seen
