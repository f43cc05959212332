"""SIGTERM (a preemption, a scheduler's time limit, `kill`): checkpoint, then stop.

Without a handler SIGTERM killed `scripts/train.py` like SIGKILL: every step since the
last checkpoint was lost. Inside `sigterm_requests`, until the training loop's first step
(`SigtermRequests.training`), SIGTERM is recorded by `jaxrec.signals` and raised as
`signals.TerminateRequested` at the next `signals.check()`: setup and a long restore stop
between table blocks (nothing was trained: no checkpoint to save). From then on it only
sets a request; the loop sees it after the step in progress, saves a checkpoint of that
step (as it does at the end), writes a `terminated` line to `metrics.jsonl` and raises
`Terminated`, which `scripts/train.py` reports with exit code 143 (128 + SIGTERM, what
schedulers expect of a terminated job). The same command resumes from that checkpoint.
A second SIGTERM exits at once with `signals.stop_now`'s line, e.g. when the step, the
save or an eval is stuck.

Only a single-process run outside `scripts/launch.py` catches it: the processes of a job
would have to agree on the step to save at, and the elastic supervisor stops its workers
with its own requests (SIGTERM is its last resort before SIGKILL there).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from jaxrec import signals

EXIT_CODE = 128 + signal.SIGTERM


class Terminated(Exception):
  """The run stopped on SIGTERM after saving a checkpoint (the message says which)."""


class SigtermRequests:
  """What SIGTERM asks of the trainer: a stop at the next `signals.check()` before
  `training()`, a checkpoint after the step in progress (`is_set()`) from then on."""

  def __init__(self, enabled: bool):
    self._enabled = enabled
    self._training = False
    self._requested = threading.Event()

  def is_set(self) -> bool:
    """Whether SIGTERM arrived since `training()`: save after this step and stop."""
    return self._requested.is_set()

  def training(self) -> None:
    """Called before each step: from the first, SIGTERM sets the request. One recorded
    before raises here (nothing was trained)."""
    if not self._enabled or self._training:
      return
    self._training = True
    signal.signal(signal.SIGTERM, self._handler)
    signals.check()

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    if self._requested.is_set():   # a second SIGTERM: stop now (e.g. stuck in a long eval)
      signals.stop_now(signum)
    self._requested.set()


@contextlib.contextmanager
def sigterm_requests(enabled: bool = True) -> Iterator[SigtermRequests]:
  """Yields the `SigtermRequests` of the body (the previous handler comes back after).
  Disabled, or off the main thread (no handler can be set there), nothing is ever
  requested and SIGTERM acts as before."""
  enabled = enabled and threading.current_thread() is threading.main_thread()
  requests = SigtermRequests(enabled)
  if not enabled:
    yield requests
    return
  before = signal.getsignal(signal.SIGTERM)
  deferred = signals.defer([signal.SIGTERM])   # until `training()`
  try:
    yield requests
  finally:
    signal.signal(signal.SIGTERM, before)
    signals.undefer(deferred)
