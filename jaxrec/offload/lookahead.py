"""The offload tier's look-ahead planner: what the planner thread (or, with
`prefetch_depth=0`, the training thread) does for each batch (see `tier`'s docstring).

`LookAhead` is a base of `OffloadTier`: its methods read the batches ahead, assign the rows
of the next batch to cache slots, queue the evictions and start reading the missing rows'
newest values. The state they use (`_window`, `_inflight`, `_pad`, ...) is the tier's
(`OffloadTier._reset_pipeline_state`).

Planning a batch has two halves: `_assign_next` (slots, evictions, reads started) and
`_finish` (wait for the reads, one transfer to the device). The planner thread keeps
`READS_AHEAD` batches assigned before it finishes the oldest, so a batch's store reads run
while the thread plans the batches around it instead of on its critical path (a read of
~150 rows takes 2–6 ms on this VM's disk, more than the planning of a batch); the training
thread (`prefetch_depth=0`) assigns one batch ahead, so its reads run during a step.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np

from jaxrec.data.batch import Batch
from jaxrec.errors import OffloadError
from jaxrec.offload.cache import batch_rows
from jaxrec.offload.device import global_rows, install_size, pad_rows
from jaxrec.offload.evictions import Eviction, newest_in_flight
from jaxrec.offload.records import PlannedBatch, TierTable
from jaxrec.offload.store import assemble

POLL = 0.05
READS_AHEAD = 3       # batches the planner thread has assigned, their reads under way


def bounce_sources(prefetch_depth: int) -> int:
  """Evictions one install may copy rows from on the device (a fixed number: the install
  compiles once). A row needed by a batch may sit in the eviction of any batch planned
  but not yet installed (up to K queued, `READS_AHEAD` assigned by the planner thread), or
  installed but not yet copied back; with fewer sources the planner waits for copies
  (`fetch_waits`), i.e. for the training thread to reach those batches. Each unused source
  costs the install a gather of its padded rows (~0.02 ms at 32k rows on CPU)."""
  return prefetch_depth + READS_AHEAD + 2


@dataclasses.dataclass
class AssignedBatch:
  """Batch `seq` with its rows assigned to cache slots and its reads under way."""
  seq: int
  raw: Batch
  data_state: Any
  ids: dict                     # feature -> ids, offloaded features' as cache slots
  installs: dict                # table -> (slots, rows)
  used: dict                    # table -> slots the batch reads (its step updates them)
  evictions: list
  pending: dict                 # table -> ([(eviction, src, dst)], wait for the values)
  seconds: float                # spent assigning


class LookAhead:
  """Plans batch t+K of an `OffloadTier` (the tier's state; see the module docstring)."""

  def _plan_on_training_thread(self) -> PlannedBatch:
    """Plans the next batch on the training thread (`prefetch_depth=0`): finishes the batch
    assigned at the previous call, whose reads ran during the step in between, then
    assigns the one after it and starts its reads. StopIteration: nothing left."""
    assigned, self._assigned_next = self._assigned_next, None
    plan = self._finish(assigned if assigned is not None else self._assign_next())
    try:
      self._assigned_next = self._assign_next()
    except StopIteration:
      pass
    return plan

  def _assign_next(self) -> AssignedBatch:
    """Reads the window ahead, assigns the rows of its first batch to cache slots, queues
    the evictions and starts reading the missing rows. StopIteration: nothing left."""
    t0 = time.perf_counter()
    horizon = self.config.horizon
    while len(self._window) < horizon + 1 and not self._source_done:
      try:
        raw = next(self._source)
      except StopIteration:   # a finite source: the batches read ahead are still planned
        self._source_done = True
        break
      rows = {n: batch_rows(t.spec, t.features, raw) for n, t in self.tables.items()}
      self._window.append((raw, self._source.get_state(), rows))
    if not self._window:
      raise StopIteration
    raw, data_state, uniq = self._window.popleft()
    seq = self._seq
    self._seq += 1
    ids, installs, used, evictions, pending = dict(raw.ids), {}, {}, [], {}
    for name, t in self.tables.items():
      u, counts = uniq[name]
      a = t.cache.assign(u, counts, seq, [w[2][name][0] for w in self._window])
      self._stats["row_lookups"] += len(u)
      self._stats["row_hits"] += a.hits
      self._stats["id_lookups"] += int(counts.sum())
      self._stats["id_hits"] += int(counts.sum() - counts[np.isin(u, a.rows)].sum())
      for f in t.features:
        ids[f] = t.cache.remap(raw.ids[f])
      valid = np.flatnonzero(a.victims >= 0)
      if len(valid):
        order = valid[np.argsort(a.victims[valid])]
        ev = Eviction(name, seq, a.victims[order], a.victim_uses[order], order)
        with self._cv:
          self._inflight.append(ev)
        evictions.append(ev)
      installs[name], used[name] = (a.slots, a.rows), a.used
      pending[name] = self._start_read(t, a.rows)
    return AssignedBatch(seq, raw, data_state, ids, installs, used, evictions, pending,
                         time.perf_counter() - t0)

  def _finish(self, a: AssignedBatch) -> PlannedBatch:
    """Waits for `a`'s reads and puts its installs and device copies on the device, in one
    transfer."""
    t0 = time.perf_counter()
    payload, copies, table_rows = {}, [], {}
    for name, t in self.tables.items():
      slots, rows = a.installs[name]
      # As many rows as the cache can take from a batch of this shape: one compilation.
      n = self._pad[name] = max(self._pad.get(name, 0), install_size(t, a.raw.ids))
      found, values = a.pending[name]
      payload[name] = (global_rows(t.place, slots, n),
                       {k: pad_rows(v, n) for k, v in values().items()})
      if name in self.keyed:   # stochastic rounding's row keys (low 32 bits)
        table_rows[name] = pad_rows(rows.astype(np.uint32), n)
      for ev, src, dst in found:
        copies.append((name, ev, (pad_rows(src, n), np.pad(
            dst, (0, n - len(dst)), constant_values=n).astype(np.int32))))
    any_new = any(len(rows) for _, rows in a.installs.values())
    on_device, keyed, moved = self.ops.put((payload if any_new else None,
                                            table_rows if any_new else None,
                                            [arrays for _, _, arrays in copies]))
    bounces = [(name, ev, arrays) for (name, ev, _), arrays in zip(copies, moved)]
    self._stats["plan_s"] += a.seconds + time.perf_counter() - t0
    return PlannedBatch(a.seq, a.raw.replace(ids=a.ids), a.data_state, on_device, a.installs,
                        a.used, a.evictions, bounces, keyed)

  def _start_read(self, t: TierTable, rows: np.ndarray
                  ) -> tuple[list, Callable[[], dict[str, np.ndarray]]]:
    """Starts fetching the newest values of missing `rows`. Returns the rows to copy on
    the device from evictions still in flight (`[(eviction, src, dst)]`, see
    `_in_flight`) and a function that waits for the others (`{array: [n, ...]}`; the
    in-flight rows are left zero there)."""
    bounce, late = self._in_flight(t, rows) if len(rows) else ([], np.zeros(0, bool))
    found, buffered = t.buffer.get(rows[~late])
    found_all = np.zeros(len(rows), bool)
    found_all[np.flatnonzero(~late)[found]] = True
    disk = ~late & ~found_all
    read = t.store.read(rows[disk])
    self._stats["buffer_reads"] += int(found.sum())
    self._stats["store_reads"] += int(disk.sum())
    self._stats["device_bounces"] += int(late.sum())

    def result():
      t0 = time.perf_counter()
      got = read.result()
      self._stats["read_wait_s"] += time.perf_counter() - t0
      return assemble(t.store, len(rows), [(found_all, buffered), (disk, got)])
    return bounce, result

  def _in_flight(self, t: TierTable, rows: np.ndarray):
    """Rows whose newest value is in an eviction not yet in the host buffer:
    `([(eviction, src, dst)], late [n] bool)`; the install copies them on the device
    (`evictions.newest_in_flight`; beyond `bounce_sources` evictions, waits instead)."""
    with self._cv:
      recs = [e for e in self._inflight if e.table == t.spec.name and not e.fetched.is_set()]
    if not recs:
      return [], np.zeros(len(rows), bool)
    found = newest_in_flight(recs, rows, self.config.max_staleness)
    if found.stale.any():
      self._stats["stale_rows"] += int(found.stale.sum())
      self._stats["max_stale_updates"] = max(self._stats["max_stale_updates"],
                                             int(found.missing[found.stale].max()))
    groups = found.groups(recs)
    keep = self.bounce_sources
    for k, _, dst in groups[:-keep]:   # rare: more than an install takes; wait
      self._stats["fetch_waits"] += 1
      t0 = time.perf_counter()
      while not recs[k].fetched.wait(POLL):
        if self._stop.is_set() or self._error is not None:
          raise OffloadError("offload pipeline stopped")
      self._stats["fetch_wait_s"] += time.perf_counter() - t0
      found.late[dst] = False
    return [(recs[k], src, dst) for k, src, dst in groups[-keep:]], found.late
