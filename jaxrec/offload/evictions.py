"""Evictions in flight: rows taken out of a device cache whose values are not yet on host.

Each install replaces some cache rows; their values (and optimizer state) are gathered on
the device first — an `Eviction` — and copied back to the host write-back buffer by the
fetcher. Until that copy lands, the eviction holds the newest value of its rows: a row
evicted at step i and needed again at step j must be taken from it (`newest_in_flight`).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass
class Eviction:
  """Rows one install takes out of one table's cache.

  rows: `[m]` evicted rows, sorted. uses: `[m]` their updates while cached (what an older
    copy of them lacks). pos: `[m]` their positions in the install's (padded) arrays.
  device: `{array: [n_pad, ...]}` the gathered values on the device (set at install).
  fetched: set once the values are in the host buffer.
  """
  table: str
  step: int
  rows: np.ndarray
  uses: np.ndarray
  pos: np.ndarray
  device: Any = None
  fetched: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class InFlight:
  """Where the newest values of some rows are, for `rows [n]` (see `newest_in_flight`).

  late: `[n]` the newest value is in an eviction and must be taken from it.
  source, pos: `[n]` that eviction (index into the evictions given) and the row's position
    in its sorted rows (for `late` rows).
  stale: `[n]` in an eviction, but the older host/store value is close enough (S > 0).
  missing: `[n]` updates an older host/store value lacks.
  """
  late: np.ndarray
  source: np.ndarray
  pos: np.ndarray
  stale: np.ndarray
  missing: np.ndarray

  def groups(self, evictions: Sequence[Eviction]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """`[(eviction index, src, dst)]` for the late rows: `src` positions in the eviction's
    device arrays, `dst` positions in `rows`; oldest eviction first."""
    out = []
    for k in np.unique(self.source[self.late]):
      dst = np.flatnonzero(self.late & (self.source == k))
      out.append((int(k), evictions[k].pos[self.pos[dst]], dst))
    return out


def newest_in_flight(evictions: Sequence[Eviction], rows: np.ndarray,
                     max_staleness: int) -> InFlight:
  """Finds `rows` (unique) in `evictions` (not yet fetched, oldest first: a later match is
  a newer value). A found row is `late` unless `max_staleness` S > 0 and the updates its
  older value lacks (summed over the evictions holding it) are at most S."""
  n = len(rows)
  missing = np.zeros(n, np.int64)
  source = np.full(n, -1)
  pos = np.zeros(n, np.int64)
  for k, ev in enumerate(evictions):
    if not len(ev.rows):
      continue
    p = np.minimum(np.searchsorted(ev.rows, rows), len(ev.rows) - 1)
    inside = ev.rows[p] == rows
    missing[inside] += ev.uses[p[inside]]
    source[inside], pos[inside] = k, p[inside]
  late = missing > max_staleness if max_staleness > 0 else missing > 0
  return InFlight(late, source, pos, (missing > 0) & ~late, missing)
