"""SIGTERM (a preemption, a scheduler's time limit, `kill`): checkpoint, then stop.

Without a handler SIGTERM killed `scripts/train.py` like SIGKILL: every step since the
last checkpoint was lost. Inside `sigterm_requests` it only sets an event; the training
loop sees it after the step in progress, saves a checkpoint of that step (as it does at
the end), writes a `terminated` line to `metrics.jsonl` and raises `Terminated`, which
`scripts/train.py` reports with exit code 143 (128 + SIGTERM, what schedulers expect of
a terminated job). The same command resumes from that checkpoint. A second SIGTERM
kills the process at once (as before), e.g. when the step or an evaluate-only run is
stuck.

Only a single-process run outside `scripts/launch.py` catches it: the processes of a job
would have to agree on the step to save at, and the elastic supervisor stops its workers
with its own requests (SIGTERM is its last resort before SIGKILL there).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

EXIT_CODE = 128 + signal.SIGTERM


class Terminated(Exception):
  """The run stopped on SIGTERM after saving a checkpoint (the message says which)."""


@contextlib.contextmanager
def sigterm_requests(enabled: bool = True) -> Iterator[threading.Event]:
  """Yields an event that SIGTERM sets while the body runs (the previous handler comes
  back after). Disabled, or off the main thread (no handler can be set there), the event
  is never set and SIGTERM acts as before."""
  requested = threading.Event()
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield requested
    return

  def handler(signum, frame):  # pylint: disable=unused-argument
    if requested.is_set():   # a second SIGTERM: stop now (e.g. stuck in a long eval)
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
      os.kill(os.getpid(), signal.SIGTERM)
    requested.set()

  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield requested
  finally:
    signal.signal(signal.SIGTERM, previous)
