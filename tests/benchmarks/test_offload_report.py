"""`benchmarks/offload.py`: per-step tier figures count the timed steps only."""

import importlib.util
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "benchmarks")
_spec = importlib.util.spec_from_file_location("bench_offload", os.path.join(BENCH, "offload.py"))
bench_offload = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_offload)

KEYS = ("id_hits", "id_lookups", "row_hits", "row_lookups", "stall_s", "plan_s", "install_s",
        "write_s", "store_reads", "buffer_reads", "written_rows", "device_bounces",
        "stale_rows")


class CountingTier:
  """Stands in for `OffloadTier`: every step adds 1 to each counter."""

  def __init__(self):
    self.counts = dict.fromkeys(KEYS, 0)

  def before_step(self, state, batch):
    for k in self.counts:
      self.counts[k] += 1
    return state

  def stats(self):
    return dict(self.counts)

  def pause(self):
    pass

  def close(self):
    pass


def test_untimed_steps_after_the_timed_ones_are_not_counted_per_step():
  from jaxrec.data.batch import Batch
  from jaxrec.sharding.mesh import batch_sharding, make_mesh

  run = bench_offload.Run.__new__(bench_offload.Run)   # no model: only the bookkeeping
  batch = Batch(np.zeros((4, 13), np.float32), np.zeros(4, np.float32),
                {"f0": np.zeros((4, 1), np.int32)})
  run.it = iter(lambda: batch, None)
  run.bs = batch_sharding(make_mesh({"data": 1}, jax.devices()[:1]))
  run.coll = types.SimpleNamespace(pack_batch=lambda b: b)   # placed as the trainer does
  run.step = lambda state, b: (state, {"loss": jnp.float32(0.5)})
  run.state, run.tier, run.seconds, run.steps, run.warmup_s = None, CountingTier(), 0.0, 0, 0.0
  run.cpu = {}
  run.stats0 = run.stats1 = run.tier.stats()
  run.train(4)
  run.train(6, timed=False)    # e.g. the snapshot timing's steps
  out = run.report(batch=4)
  assert out["store_reads_per_step"] == 1.0
  assert out["stall_ms_per_step"] == 1e3 and out["written_rows"] == 4
  assert set(out["cpu_ms_per_step"]) <= {"xla", "tensorstore", "python", "other"}


def test_thread_cpu_is_summed_by_thread_group():
  """A busy Python thread shows under `python` (read while it lives: an ended thread's
  time is gone from /proc); no group goes down."""
  import threading
  import time
  from common import thread_cpu_delta, thread_cpu_seconds   # benchmarks/ is on the path
  before = thread_cpu_seconds()
  if not before:
    return   # not Linux: nothing to read
  spun, done = threading.Event(), threading.Event()

  def spin():   # 0.3 s of this thread's own CPU (other threads may be busy too)
    stop = time.thread_time() + 0.3
    while time.thread_time() < stop:
      pass
    spun.set()
    done.wait()
  t = threading.Thread(target=spin)
  t.start()
  spun.wait()
  after = thread_cpu_seconds()
  done.set()
  t.join()
  delta = thread_cpu_delta(before, after)
  assert delta["python"] >= 0.1
  assert all(v >= 0 for v in delta.values())


def test_fill_cache_gives_up_after_its_limit():
  calls = []
  with pytest.raises(SystemExit, match="the cache did not fill in 30 steps"):
    bench_offload.fill_cache(lambda: calls.append(1), lambda: False, 3)
  assert len(calls) == 3   # was an endless loop


def test_fill_cache_stops_once_full():
  calls = []
  bench_offload.fill_cache(lambda: calls.append(1), lambda: len(calls) >= 2, 100)
  assert len(calls) == 2
