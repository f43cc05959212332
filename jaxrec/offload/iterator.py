"""The training iterator as the trainer sees it when tables are offloaded (`OffloadTier.wrap`).

Batches come from the tier's planner, with the ids of offloaded tables turned into cache
slots; the data state is the underlying iterator's, counted in batches handed out.
"""

from __future__ import annotations

from jaxrec.data.batch import Batch


class OffloadIterator:
  """The wrapped training iterator: batches with cache slots for offloaded ids;
  `get_state`/`set_state` as the underlying iterator, counted in batches handed out."""

  def __init__(self, tier, source):   # an `OffloadTier`
    self.tier, self.source = tier, source

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    return self.tier._next()

  def get_state(self):
    return self.tier._get_state()

  def set_state(self, state) -> None:
    self.tier._set_state(state)

  def __getattr__(self, name):
    return getattr(self.source, name)
