"""The offload tier: device cache + look-ahead prefetch + write-back, one object per run.

Per offloaded table the device holds a cache of `cache_rows` rows (an ordinary table of the
collection); the full table and its optimizer state live in a `TableStore`. The training
thread sees only:

    it = tier.wrap(train_iterator)        # batches whose offloaded ids are cache slots
    batch = next(it)
    state = tier.before_step(state, batch)   # installs the rows the batch needs
    state, metrics = train_step(state, batch, *tier.step_args())
    tier.save(state, step, directory)     # with each checkpoint; tier.restore(step, ...)

Threads, in step order (K = `prefetch_depth`, H = `protect_ahead`):

  planner  reads raw batches H ahead of the one it plans (each read once: the wrapper is
           the only consumer, it hands the iterator state along with each batch), assigns
           the rows of batch t+K to cache slots (`CacheMap`: sampled LFU, rows the next H
           batches need evicted last), fetches the missing rows (host buffer, else store),
           copies them to the device and queues the plan. It assigns `READS_AHEAD` (3)
           batches and starts their reads before waiting for the oldest one's.
           K=0: the training thread plans.
  training `before_step`: a jitted gather reads the rows about to be replaced (the
           victims, kept on the device as this step's eviction), then a jitted install
           writes the new rows (and optimizer state) into their slots, in place.
  fetcher  copies each eviction to host, into the host write-back buffer (`HostBuffer`).
  writer   flushes the buffer to the store when half full (one write per touched chunk).

Exactness (S = `max_staleness` = 0): a missing row's newest value is in an eviction not yet
fetched, else in the host buffer, else in the store (an entry leaves the buffer only after
its write committed). The planner takes rows of the first kind from the eviction's device
arrays (the install copies them on the device: no waiting for the copy back; beyond
`lookahead.bounce_sources` such evictions in one step, K + 5, it waits for the extra ones),
the others from the buffer, then
the store. So every step reads exactly the values the all-on-device table would hold.

Bounded staleness (S > 0): a row whose newest value is in an unfetched eviction, while its
buffer/store value lacks at most S of its updates (its uses while cached), is installed
from that older value; the missed updates are lost, as in asynchronous SGD. Stale installs
and the most updates one lacked are in `stats()`. With the device copy above, S = 0 costs
no waiting, so S > 0 only saves that small copy; it is there for stores with several
writers, where the newest value may be out of reach.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import queue
import threading
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jaxrec import signals
from jaxrec.data.batch import Batch
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.embedding.specs import TableSpec
from jaxrec.errors import ConfigError, JaxrecError
from jaxrec.offload import eval_split, owner, snapshots
from jaxrec.offload.buffer import HostBuffer
from jaxrec.offload.cache import CacheMap
from jaxrec.offload.config import OffloadConfig, OffloadError, check_paths, check_tables
from jaxrec.offload.device import DeviceOps, cache_places, global_rows, padded
from jaxrec.offload.evictions import Eviction
from jaxrec.offload.iterator import OffloadIterator
from jaxrec.offload.lookahead import POLL, READS_AHEAD, LookAhead, bounce_sources
from jaxrec.offload.records import TierTable
from jaxrec.offload.store import TableStore, assemble

_LOG = logging.getLogger(__name__)   # jaxrec's: scripts/train.py shows its INFO lines
_FLUSH_CHUNK = 1 << 18


class OffloadTier(LookAhead):
  """See module docstring (the planner's methods: `lookahead`).

  Args:
    collection: the embedding collection built on `config.device_tables(...)`.
    tables: the full table specs (the offloaded ones at their real size).
    config: the offload configuration.
    key: table init key (`hooks.emb_init_key(seed)`); the stores start from the values the
      on-device tables would get.
    workdir: default parent of the stores (`<workdir>/offload/<table>`), and their owner
      (`owner.claim`).
    keep: offload snapshots kept by `save` (None: all).
    row_keyed: tables whose ids the train step maps back to table rows (`step_args`), e.g.
      a two-tower's item tables for its logQ estimate, which is keyed by item.
  """

  def __init__(self, collection: EmbeddingCollection, tables: Sequence[TableSpec],
               config: OffloadConfig, key: jax.Array | None = None, workdir: str | None = None,
               keep: int | None = 3, row_keyed: Sequence[str] = ()):
    self.row_keyed = tuple(row_keyed)
    if jax.process_count() > 1:
      raise ConfigError("offloaded tables need one process (every process would have to see "
                        "the global batch to agree on cache slots)")
    check_tables(tables, config)
    check_paths(config, workdir)
    # before anything touches a store: refuses another workdir's (`close(refused=True)`
    # hands the new claims back)
    self._claims = owner.claim({t.name: t.resolve_path(workdir) for t in config.tables
                                if t.kvstore != "memory"}, workdir) if workdir else []
    self._owned = workdir is not None   # each store's OWNER names the workdir (`claim`)
    try:
      self._build(collection, tables, config, key, workdir, keep)
    except BaseException:
      owner.release(self._claims)
      raise

  def _build(self, collection, tables, config, key, workdir, keep) -> None:
    self.config, self.collection, self.key, self.keep = config, collection, key, keep
    by_name = {t.name: t for t in tables}
    places = cache_places(collection, {t.name for t in config.tables})
    self.tables: dict[str, TierTable] = {}
    for off in config.tables:
      spec = by_name[off.name]
      optimizer = collection.optimizer_of(off.name)   # the table's own: its cache and store
      cache_rows = off.resolve_cache_rows(spec, optimizer)
      place = places.get(off.name)
      if place is None or place.cache_rows != cache_rows:
        raise ConfigError(f"offloaded table '{off.name}': the collection must be built on "
                          f"offload.device_tables(...) (a {cache_rows}-row cache)")
      store = TableStore(spec, off, optimizer, off.resolve_path(workdir))
      shapes = {n: store.array_shape(n)[1:] for n in store.names}
      dtypes = {n: store.array_dtype(n) for n in store.names}
      self.tables[off.name] = TierTable(
          spec, store, CacheMap(off.name, spec.rows, cache_rows,
                                advice=config.cache_advice(off.name)),
          HostBuffer(off.name, spec.rows, config.buffer_rows(spec), shapes, dtypes),
          tuple(f.name for f in collection.features if f.table == off.name), place,
          np.full(cache_rows, -1, np.int64), np.zeros(cache_rows, bool))
    self.ops = DeviceOps(collection, places)
    # tables whose stochastic rounding (or the step's item keys) needs each slot's table
    # row (`step_args`)
    self.keyed = tuple(n for n, t in self.tables.items() if n in self.row_keyed or (
        t.spec.dtype != "float32" and collection.options.stochastic_rounding))
    self.slot_rows = self.ops.put({n: np.zeros(self.tables[n].cache.cache_rows, np.uint32)
                                   for n in self.keyed})
    self.bounce_sources = bounce_sources(config.prefetch_depth)
    self._store_ready = self._dirty = self._atexit = False
    self._stores_written = False   # by this tier: created fresh or restored
    self._dummies: dict = {}
    self._source = None
    self._threads: list[threading.Thread] = []
    self._stats = collections.Counter()
    self._reset_pipeline_state()

  # ============================================================================ public API
  def wrap(self, iterator) -> OffloadIterator:
    """The training iterator as the trainer sees it (ids of offloaded tables → slots)."""
    self._source = iterator
    self._base_state = iterator.get_state()
    return OffloadIterator(self, iterator)

  def before_step(self, state: dict, batch: Batch) -> dict:
    """Installs the rows `batch` (from the wrapped iterator) needs into the device cache."""
    self._raise_error()
    if not self._handed or self._handed[0].batch is not batch:
      raise OffloadError("before_step: the batch did not come from the wrapped iterator, or "
                         "before_step was skipped for an earlier batch")
    plan = self._handed.popleft()
    self._dirty = True              # the step updates cached rows, installs or not
    for name, slots in plan.used.items():
      self.tables[name].dirty[slots] = True
    if plan.payload is None:
      return state
    t0 = time.perf_counter()
    bounces = {name: [] for name in plan.payload}   # newest values still on the device
    for name, ev, (src, dst) in plan.bounces:
      bounces[name].append((ev.device, src, dst))
    for name, (rows, _) in plan.payload.items():
      bounces[name] += self.no_bounces(name, len(rows))[len(bounces[name]):]
    if plan.evictions:
      evicted = self.ops.gather(state["emb"], {n: r for n, (r, _) in plan.payload.items()})
    emb = self.ops.install(state["emb"], plan.payload, bounces)
    if plan.table_rows:
      self.slot_rows = self.ops.set_slot_rows(
          self.slot_rows, {n: plan.payload[n][0] for n in plan.table_rows}, plan.table_rows)
    for name, (slots, rows) in plan.installs.items():
      self.tables[name].resident[slots] = rows
      self.tables[name].eval_index = None
    for ev in plan.evictions:
      ev.device = evicted[ev.table]
      for v in ev.device.values():
        v.copy_to_host_async()
      with self._cv:
        self._installed += 1
      self._fetch_q.put(ev)
    self._stats["install_s"] += time.perf_counter() - t0
    return dict(state, emb=emb)

  def step_args(self) -> tuple:
    """What the train step takes after the batch (`make_train_step(..., keyed=tier.keyed)`):
    `({table: uint32 [cache_rows]},)`, the table row in each cache slot of the `keyed`
    tables (stochastic rounding on a reduced-precision table, `row_keyed`), else `()`."""
    return (self.slot_rows,) if self.keyed else ()

  def install_rows(self, name: str) -> int:
    """Padded rows of the training installs into table `name` so far (0: none yet)."""
    return self._pad.get(name, 0)

  def no_bounces(self, name: str, n: int) -> list:
    """`bounce_sources` bounce entries for an `n`-row install into table `name` that copy
    nothing (their `dst` are all out of range), shaped as an eviction's `[n, ...]` arrays:
    the install compiles once however many real bounces it has."""
    key = (name, n)
    if key not in self._dummies:
      t = self.tables[name]
      ev = {k: np.zeros((n,) + t.store.array_shape(k)[1:], t.store.array_dtype(k))
            for k in t.store.names}
      self._dummies[key] = self.ops.put((ev, np.zeros(n, np.int32), np.full(n, n, np.int32)))
    return [self._dummies[key]] * self.bounce_sources

  def flush(self, state: dict) -> None:
    """Writes the current state's rows that the stores lack (buffered evictions, and cached
    rows trained since the last flush) to the stores; the stores then hold the tables
    exactly as of this step. Call between steps. (It wrote every cached row: with a cache
    spread over the table that rewrote nearly every file of the store at each checkpoint,
    and each snapshot then kept a whole copy of the table.)"""
    self._raise_error()
    self._ensure_store()
    self._drain_fetches()
    t0 = time.perf_counter()
    with self._io_lock:
      for name, t in self.tables.items():
        self._flush_buffer(t)
        slots = np.flatnonzero((t.resident >= 0) & t.dirty)
        for start in range(0, len(slots), _FLUSH_CHUNK):
          part = slots[start:start + _FLUSH_CHUNK]
          rows = global_rows(t.place, part, padded(min(t.cache.cache_rows, _FLUSH_CHUNK)))
          vals = jax.device_get(self.ops.gather(state["emb"], {name: self.ops.put(rows)}))
          t.store.write(t.resident[part], {k: v[:len(part)] for k, v in vals[name].items()})
          t.dirty[part] = False   # (a failed write leaves the rest dirty)
        self._stats["flushed_rows"] += len(slots)
    self._dirty = False
    self._stats["flush_s"] += time.perf_counter() - t0

  def save(self, state: dict, step: int, directory: str) -> str:
    """`flush`, then snapshots the stores as `<directory>/<step>` (see `snapshots`). Call
    with every checkpoint save, same step. Large stores are logged (`snapshots.logged`)."""
    stores = {n: t.store for n, t in self.tables.items()}
    with snapshots.logged(f"checkpoint {step}: writing back and snapshotting", stores):
      self.flush(state)
      with self._io_lock:
        return snapshots.save(directory, step, stores, self.keep)

  def restore(self, step: int, directory: str, imported: Mapping[str, Any] | None = None
              ) -> None:
    """Replaces the stores by the snapshot of `step` and empties the caches: the next
    batches read every row from the restored stores. Works on any device count.

    `imported` (`{table: checkpoint.offloaded.StoredTable}`, `Restored.host_tables`):
    tables the checkpoint holds whole (saved on the device, or an import); their stores
    are written afresh from it, and the snapshot need not hold them."""
    imported = dict(imported or {})
    rest = {n: t.spec for n, t in self.tables.items() if n not in imported}
    path = snapshots.locate(directory, step, rest) if rest else None
    self._reset_all()
    with snapshots.logged(f"checkpoint {step}: restoring",
                          {n: t.store for n, t in self.tables.items()}):
      self._restore_stores(path, imported)
    self._store_ready = self._stores_written = True

  def _restore_stores(self, path: str | None, imported: Mapping[str, Any]) -> None:
    for name, t in self.tables.items():
      signals.check()   # Ctrl-C: between tables (the next run restores the stores again)
      if name in imported:
        _LOG.info("offloaded table '%s': writing its store from %s", name,
                  imported[name].where)
        t.store.create(None)
        imported[name].copy_to(t.store)
        continue
      try:
        t.store.restore_snapshot(f"{path}/{name}")
      except ConfigError as e:
        raise OffloadError(f"offload snapshot {path}: {e}") from None

  def reset(self) -> None:
    """Back to the initial tables (a run restarted from its initial state): the stores
    are written afresh on the next batch and the caches emptied. Raises `OffloadError`
    for a table opened from `existing` arrays: training updated them in place."""
    opened = [t for t in self.tables.values() if t.store.off.init == "existing"]
    if opened and self._store_ready:
      t = opened[0]
      raise OffloadError(f"offloaded table '{t.spec.name}' started from the existing arrays at "
                         f"'{t.store.path}' (init='existing'), which training has updated in "
                         "place: they cannot be reset to their initial values (restart from a "
                         "checkpoint, or from a copy of the arrays)")
    self._reset_all()
    self._store_ready = False

  def eval_logits(self, state: dict, batch: Batch, run) -> tuple[dict, np.ndarray]:
    """`(state, logits [B])` of an eval batch (raw ids): `run(state, batch) -> logits [B]`
    (the eval step; or its dict of `[B, ...]` outputs, returned as one) is called on the
    batch with offloaded ids turned into cache slots, once, or once per piece when its rows
    do not fit a cache (`eval_split`). The rows it reads that
    are not cached (newest values) go into spare cache slots in place and are put back after
    each pass (also when `run` raises): `state` is donated, the returned one holds the same
    values. Raises `ConfigError` when one example cannot fit, or for bad ids (before any
    change to `state`)."""
    self._raise_error()
    self._ensure_store()
    self._drain_fetches()
    return eval_split.logits_in_place(self, state, batch, run)

  def read_latest(self, t: TierTable, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Newest host/store values of rows that are not cached (all evictions fetched)."""
    found, buffered = t.buffer.get(rows)
    disk = t.store.read(rows[~found]).result()
    return assemble(t.store, len(rows), [(found, buffered), (~found, disk)])

  def stats(self) -> dict[str, float]:
    """Counters since the start: lookups/hits (distinct rows per batch and id
    occurrences), rows read from buffer/store, stale installs, seconds spent."""
    s = dict(self._stats)
    s["hit_rate"] = s.get("id_hits", 0) / max(1, s.get("id_lookups", 0))
    s["row_hit_rate"] = s.get("row_hits", 0) / max(1, s.get("row_lookups", 0))
    return s

  def pause(self) -> None:
    """Lets the background work started so far finish (evictions copied to host, a
    write-back under way), then holds new write-backs until the next batch is taken:
    nothing of this run competes with other work meanwhile (benchmarks, eval)."""
    self._drain_fetches()
    self._paused.set()
    with self._io_lock:
      pass

  def close(self, refused: bool = False) -> None:
    """Stops the background threads (does not flush: call `save`/`flush` first).
    `refused`: the run stops at its start (before its first step); its new claims of store
    directories are handed back (`owner.release`)."""
    self._stop_threads()
    if refused:
      owner.release(self._claims)
      self._claims = []

  # ============================================================================ iterator
  def _next(self) -> Batch:
    self._raise_error()
    self._ensure_store()
    self._start_threads()
    self._paused.clear()
    if self._exhausted:
      raise StopIteration
    t0 = time.perf_counter()
    if self.config.prefetch_depth == 0:
      plan = self._plan_on_training_thread()
    else:
      while True:
        try:
          plan = self._plan_q.get(timeout=POLL)
          break
        except queue.Empty:
          self._raise_error()
      if plan is None:
        self._raise_error()
        self._exhausted = True    # the source ended and every planned batch was handed out
        raise StopIteration
    self._stats["stall_s"] += time.perf_counter() - t0
    self._handed.append(plan)
    self._last_state = plan.data_state
    return plan.batch

  def _get_state(self):
    return self._last_state if self._last_state is not None else self._base_state

  def _set_state(self, state) -> None:
    if self._dirty:
      raise OffloadError("set_state on the offload iterator: the device caches hold rows not "
                         "yet in the stores; restore the offload snapshot with tier.restore "
                         "(after set_state) or save first")
    self._reset_all()
    self._source.set_state(state)
    self._base_state = self._source.get_state()

  # ============================================================================ threads
  def _reset_pipeline_state(self) -> None:
    self._cv = threading.Condition()
    self._io_lock = threading.Lock()
    self._stop = threading.Event()
    self._paused = threading.Event()
    self._plan_q: queue.Queue = queue.Queue(maxsize=max(1, self.config.prefetch_depth))
    self._fetch_q: queue.Queue = queue.Queue()
    self._window: collections.deque = collections.deque()
    self._handed: collections.deque = collections.deque()
    self._inflight: list[Eviction] = []
    self._installed = self._fetched = 0
    self._error: BaseException | None = None
    self._last_state = None
    self._source_done = self._exhausted = False
    self._seq = 0
    self._pad: dict[str, int] = {}
    self._assigned_next = None      # prefetch_depth=0: the next batch, its reads under way

  def open_stores(self) -> None:
    """Opens (`'init': 'existing'`) or creates the stores now, not at the first batch: a
    store that is missing or of another shape is then refused before the run writes its
    files (`config.gin`, `tb/`, ...). A restore opens them itself."""
    self._ensure_store()

  def _ensure_store(self) -> None:
    if self._store_ready:
      return
    for t in self.tables.values():
      if t.store.off.init == "existing":
        t.store.check_untrained()   # a fresh run: not an earlier run's half-trained arrays
        t.store.open_existing()
      else:
        found = [] if self._stores_written else t.store.existing_arrays()
        claimed = {c.path for c in self._claims}   # a store this workdir owned is not listed
        if found and self._owned and os.path.realpath(t.store.path) not in claimed:
          _LOG.warning("offloaded table '%s': a fresh run replaces the arrays an earlier run "
                       "of this workdir left at %s (%s; it left no checkpoint) with its "
                       "initial values", t.spec.name, t.store.path, ", ".join(found))
        elif found:   # e.g. a `path` another run trains
          _LOG.warning("offloaded table '%s': a fresh run replaces the arrays already at %s "
                       "(%s) with its initial values ('init': 'existing' would train them "
                       "instead)", t.spec.name, t.store.path, ", ".join(found))
        t.store.create(self.key)
    self._store_ready = self._stores_written = True

  def _start_threads(self) -> None:
    if self._threads:
      return
    if not self._atexit:
      atexit.register(self._stop_threads)   # daemon threads inside tensorstore/jax at exit abort
      self._atexit = True
    targets = [self._fetch_loop, self._write_loop]
    if self.config.prefetch_depth > 0:
      targets.append(self._plan_loop)
    self._threads = [threading.Thread(target=self._guard(fn), daemon=True,
                                      name=f"offload-{fn.__name__}") for fn in targets]
    for th in self._threads:
      th.start()

  def _stop_threads(self) -> None:
    self._stop.set()
    for t in self.tables.values():
      t.buffer.abort(OffloadError("offload tier stopped"))
    self._fetch_q.put(None)
    for th in self._threads:
      while th.is_alive():
        try:
          self._plan_q.get_nowait()
        except queue.Empty:
          pass
        th.join(POLL)
    self._threads = []

  def _reset_all(self) -> None:
    """Stops the threads and forgets the caches (the stores must hold every row)."""
    self._stop_threads()
    self._reset_pipeline_state()
    for t in self.tables.values():
      t.cache.reset()
      t.buffer.clear()
      t.resident[:] = -1
      t.eval_index = None
      t.dirty[:] = False
    self._dirty = False

  def _guard(self, fn):
    def run():
      try:
        fn()
      except BaseException as e:  # handed to the training thread
        if self._stop.is_set():
          return
        self._error = self._error or e
        for t in self.tables.values():
          t.buffer.abort(e)
        try:
          self._plan_q.put_nowait(None)
        except queue.Full:
          pass
    return run

  def _raise_error(self) -> None:
    e = self._error
    if e is None:
      return
    if isinstance(e, (JaxrecError, StopIteration)):
      raise e
    raise OffloadError(f"offload tier failed: {type(e).__name__}: {e}") from e

  def _plan_loop(self) -> None:
    """Queues planned batches; `READS_AHEAD` batches are assigned (their reads started)
    before the oldest one's reads are waited for (`lookahead`'s docstring)."""
    assigned: collections.deque = collections.deque()
    ended = False
    while not self._stop.is_set():
      while not ended and len(assigned) < READS_AHEAD:
        try:
          assigned.append(self._assign_next())
        except StopIteration:   # end of the source (not an error: no abort)
          ended = True
      if not assigned:          # ... and every batch read ahead was queued
        self._queue_plan(None)
        return
      if not self._queue_plan(self._finish(assigned.popleft())):
        return

  def _queue_plan(self, plan) -> bool:
    """Puts `plan` in the queue, waiting for room; False: the tier stopped meanwhile."""
    while not self._stop.is_set():
      try:
        self._plan_q.put(plan, timeout=POLL)
        return True
      except queue.Full:
        pass
    return False

  def _fetch_loop(self) -> None:
    while True:
      ev = self._fetch_q.get()
      if ev is None or self._stop.is_set():
        return
      host = {k: np.asarray(v)[ev.pos] for k, v in ev.device.items()}
      self.tables[ev.table].buffer.put(ev.rows, host)
      ev.fetched.set()
      with self._cv:
        self._inflight.remove(ev)
        self._fetched += 1
        self._cv.notify_all()

  def _write_loop(self) -> None:
    while not self._stop.is_set():
      if self._paused.is_set():
        self._stop.wait(POLL)
        continue
      for t in self.tables.values():
        if (t.buffer.wait_fill(0.5, POLL / len(self.tables)) and not self._stop.is_set()
            and not self._paused.is_set()):
          with self._io_lock:
            self._flush_buffer(t)

  def _flush_buffer(self, t: TierTable) -> None:
    idx, rows, versions, values = t.buffer.take_all()
    if not len(rows):
      return
    t0 = time.perf_counter()
    t.store.write(rows, values)
    t.buffer.release(idx, versions)
    self._stats["written_rows"] += len(rows)
    self._stats["write_s"] += time.perf_counter() - t0

  def _drain_fetches(self) -> None:
    """Waits until every installed eviction is in the host buffer."""
    with self._cv:
      while self._fetched < self._installed:
        if self._error is not None:
          break
        if self._stop.is_set():   # closed: the fetcher is gone, waiting would never end
          raise OffloadError(f"the offload tier was closed with "
                             f"{self._installed - self._fetched} evictions not yet copied to "
                             "host (their rows are lost); call flush or save before close")
        self._cv.wait(POLL)
    self._raise_error()
