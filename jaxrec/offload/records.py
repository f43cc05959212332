"""The offload tier's records (`tier.OffloadTier`): the state it keeps per offloaded table
(`TierTable`) and what its planner hands the training thread per batch (`PlannedBatch`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxrec.data.batch import Batch
from jaxrec.embedding.specs import TableSpec
from jaxrec.offload.buffer import HostBuffer
from jaxrec.offload.cache import CacheMap
from jaxrec.offload.store import TableStore


@dataclasses.dataclass
class TierTable:
  """One offloaded table: its full spec, store, device-cache map and write-back buffer."""
  spec: TableSpec               # the full table
  store: TableStore
  cache: CacheMap
  buffer: HostBuffer
  features: tuple[str, ...]
  place: Any
  resident: np.ndarray          # [cache_rows] row in each slot after the last install (-1)
  dirty: np.ndarray             # [cache_rows] bool: trained since the last flush (`flush`
                                # writes only these: every cached row rewrote most files)
  eval_index: Any = None        # `eval_split.slots`' sort of `resident`; None after a change


@dataclasses.dataclass
class PlannedBatch:
  """A batch planned `prefetch_depth` ahead: its cache installs, evictions and copies."""
  seq: int
  batch: Batch
  data_state: Any
  payload: dict | None          # device arrays for `DeviceOps.install`, None: nothing new
  installs: dict                # table -> (slots, rows)
  used: dict                    # table -> slots the batch reads (its step updates them)
  evictions: list
  bounces: list                 # (table, eviction, (src, dst)): rows copied on the device
  table_rows: dict | None = None  # keyed table -> uint32 [n]: table row of each payload row
