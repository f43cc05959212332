"""Host-side map of one offloaded table's device cache, and the eviction policy.

The map is the *planned* state: the background planner assigns the rows of batch `t+K`
to slots while the device still trains batch `t`. That is safe because installs run on
the device in step order: a slot given to batch `j` is overwritten just before step `j`,
after every earlier step (which may still read the old row) has run.

Eviction policy: sampled LFU with history. Every row has a use count (occurrences in
batches; kept while the row is evicted, so a returning row keeps its history). To free
`n` slots, `4n + 64` slots are drawn at random; slots the current batch uses are never
taken; rows the next H batches need are taken last; the rest go in order of (count, last
step used): least frequently used first, least recently used among equals. When the
sample would be as large as the cache, or holds too few candidates, every slot is
considered. The sample makes a step
O(n) instead of O(cache rows), like Redis' approximated LFU; under a power law the hot
rows have counts far above the sampled minimum, so they stay.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxrec.embedding.specs import checked_ids
from jaxrec.offload.config import OffloadError

_SAMPLE_FACTOR, _SAMPLE_EXTRA = 4, 64


def batch_rows(spec, features: Sequence[str], batch) -> tuple[np.ndarray, np.ndarray]:
  """Sorted distinct rows of table `spec` that `features` of `batch` read, and how often
  each occurs (the use counts). Ids are checked as `EmbeddingCollection.check_ids` checks
  them: it only sees cache slots afterwards."""
  parts = []
  for f in features:
    x = checked_ids(batch.ids, f, f"offloaded table '{spec.name}'", spec.rows).reshape(-1)
    parts.append(x[x >= 0])
  ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
  return np.unique(ids.astype(np.int64), return_counts=True)


@dataclasses.dataclass
class Assignment:
  """What batch `step` changes in the cache of one table.

  slots, rows: `[n]` cache slots to fill and the rows that go there.
  victims: `[n]` rows evicted from those slots (-1: the slot was free).
  victim_uses: `[n]` updates each victim received since it was installed (what a stale
    copy of it would lack).
  hits: unique rows of the batch that were already cached.
  used: `[u]` the slot of every row the batch reads (hits and installs): what its
    training step updates.
  """
  slots: np.ndarray
  rows: np.ndarray
  victims: np.ndarray
  victim_uses: np.ndarray
  hits: int
  used: np.ndarray


class CacheMap:
  """Row → slot map of a `cache_rows`-row cache of a `num_rows`-row table."""

  def __init__(self, name: str, num_rows: int, cache_rows: int, seed: int = 0,
               advice: str = "raise cache_rows"):
    # advice: how to enlarge the cache, for the error of a batch it cannot hold (the
    # tier's names the binding and where it was written: `OffloadConfig.cache_advice`)
    self.name, self.num_rows, self.cache_rows = name, int(num_rows), int(cache_rows)
    self.advice = advice
    self._rng = np.random.default_rng(seed)
    self.count = np.zeros(self.num_rows, np.uint32)
    self.slot_of = np.full(self.num_rows, -1, np.int32)
    self.reset()

  def reset(self) -> None:
    """Empty cache (every slot free); use counts are kept."""
    c = self.cache_rows
    self.slot_of[:] = -1
    self.id_of = np.full(c, -1, np.int64)
    self.last = np.full(c, -1, np.int64)
    self.uses = np.zeros(c, np.int32)
    self._pin = np.full(c, -1, np.int64)
    self._soft = np.full(c, -1, np.int64)
    self._free = np.arange(c, dtype=np.int64)[::-1].copy()
    self._nfree = c

  def assign(self, uniq: np.ndarray, counts: np.ndarray, step: int,
             ahead: Sequence[np.ndarray] = ()) -> Assignment:
    """Makes every row of `uniq` (sorted unique ids of batch `step`) resident.

    Args:
      uniq: `[u]` int64 rows the batch reads; `counts` their occurrences.
      step: the batch's step (pins its rows, stamps their last use).
      ahead: unique rows of the next batches, evicted last.
    """
    slots = self.slot_of[uniq]
    hit = slots >= 0
    self.count[uniq] += counts.astype(np.uint32)
    miss = uniq[~hit]
    n = len(miss)
    if n > self.cache_rows - int(hit.sum()):
      # (no step number: `step` counts batches since the tier started or was restored)
      raise OffloadError(f"offloaded table '{self.name}': a batch reads {len(uniq)} distinct "
                         f"rows but the cache holds {self.cache_rows}; {self.advice} (or "
                         "lower the batch size)")
    self._pin[slots[hit]] = step
    for rows in ahead:
      s = self.slot_of[rows]
      self._soft[s[s >= 0]] = step
    take = min(n, self._nfree)
    vslots = self._free[self._nfree - take:self._nfree][::-1].copy()
    self._nfree -= take
    if n > take:
      vslots = np.concatenate([vslots, self._choose(n - take, step)])
    victims = self.id_of[vslots]
    victim_uses = self.uses[vslots].copy()
    self.slot_of[victims[victims >= 0]] = -1
    self.slot_of[miss] = vslots
    self.id_of[vslots] = miss
    self.uses[vslots] = 0
    used = self.slot_of[uniq]
    self.uses[used] += 1
    self.last[used] = step
    return Assignment(vslots.astype(np.int64), miss, victims, victim_uses, int(hit.sum()),
                      used)

  def _choose(self, need: int, step: int) -> np.ndarray:
    """`need` resident slots to evict (see module docstring)."""
    c, draws = self.cache_rows, _SAMPLE_FACTOR * need + _SAMPLE_EXTRA
    cand = np.arange(c) if draws >= c else np.unique(self._rng.integers(0, c, draws))
    cand = cand[(self._pin[cand] != step) & (self.id_of[cand] >= 0)]
    if len(cand) < need:
      cand = np.flatnonzero((self._pin != step) & (self.id_of >= 0))
    soft = self._soft[cand] == step
    order = np.lexsort((self.last[cand], self.count[self.id_of[cand]], soft))
    return cand[order[:need]]

  def remap(self, ids: np.ndarray) -> np.ndarray:
    """Ids `[...]` (-1 = absent) → cache slots (-1 stays -1); rows must be resident."""
    return np.where(ids >= 0, self.slot_of[np.maximum(ids, 0)], -1).astype(np.int32)
