#!/usr/bin/env python3
"""Offloaded table vs all-on-device: DLRM training throughput.

DLRM (the `dlrm_criteo.gin` network) with 26 one-hot features: `f0` reads one large table
(`--rows`, ids Zipf(`--zipf`) over its rows, hot ids spread over the table by a fixed
permutation), `f1..f25` read 100,000-row tables. Runs (`--runs`), each on the same id stream:

  device    every table on the device (the reference)
  offload   the large table offloaded: device cache of `--cache_fraction` of its rows, the
            full table (and optimizer state) in tensorstore arrays on local disk
            (`--store_dir`), host write-back buffer as large as the cache, prefetch
            depth `--prefetch`, S = 0 (exact)
  sync      the same with prefetch off (K = 0: planning and reads on the training thread)
  stale     the same as offload with bounded staleness S = `--staleness`

Each offloaded run first trains until its cache is full (steady state: every step evicts),
then `--warmup` more steps (every run); then all runs are timed in `--rounds` interleaved
blocks of `--steps / --rounds` steps, so that load from other processes on the machine
hits every run alike; a block ends when its run's background writes have (`tier.pause()`),
so each run pays for its own write-backs and none runs during another's block. The id
stream is precomputed (a long stream for the large table, `--stream_steps` batches, so the
cache sees fresh rows all along; small tables, dense features and labels cycle a pool):
the runs measure training, not data generation. Prints one line per run and a summary line with
`"ratio"` (offload / device examples per second) and `"goal": 0.8`; also the cache hit
rate (id occurrences and distinct rows), prefetch stall milliseconds per step, and
`"ratio_sync"` (prefetch off) and `"ratio_stale"` (without a `device` or an `offload` run
in `--runs`: `"ratio": null` and a `"note"`). Each run's line has
`"cpu_ms_per_step"`: CPU time of the process's threads in its timed blocks, by group
(`xla`, `tensorstore`, `python`: every Python thread, `other`; Linux only): on a host
whose cores the step already fills, that is where an offloaded run's extra time goes.
The store is `--driver` (default zarr3, `--shard_rows` rows a file) with `--chunk_rows`.

Then (`--snapshot_steps` > 0) the `offload` run's checkpoint snapshots: one line
(`"run": "snapshot"`) with the seconds of a first snapshot (every chunk file read for its
CRC32), of a second one `--snapshot_steps` steps later (only the chunk files written since
are read), the fraction of files that changed, and the seconds a restore spends checking
the snapshot (every file read and compared).
"""

import argparse
import json
import os
import sys
import time

from common import (HelpFormatter, check_at_least, check_dir_flag, emit, interruptible, scratch_dir,
                    thread_cpu_delta, thread_cpu_seconds)

import jax
import numpy as np

from jaxrec import offload
from jaxrec.offload import snapshots
from jaxrec.offload.config import KVSTORES
from jaxrec.errors import ConfigError
from jaxrec.data.batch import Batch
from jaxrec.embedding import optimizers
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.models import DLRM
from jaxrec.sharding.mesh import batch_sharding, make_mesh
from jaxrec.sharding.plan import uniform_plan
from jaxrec.train import loop
from jaxrec.train import state as state_lib
from jaxrec.train import step as step_lib
from jaxrec.train.config import ExperimentConfig, dense_optimizer

SMALL_ROWS, NUM_SMALL, POOL = 100_000, 25, 32


def zipf_ids(rows, n, exponent, rng):
  """`n` ids: Zipf ranks over `[0, rows)` (inverse CDF), spread by a fixed permutation."""
  w = np.arange(1, rows + 1, dtype=np.float64) ** -exponent
  cdf = np.cumsum(w)
  cdf /= cdf[-1]
  ranks = np.searchsorted(cdf, rng.random(n)).astype(np.int64)
  mult = 2_654_435_761 % rows
  while np.gcd(mult, rows) != 1:
    mult += 1
  return ((ranks * mult + 12345) % rows).astype(np.int32)


class StreamIterator:
  """Endless precomputed batches (see module docstring); resumable by position."""

  def __init__(self, big_ids, batch, pool):
    self.big, self.batch, self.pool, self.pos = big_ids, batch, pool, 0

  def __next__(self):
    k = self.pos
    self.pos += 1
    b = self.pool[k % len(self.pool)]
    steps = len(self.big) // self.batch
    start = (k % steps) * self.batch
    ids = dict(b.ids, f0=self.big[start:start + self.batch, None])
    return Batch(b.dense, b.labels, ids)

  def get_state(self):
    return {"position": self.pos}

  def set_state(self, s):
    self.pos = int(s["position"])


def make_data(args, rng):
  total = args.stream_steps * args.batch
  big = zipf_ids(args.rows, total, args.zipf, rng)
  pool = []
  for _ in range(POOL):
    ids = {f"f{i}": zipf_ids(SMALL_ROWS, args.batch, args.zipf, rng)[:, None]
           for i in range(1, NUM_SMALL + 1)}
    pool.append(Batch(rng.random((args.batch, 13), np.float32),
                      (rng.random(args.batch) < 0.26).astype(np.float32), ids))
  return big, pool


def fill_cache(train_10, full, limit: int) -> None:
  """Calls `train_10` (10 steps) until `full()`, at most `limit` times: a stream with fewer
  distinct ids than cache rows never fills it (the loop spun forever)."""
  for _ in range(limit):
    if full():
      return
    train_10()
  if not full():
    raise SystemExit(f"error: the cache did not fill in {limit * 10} steps (a pass over the "
                     "id stream): raise --stream_steps or lower --cache_fraction")


def check_stream(error, args, big) -> None:
  """`error(message)` when the id stream has fewer distinct ids than cache rows: the cache
  would never fill (the warm-up waits for a full cache)."""
  cache_rows = int(args.rows * args.cache_fraction)
  distinct = len(np.unique(big))
  if distinct < cache_rows:
    error(f"--stream_steps={args.stream_steps} x --batch={args.batch} ids hold {distinct} "
          f"distinct rows, fewer than the cache's {cache_rows} (--rows x --cache_fraction="
          f"{args.cache_fraction}): raise --stream_steps or lower --cache_fraction")


class Run:
  """One configuration, built and warmed up once; `train(n)` times `n` more steps."""

  def __init__(self, args, data, off=None):
    tables = [TableSpec("big", args.rows, args.dim)] + [
        TableSpec(f"t{i}", SMALL_ROWS, args.dim) for i in range(1, NUM_SMALL + 1)]
    features = [FeatureSpec("f0", "big")] + [FeatureSpec(f"f{i}", f"t{i}")
                                             for i in range(1, NUM_SMALL + 1)]
    sparse = optimizers.sparse_optimizer(args.optimizer)
    config = ExperimentConfig(embedding=(tables, features),
                              model=DLRM((512, 256, 64, args.dim), (512, 256, 1)),
                              batch_size=args.batch, dense_optimizer=dense_optimizer("sgd", 0.1),
                              sparse_optimizer=sparse)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    dev_tables = tables if off is None else offload.device_tables(tables, off, sparse)
    coll = EmbeddingCollection.create(dev_tables, features, uniform_plan("dp", dev_tables, 1),
                                      mesh, sparse)
    self.coll = coll
    self.state = state_lib.create(config, coll, 0)
    self.step = step_lib.make_train_step(config, coll, state_lib.shardings(self.state, coll))
    self.bs = batch_sharding(mesh)
    self.it = StreamIterator(data[0], args.batch, data[1])
    self.tier = None
    if off is not None:
      self.tier = offload.OffloadTier(coll, tables, off, key=offload.emb_init_key(0))
      self.it = self.tier.wrap(self.it)
    self.seconds, self.steps, self.loss = 0.0, 0, None
    self.cpu: dict[str, float] = {}   # thread group -> CPU seconds in the timed blocks
    t0 = time.perf_counter()
    if self.tier is not None:             # until the cache is full: steady state
      fill_cache(lambda: self.train(10, timed=False), self.cache_full,
                 args.stream_steps // 10 + 2)
    self.train(args.warmup, timed=False)  # then compile what evictions use
    self.warmup_s = time.perf_counter() - t0
    self.stats0 = self.stats1 = self.tier.stats() if self.tier else {}

  def cache_full(self) -> bool:
    """Whether every cache slot of every offloaded table holds a row."""
    return all((t.resident >= 0).all() for t in self.tier.tables.values())

  def train(self, n, timed=True):
    cpu0 = thread_cpu_seconds()   # read before the clock starts: not in the step time
    t0 = time.perf_counter()
    loss = None
    for _ in range(n):
      batch = next(self.it)
      if self.tier is not None:
        self.state = self.tier.before_step(self.state, batch)
      batch = loop.device_batch(self.coll, batch, self.bs)   # as the trainer places it
      self.state, metrics = self.step(self.state, batch)
      loss = metrics["loss"]
    self.loss = float(jax.block_until_ready(loss))
    if self.tier is not None:
      self.tier.pause()     # its background writes end inside its own time
    if timed:
      self.seconds += time.perf_counter() - t0
      self.steps += n
      for group, sec in thread_cpu_delta(cpu0, thread_cpu_seconds()).items():
        self.cpu[group] = self.cpu.get(group, 0.0) + sec
      # The tier's counters at the end of the timed steps: untimed steps after them (the
      # snapshot timing) must not count in the per-step figures.
      self.stats1 = self.tier.stats() if self.tier else {}

  def report(self, batch):
    out = {"examples_per_sec": round(self.steps * batch / self.seconds, 1),
           "step_ms": round(self.seconds / self.steps * 1e3, 3), "loss": round(self.loss, 4),
           "warmup_s": round(self.warmup_s, 1),
           "cpu_ms_per_step": {g: round(sec / self.steps * 1e3, 2)
                               for g, sec in sorted(self.cpu.items())}}
    if self.tier is not None:
      self.tier.close()
      d = {k: v - self.stats0.get(k, 0) for k, v in self.stats1.items()}
      per_step = lambda k: d.get(k, 0) / self.steps
      out.update(hit_rate=round(d["id_hits"] / max(1, d["id_lookups"]), 4),
                 row_hit_rate=round(d["row_hits"] / max(1, d["row_lookups"]), 4),
                 stall_ms_per_step=round(per_step("stall_s") * 1e3, 3),
                 plan_ms_per_step=round(per_step("plan_s") * 1e3, 3),
                 install_ms_per_step=round(per_step("install_s") * 1e3, 3),
                 write_ms_per_step=round(per_step("write_s") * 1e3, 3),
                 store_reads_per_step=round(per_step("store_reads"), 1),
                 buffer_reads_per_step=round(per_step("buffer_reads"), 1),
                 written_rows=int(d.get("written_rows", 0)),
                 device_bounces_per_step=round(per_step("device_bounces"), 2),
                 stale_rows=int(d.get("stale_rows", 0)))
    return out


def time_snapshots(run: Run, steps: int, directory: str) -> dict:
  """Seconds of two checkpoint snapshots `steps` apart and of checking the second."""
  run.tier.pause()
  t0 = time.perf_counter()
  run.tier.save(run.state, 1, directory)
  first = time.perf_counter() - t0
  run.train(steps, timed=False)
  t0 = time.perf_counter()
  path = run.tier.save(run.state, 2, directory)
  second = time.perf_counter() - t0
  t0 = time.perf_counter()
  snapshots.open_table(path, "big")
  check = time.perf_counter() - t0
  files = {}
  for step in (1, 2):
    with open(os.path.join(directory, str(step), snapshots.META)) as f:
      files[step] = json.load(f)["tables"]["big"]["files"]
  changed = sum(files[1].get(k, {}).get("ino") != v["ino"] for k, v in files[2].items())
  size = sum(v["size"] for v in files[2].values())
  return {"snapshot_mib": round(size / 2**20, 1), "files": len(files[2]),
          "first_snapshot_s": round(first, 3), "second_snapshot_s": round(second, 3),
          "changed_files": round(changed / len(files[2]), 3), "steps_between": steps,
          "restore_check_s": round(check, 3), "path": path}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=HelpFormatter)
  p.add_argument("--rows", type=int, default=1_000_000,
                 help='rows of the large table f0 reads')
  p.add_argument("--dim", type=int, default=16,
                 help='embedding dimension')
  p.add_argument("--batch", type=int, default=1024,
                 help='examples per step')
  p.add_argument("--cache_fraction", type=float, default=0.1,
                 help='device cache of the offloaded table, as a fraction of its rows')
  p.add_argument("--zipf", type=float, default=1.05,
                 help="Zipf exponent of the large table's ids")
  p.add_argument("--prefetch", type=int, default=4,
                 help="batches read ahead (OffloadConfig.prefetch_depth) in the offload and "
                 "stale runs")
  p.add_argument("--staleness", type=int, default=8,
                 help='OffloadConfig.max_staleness of the stale run')
  p.add_argument("--optimizer", default="sgd",
                 help='sparse optimizer (jaxrec.embedding.optimizers.OPTIMIZERS)')
  p.add_argument("--warmup", type=int, default=50,
                 help='untimed steps after the cache is full')
  p.add_argument("--steps", type=int, default=300,
                 help='timed steps per run')
  p.add_argument("--rounds", type=int, default=5,
                 help='interleaved timed blocks (of --steps / --rounds steps)')
  p.add_argument("--host_buffer_rows", type=int, default=None,
                 help="rows of the host write-back buffer (default: the cache size)")
  p.add_argument("--stream_steps", type=int, default=3000,
                 help='batches of precomputed ids for the large table')
  p.add_argument("--chunk_rows", type=int, default=256,
                 help='rows per tensorstore chunk')
  p.add_argument("--driver", default="zarr3",
                 help="tensorstore driver of the offloaded table (zarr, zarr3)")
  p.add_argument("--shard_rows", type=int, default=None,
                 help="zarr3: rows per file (default: OffloadTable's, 16 chunks)")
  p.add_argument("--kvstore", default="file",
                 help="tensorstore kvstore driver of the offloaded table "
                 "(jaxrec.offload.config.KVSTORES)")
  p.add_argument("--store_dir", default=None,
                 help="directory of the offloaded table's store (default: a temp dir)")
  p.add_argument("--runs", default="device,offload,sync,stale",
                 help="comma list of runs: device (the table on the device, the ratio's "
                      "base), offload (prefetch on), sync (prefetch off), stale "
                      "(--staleness)")
  p.add_argument("--snapshot_steps", type=int, default=100,
                 help="steps between the two timed snapshots (0: none)")
  args = p.parse_args()
  # tracebacks after the data was built (ZeroDivisionError, TableSpec's ConfigError)
  check_at_least(p.error, vars(args), ("rows", "dim", "batch", "stream_steps", "steps"))
  check_at_least(p.error, vars(args), ("prefetch", "warmup", "staleness", "snapshot_steps"),
                 low=0)
  if args.host_buffer_rows is not None:   # -5: a ConfigError traceback after the data
    check_at_least(p.error, vars(args), ("host_buffer_rows",))
  if int(args.rows * args.cache_fraction) < 1:
    p.error(f"--rows={args.rows} x --cache_fraction={args.cache_fraction} leaves a cache of "
            "no rows")
  if not 0 < args.rounds <= args.steps:
    p.error(f"--rounds must be in [1, --steps={args.steps}] (timed blocks of --steps / "
            "--rounds steps)")
  if not 0 < args.cache_fraction < 1:   # was a ConfigError traceback after building data
    p.error(f"--cache_fraction must be in (0, 1), got {args.cache_fraction}")
  if args.optimizer not in optimizers.OPTIMIZERS:
    p.error(f"--optimizer: unknown {args.optimizer!r} (known: {', '.join(optimizers.OPTIMIZERS)})")
  if args.kvstore not in KVSTORES:
    p.error(f"--kvstore: unknown {args.kvstore!r} (known: {', '.join(KVSTORES)})")
  try:   # the store settings, checked before the data is built
    offload.OffloadTable("big", cache_rows=1, chunk_rows=args.chunk_rows, driver=args.driver,
                         shard_rows=args.shard_rows, kvstore=args.kvstore)
  except ConfigError as e:
    p.error(f"--driver/--chunk_rows/--shard_rows: {str(e).splitlines()[0]}")
  cache_rows = int(args.rows * args.cache_fraction)
  unknown = set(args.runs.split(",")) - {"device", "offload", "sync", "stale"}
  if unknown:
    p.error(f"--runs: unknown {sorted(unknown)}; choose from device, offload, sync, stale")
  check_dir_flag(p.error, "store_dir", args.store_dir)   # a file failed after the data
  offloaded = set(args.runs.split(",")) != {"device"}
  if offloaded and args.stream_steps * args.batch < cache_rows:
    p.error(f"--stream_steps={args.stream_steps} x --batch={args.batch} ids cannot fill a "
            f"cache of {cache_rows} rows (--rows x --cache_fraction={args.cache_fraction})")
  rng = np.random.default_rng(0)
  data = make_data(args, rng)
  if offloaded:
    check_stream(p.error, args, data[0])
  with scratch_dir(args.store_dir, "jaxrec_offload_") as store_dir:   # gone on any exit
    measure(args, data, store_dir)


def measure(args, data, store_dir):
  """Builds, warms up and times the runs (stores under `store_dir`); prints the lines."""
  cache_rows = int(args.rows * args.cache_fraction)
  common = dict(rows=args.rows, batch=args.batch, cache_rows=cache_rows, zipf=args.zipf,
                table_mib=round(args.rows * args.dim * 4 / 2**20, 1),
                cache_mib=round(cache_rows * args.dim * 4 / 2**20, 1),
                optimizer=args.optimizer, device=str(jax.devices()[0].device_kind),
                store=f"{args.driver} chunks {args.chunk_rows}"
                + (f" files {args.shard_rows or 'default'}" if args.driver == "zarr3" else ""))
  runs = {}
  for name in args.runs.split(","):
    off = None
    if name != "device":
      table = offload.OffloadTable("big", cache_rows=cache_rows, chunk_rows=args.chunk_rows,
                                   path=os.path.join(store_dir, name), kvstore=args.kvstore,
                                   driver=args.driver, shard_rows=args.shard_rows)
      off = offload.OffloadConfig((table,), prefetch_depth=0 if name == "sync" else args.prefetch,
                                  max_staleness=args.staleness if name == "stale" else 0,
                                  host_buffer_rows=args.host_buffer_rows or cache_rows)
    runs[name] = Run(args, data, off)
  for _ in range(args.rounds):          # interleaved blocks: load drift hits every run alike
    for r in runs.values():
      r.train(args.steps // args.rounds)
  snapshot = None
  if args.snapshot_steps > 0 and "offload" not in runs:
    print("offload: no snapshot timing (--snapshot_steps): --runs has no offload run",
          file=sys.stderr)
  elif args.snapshot_steps > 0:
    snapshot = time_snapshots(runs["offload"], args.snapshot_steps,
                              os.path.join(store_dir, "snapshots"))
  results = {}
  for name, r in runs.items():
    results[name] = r.report(args.batch)
    emit("offload", run=name, **common, **results[name])
  if snapshot is not None:
    if args.store_dir is None:   # a temp dir, gone at exit: the line named no file there
      snapshot["path"] = None
    emit("offload", run="snapshot", **common, **snapshot)
  missing = [n for n in ("device", "offload") if n not in results]
  if missing:   # the summary was left out without a word
    emit("offload", **common, ratio=None, goal=0.8, goal_op=">=",
         note=f"no ratio: --runs has no {' or '.join(missing)} run")
  else:
    base = results["device"]["examples_per_sec"]
    summary = dict(ratio=round(results["offload"]["examples_per_sec"] / base, 3), goal=0.8,
                   goal_op=">=",
                   hit_rate=results["offload"]["hit_rate"],
                   row_hit_rate=results["offload"]["row_hit_rate"],
                   stall_ms_per_step=results["offload"]["stall_ms_per_step"])
    for name in ("sync", "stale"):
      if name in results:
        summary[f"ratio_{name}"] = round(results[name]["examples_per_sec"] / base, 3)
    emit("offload", **common, **summary)


if __name__ == "__main__":
  interruptible(main)()   # Ctrl-C: one line, exit 130
