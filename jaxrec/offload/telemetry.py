"""What the offload tier did over a log window, for the run's `metrics.jsonl` lines: an
operator saw throughput only, while the tier counted its cache hits, the steps' waits for
rows and the rows it read from the store and wrote back (`OffloadTier.stats`, read only by
benchmarks/offload.py)."""

from __future__ import annotations

from typing import Mapping


class WindowStats:
  """`record(step)` -> the `offload_*` keys of the log window since the previous call (or
  since this object was made at step `start`):

    offload_hit_rate       the window's batch ids found in the device caches (0-1)
    offload_row_hit_rate   the same over distinct rows per batch
    offload_stall_ms       milliseconds a step waited for its rows, mean over the window
    offload_store_reads    rows read from the store (disk) per step
    offload_written_rows   rows written to the store in the window: write-backs of the host
                           buffer (evicted rows wait there until it fills) and a
                           checkpoint's flush of the trained cached rows
  """

  def __init__(self, tier, start: int):
    self.tier, self.step = tier, int(start)
    self.before = dict(tier.stats())

  def record(self, step: int) -> dict[str, float]:
    now = dict(self.tier.stats())
    d = _delta(self.before, now)
    steps = max(1, int(step) - self.step)   # (a rollback's step is behind: one)
    self.before, self.step = now, int(step)
    return {
        "offload_hit_rate": d.get("id_hits", 0) / max(1, d.get("id_lookups", 0)),
        "offload_row_hit_rate": d.get("row_hits", 0) / max(1, d.get("row_lookups", 0)),
        "offload_stall_ms": 1e3 * d.get("stall_s", 0.0) / steps,
        "offload_store_reads": d.get("store_reads", 0) / steps,
        "offload_written_rows": int(d.get("written_rows", 0) + d.get("flushed_rows", 0)),
    }


def _delta(before: Mapping[str, float], now: Mapping[str, float]) -> dict[str, float]:
  """`now - before` per counter; the counters restarted (a NaN rollback resets the tier:
  one below its earlier value) count from zero."""
  if any(now.get(k, 0) < v for k, v in before.items()):
    return dict(now)
  return {k: v - before.get(k, 0) for k, v in now.items()}
