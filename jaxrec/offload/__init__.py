"""jaxrec.offload: tables larger than device memory, in a tensorstore host/disk tier.

  config     where each table lives (OffloadTable / OffloadConfig, gin); device_tables
  store      the full table + optimizer state as tensorstore arrays; exact init; snapshots
  cache      host map of a device cache (planned state) and its sampled-LFU eviction
  buffer     host write-back buffer (write combining, second read tier)
  device     jitted install / gather on the cache rows of the EmbeddingState
  eval_split eval through the caches in place; a batch too big split into passes
  tier       the pipeline: look-ahead planner, fetcher, writer; trainer hooks
  records    the tier's per-table state and per-batch plan records
  iterator   the wrapped training iterator `tier.wrap` returns
  snapshots  checkpoint snapshots of the stores, per step
  owner      which workdir a store directory belongs to (its OWNER file)
  planning   which tables to offload when the plan does not fit device memory
  hooks      what the trainer calls: choose_plan, make_tier
  telemetry  the tier's counters over a log window, for metrics.jsonl (offload_*)
"""

from jaxrec.offload.config import (OffloadConfig, OffloadError, OffloadTable, device_tables,
                                   host_bytes, row_bytes)
from jaxrec.offload.hooks import (check_one_process, choose_plan, emb_init_key, make_tier,
                                  store_paths, warn_moved_stores)
from jaxrec.offload.planning import plan_with_offload
from jaxrec.offload.iterator import OffloadIterator
from jaxrec.offload.store import TableStore, init_rows
from jaxrec.offload.tier import OffloadTier

__all__ = ["OffloadConfig", "OffloadError", "OffloadTable", "device_tables", "host_bytes",
           "row_bytes",
           "plan_with_offload", "TableStore", "init_rows", "OffloadIterator", "OffloadTier",
           "emb_init_key", "check_one_process", "choose_plan", "make_tier", "store_paths",
           "warn_moved_stores"]
