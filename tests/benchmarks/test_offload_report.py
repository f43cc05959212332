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
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  run.bs = batch_sharding(mesh)
  run.coll = types.SimpleNamespace(pack_batch=lambda b: b, mesh=mesh)   # placed as the trainer does
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


def test_runs_without_the_ratios_base_say_so(monkeypatch, tmp_path, capsys):
  """`--runs offload,sync` printed its run lines and no summary, without a word (and left
  out the `--snapshot_steps` timing silently with no offload run)."""
  import json  # pylint: disable=import-outside-toplevel

  class FakeRun:
    def __init__(self, args, data, off):
      del args, data, off

    def train(self, n):
      del n

    def report(self, batch):
      del batch
      return {"examples_per_sec": 100.0}

  monkeypatch.setattr(bench_offload, "Run", FakeRun)
  args = types.SimpleNamespace(rows=1000, batch=8, cache_fraction=0.1, zipf=1.1, dim=4,
                               optimizer="sgd", driver="zarr3", chunk_rows=16, shard_rows=None,
                               kvstore="file", prefetch=2, staleness=0, host_buffer_rows=None,
                               rounds=1, steps=1, snapshot_steps=0, runs="offload,sync")
  bench_offload.measure(args, None, str(tmp_path))
  out = capsys.readouterr()
  lines = [json.loads(line) for line in out.out.splitlines()]
  assert [line.get("run") for line in lines] == ["offload", "sync", None]
  assert lines[-1]["ratio"] is None and lines[-1]["note"] == "no ratio: --runs has no device run"
  args.runs, args.snapshot_steps = "device,sync", 5
  bench_offload.measure(args, None, str(tmp_path))
  out = capsys.readouterr()
  assert json.loads(out.out.splitlines()[-1])["note"] == "no ratio: --runs has no offload run"
  assert "no snapshot timing (--snapshot_steps): --runs has no offload run" in out.err
