"""Log lines around phases that read or write a lot of data and would otherwise say nothing.

A phase over `MIN_BYTES` or more logs a line when it starts, with its size, and one when it
ends, with its seconds; one that reports its progress (`Phase.advance`) also logs how far
it got every `EVERY_S` seconds. Smaller phases log nothing. Measured on a 3e7 x 16
offloaded table (1.8 GiB): checking its offload snapshot's CRC32s at a resume ~10 s, and
`scripts/convert_checkpoint.py` 30-37 s, each without a word.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

from jaxrec.planner.result import format_bytes

_LOG = logging.getLogger(__name__)
MIN_BYTES = 256 << 20   # smaller phases are not logged (`offload.snapshots.LOG_MIN_BYTES` too)
EVERY_S = 10.0          # progress lines of a phase that reports it, at most this often


class Phase:
  """A logged phase's progress: `advance(n)` adds `n` of its `total` units done."""

  def __init__(self, log: logging.Logger | None, what: str, total: int):
    self.log, self.what, self.total = log, what, total
    self.done = 0
    self.start = self.last = time.monotonic()

  def advance(self, n: int) -> None:
    self.done += n
    now = time.monotonic()
    if self.log is not None and self.total and now - self.last >= EVERY_S:
      self.last = now
      self.log.info("%s: %d%% (%.0f s)", self.what, 100 * min(self.done, self.total) //
                    self.total, now - self.start, stacklevel=2)


@contextlib.contextmanager
def logged(what: str, size: int, detail: str | None = None, total: int | None = None,
           log: logging.Logger | None = None, min_bytes: int | None = None
           ) -> Iterator[Phase]:
  """Logs `what (detail)` (default detail: `size` in bytes, e.g. `1.8 GiB`) before the body
  and `what: done in T s` after it, when `size` is `min_bytes` (default `MIN_BYTES`) or
  more; with `total`, the `Phase` yielded logs `what: P% (T s)` as the body advances it.
  `log`: the logger (default this module's). A body that raises logs no `done` line."""
  log = log or _LOG
  on = size >= (MIN_BYTES if min_bytes is None else min_bytes)
  phase = Phase(log if on else None, what, total or 0)
  if not on:
    yield phase
    return
  # stacklevel 3: the line names the `with` statement's file (past contextlib's frame)
  log.info("%s (%s)", what, format_bytes(size) if detail is None else detail, stacklevel=3)
  yield phase
  log.info("%s: done in %.1f s", what, time.monotonic() - phase.start, stacklevel=3)
