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

SIGHUP (the terminal closed, an ssh session lost) is taken as SIGTERM, unless the run
ignores it (`nohup`): it killed the run with no line, losing the steps since the last
checkpoint and the save in flight. The stop then names SIGHUP, exits 129.

Only a single-process run outside `scripts/launch.py` catches them: the processes of a job
would have to agree on the step to save at, and the elastic supervisor stops its workers
with its own requests (SIGTERM is its last resort before SIGKILL there).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Sequence

from jaxrec import signals

EXIT_CODE = 128 + signal.SIGTERM


class Terminated(Exception):
  """The run stopped on SIGTERM (SIGHUP) after saving a checkpoint (the message says
  which); `exit_code` 128 + the signal."""

  def __init__(self, message: str, exit_code: int = EXIT_CODE):
    super().__init__(message)
    self.exit_code = exit_code


def _signums() -> list[int]:
  """SIGTERM, and SIGHUP unless ignored (`nohup`) or handled by someone else (deferred
  by train.py from its start, `signals.hangup`, it is taken here too)."""
  hangup = bool(signals.hangup()) or signals.recording(signal.SIGHUP)
  return [signal.SIGTERM] + ([signal.SIGHUP] if hangup else [])


class SigtermRequests:
  """What SIGTERM (SIGHUP) asks of the trainer: a stop at the next `signals.check()`
  before `training()`, a checkpoint after the step in progress (`is_set()`) from then on."""

  def __init__(self, enabled: bool, signums: Sequence[int] = (signal.SIGTERM,)):
    self._enabled = enabled
    self._signums = tuple(signums)
    self._training = False
    self._requested = threading.Event()
    self.signum = signal.SIGTERM   # the first one that asked

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name

  def is_set(self) -> bool:
    """Whether SIGTERM arrived since `training()`: save after this step and stop."""
    return self._requested.is_set()

  def terminated(self, message: str) -> Terminated:
    """`Terminated` with `message`, `stopped by <signal> ` before it, and its exit code."""
    return Terminated(f"stopped by {self.signal_name} {message}", 128 + self.signum)

  def training(self) -> None:
    """Called before each step: from the first, SIGTERM sets the request. One recorded
    before raises here (nothing was trained)."""
    if not self._enabled or self._training:
      return
    self._training = True
    for s in self._signums:
      signal.signal(s, self._handler)
    signals.check()

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    if self._requested.is_set():   # a second signal: stop now (e.g. stuck in a long eval)
      signals.stop_now(signum)
    self.signum = signum
    self._requested.set()


@contextlib.contextmanager
def sigterm_requests(enabled: bool = True) -> Iterator[SigtermRequests]:
  """Yields the `SigtermRequests` of the body (the previous handler comes back after).
  Disabled, or off the main thread (no handler can be set there), nothing is ever
  requested and SIGTERM acts as before."""
  enabled = enabled and threading.current_thread() is threading.main_thread()
  signums = _signums() if enabled else []
  requests = SigtermRequests(enabled, signums)
  if not enabled:
    yield requests
    return
  before = {s: signal.getsignal(s) for s in signums}
  deferred = signals.defer(signums)   # until `training()`
  try:
    yield requests
  finally:
    for s, handler in before.items():
      signal.signal(s, handler)
    signals.undefer(deferred)
