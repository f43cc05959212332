"""Straggler and hot-shard detection over per-step timings.

Steps are grouped into windows of `window_steps` steps (window k: steps
`[k * window_steps + 1, (k + 1) * window_steps]`). In each window every entity (a process,
or a shard: a device) gets its median time; entity e is *slow in the window* when

    median_e > threshold * median(medians of the other entities)

and a *straggler* once slow in `patience` consecutive windows (default: 1.5x for 3
windows). A window is judged once every entity has reported a later step (or 2 windows
later for entities that stopped reporting); the first window of a generation holds the
compilation and is skipped. A single entity has nothing to compare with and is never
flagged.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Iterable


@dataclasses.dataclass
class Straggler:
  """A detection: `entity` slower than the others for `windows` consecutive windows."""
  kind: str                 # "process" or "shard"
  entity: str
  ratio: float              # its median over the others' median, in the last window
  windows: int
  step: int                 # last step of the window that completed the detection
  median_s: float
  others_median_s: float

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


class Detector:
  """Feeds on `(entity, step, seconds)` samples, yields `Straggler`s (see module doc)."""

  def __init__(self, kind: str, threshold: float = 1.5, patience: int = 3,
               window_steps: int = 20, skip_windows: int = 1):
    if threshold <= 1 or patience < 1 or window_steps < 1:
      raise ValueError("need threshold > 1, patience >= 1, window_steps >= 1")
    self.kind = kind
    self.threshold = threshold
    self.patience = patience
    self.window_steps = window_steps
    self.skip_windows = skip_windows
    self._samples: dict[int, dict[str, list[float]]] = {}   # window -> entity -> times
    self._last_step: dict[str, int] = {}
    self._first_window: int | None = None
    self._next = None                                       # next window to judge
    self._streak: dict[str, int] = {}
    self._flagged: set[str] = set()

  def add(self, entity: str, step: int, seconds: float) -> None:
    k = (int(step) - 1) // self.window_steps
    if self._first_window is None:
      self._first_window = k
      self._next = k + self.skip_windows
    self._samples.setdefault(k, {}).setdefault(str(entity), []).append(float(seconds))
    self._last_step[str(entity)] = max(self._last_step.get(str(entity), 0), int(step))

  def poll(self) -> list[Straggler]:
    """Judges every complete window; returns new detections (each entity once per
    episode: it is reported again only after a window where it was not slow)."""
    out = []
    if self._next is None or not self._last_step:
      return out
    newest = max(self._last_step.values())
    while True:
      k = self._next
      end = (k + 1) * self.window_steps
      lagging = [e for e, s in self._last_step.items() if s <= end]
      if newest <= end or (lagging and newest <= end + 2 * self.window_steps):
        break
      out += self._judge(k, end)
      self._samples.pop(k, None)
      self._next = k + 1
    for k in [k for k in self._samples if self._next is not None and k < self._next]:
      self._samples.pop(k)
    return out

  def _judge(self, k: int, end: int) -> list[Straggler]:
    medians = {e: statistics.median(v) for e, v in self._samples.get(k, {}).items() if v}
    if len(medians) < 2:
      return []
    out = []
    for e, m in medians.items():
      others = statistics.median(v for o, v in medians.items() if o != e)
      slow = others > 0 and m > self.threshold * others
      self._streak[e] = self._streak.get(e, 0) + 1 if slow else 0
      if not slow:
        self._flagged.discard(e)
      elif self._streak[e] >= self.patience and e not in self._flagged:
        self._flagged.add(e)
        out.append(Straggler(self.kind, e, round(m / others, 3), self._streak[e], end,
                             round(m, 6), round(others, 6)))
    return out


def feed_records(process: Detector, shard: Detector, records: Iterable[dict]) -> None:
  """Adds worker progress records (`W/workers/<p>.jsonl` lines) to the two detectors."""
  for r in records:
    if "step" not in r:
      continue
    process.add(str(r["process"]), r["step"], r.get("host_time_s", r.get("step_time_s", 0.0)))
    for name, t in (r.get("shard_times_s") or {}).items():
      shard.add(name, r["step"], t)
