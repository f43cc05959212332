"""Host write-back buffer: evicted rows wait in host memory before going to the store.

Writing a row to a chunked tensorstore array rewrites its whole chunk, so writing each
step's few hundred evicted rows on their own would rewrite a few hundred chunks per step.
The buffer collects evicted rows (with their optimizer state) and the writer thread flushes
all of them at once when it is half full: one chunk rewrite then carries many rows. The
buffer is also a read tier: a row evicted and needed again is read from here.

A row's entry carries a version; a flush frees only the entries it wrote that were not
updated meanwhile. `put` blocks while the buffer has no room (back-pressure on the
training thread through the fetcher), until a flush frees space or `abort` is called.
"""

from __future__ import annotations

import threading
from typing import Mapping

import numpy as np

from jaxrec.offload.config import OffloadError


class HostBuffer:
  """`capacity` rows of a table of `num_rows` rows; `shapes[name]` is the trailing shape
  of each array (`(dim,)` for the rows, `()` for per-row optimizer state)."""

  def __init__(self, name: str, num_rows: int, capacity: int,
               shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str]):
    self.name, self.capacity = name, int(capacity)
    self.index_of = np.full(num_rows, -1, np.int32)
    self.row_at = np.full(self.capacity, -1, np.int64)
    self.version = np.zeros(self.capacity, np.int64)
    self.values = {k: np.zeros((self.capacity,) + tuple(s), dtypes[k]) for k, s in shapes.items()}
    self._free = np.arange(self.capacity, dtype=np.int64)[::-1].copy()
    self._nfree = self.capacity
    self._clock = 0
    self._cond = threading.Condition()
    self._aborted: BaseException | None = None
    self._starved = False

  @property
  def size(self) -> int:
    return self.capacity - self._nfree

  def put(self, rows: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
    """Stores the newest values of `rows` (unique); blocks until there is room."""
    rows = np.asarray(rows, np.int64)
    with self._cond:
      while True:   # entries may be freed while waiting: look the rows up again each time
        if self._aborted is not None:
          raise OffloadError(f"offloaded table '{self.name}': host buffer closed") \
              from self._aborted
        idx = self.index_of[rows].astype(np.int64)
        new = idx < 0
        need = int(new.sum())
        if need > self.capacity:
          raise OffloadError(f"offloaded table '{self.name}': {need} evicted rows do not fit "
                             f"the host buffer of {self.capacity} rows; raise "
                             "OffloadConfig.host_buffer_rows")
        if self._nfree >= need:
          break
        self._starved = True
        self._cond.notify_all()
        self._cond.wait(0.1)
      self._starved = False
      take = self._free[self._nfree - need:self._nfree]
      self._nfree -= need
      idx[new] = take
      self.index_of[rows[new]] = take
      self.row_at[idx] = rows
      self._clock += 1
      self.version[idx] = self._clock
      for k, v in values.items():
        self.values[k][idx] = v
      self._cond.notify_all()

  def get(self, rows: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`(found [n] bool, {name: values of the found rows})`."""
    with self._cond:
      idx = self.index_of[rows]
      found = idx >= 0
      return found, {k: v[idx[found]] for k, v in self.values.items()}

  def take_all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A copy of every entry to flush: `(idx, rows, versions, values)`."""
    with self._cond:
      idx = np.flatnonzero(self.row_at >= 0)
      return (idx, self.row_at[idx].copy(), self.version[idx].copy(),
              {k: v[idx] for k, v in self.values.items()})

  def release(self, idx: np.ndarray, versions: np.ndarray) -> None:
    """Frees the flushed entries not updated since `take_all`."""
    with self._cond:
      keep = self.version[idx] == versions
      idx = idx[keep]
      self.index_of[self.row_at[idx]] = -1
      self.row_at[idx] = -1
      self._free[self._nfree:self._nfree + len(idx)] = idx
      self._nfree += len(idx)
      self._cond.notify_all()

  def wait_fill(self, fraction: float, timeout: float) -> bool:
    """Blocks until the buffer is at least `fraction` full or a `put` waits for room (or
    `timeout` passes); returns whether it should be flushed."""
    with self._cond:
      if self.size < fraction * self.capacity and not self._starved:
        self._cond.wait(timeout)
      return self.size > 0 and (self.size >= fraction * self.capacity or self._starved)

  def abort(self, error: BaseException) -> None:
    with self._cond:
      self._aborted = error
      self._cond.notify_all()

  def clear(self) -> None:
    with self._cond:
      self.index_of[:] = -1
      self.row_at[:] = -1
      self._free = np.arange(self.capacity, dtype=np.int64)[::-1].copy()
      self._nfree = self.capacity
      self._aborted = None
      self._cond.notify_all()
