"""SIGINT / SIGTERM while a script runs: recorded when they arrive, acted on where the
program can stop cleanly.

Python runs a signal handler between any two bytecodes of the main thread. A handler that
raises (SIGINT's KeyboardInterrupt) inside a `gc` callback, e.g. jax's `_xla_gc_callback`,
is printed as "Exception ignored" and the program goes on; inside jaxlib's import it left a
half-initialised extension (an ImportError traceback); mid-compile it once segfaulted at
exit. Within `defer()` (first thing in scripts/launch.py, train.py, plan.py, preprocess.py
and convert_checkpoint.py, before jax is imported; train.py keeps SIGINT deferred through
training, checked before each step, and SIGTERM too except while the trainer's own handler
holds it, `jaxrec.train.termination`) the handlers only record the signal; `check()`,
called where the program can act, raises it: KeyboardInterrupt for SIGINT,
`TerminateRequested` for SIGTERM. A second signal, before a `check()` or while the
program stops after one (its clean-up, a checkpoint save in flight), stops the process at
once: one line on stderr (`on_second_signal` says what was interrupted), then
`os._exit(128 + signal)`. A KeyboardInterrupt raised there instead was lost inside a gc
callback, and mid-compile segfaulted at exit; what is left is what a SIGKILL leaves
(checkpoints are committed by a rename, temporary output is named `*tmp-*`). One still
recorded when `deferred()` ends goes to the handler before it. Within `immediate()` (a
wait that may stop anywhere, e.g. reading input from a pipe, which would otherwise wait
on) a signal raises at once too.
Stdlib only: importing this module imports no jax.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from typing import Iterator, Sequence

_pending: list[int] = []     # signals received and not yet raised by `check()`
_immediate: list[int] = []   # one entry per `immediate()` body running
_stopping: list[int] = []    # signals raised (`check()`, `immediate()`): the program stops
_second_line: list = []      # [callable(signal name) -> str]: `on_second_signal`
_exit = os._exit             # pylint: disable=protected-access


class TerminateRequested(BaseException):
  """SIGTERM (or a deferred SIGHUP: `signum`), raised by `check()` (as KeyboardInterrupt is
  for SIGINT)."""

  def __init__(self, signum: int = signal.SIGTERM):
    super().__init__()
    self.signum = signum


def _exception(signum: int) -> BaseException:
  return KeyboardInterrupt() if signum == signal.SIGINT else TerminateRequested(signum)


def _record(signum, frame):  # pylint: disable=unused-argument
  if _done:                   # the output is complete: the teardown is cut short, status 0
    os.write(2, f"note: {signal.Signals(signum).name} after the output was complete; it is "
                "kept (exiting now)\n".encode())
    _exit(0)
  if _pending or _stopping:   # a second one: the user insists
    stop_now(signum)
  if _immediate:              # in a wait: raise now
    _stopping.append(signum)
    raise _exception(signum)
  _pending.append(signum)


def on_second_signal(line) -> None:
  """`line(signal name) -> str`: what a second signal prints before the process exits
  (what was interrupted, what is left and what the next run does with it)."""
  _second_line[:] = [line]


def second_signal_line():
  """The `on_second_signal` composer in force (None: the default line), to wrap it."""
  return _second_line[0] if _second_line else None


def stop_now(signum: int) -> None:
  """Writes the `on_second_signal` line to stderr (unbuffered: the handler may run inside
  a print) and exits with 128 + `signum`, running no clean-up, finaliser or atexit hook."""
  name = signal.Signals(signum).name
  try:
    text = _second_line[0](name) if _second_line else f"error: interrupted again by {name}"
  except Exception as e:  # pylint: disable=broad-except
    text = f"error: interrupted again by {name} ({type(e).__name__} composing the message)"
  try:
    sys.stderr.flush()
  except Exception:  # pylint: disable=broad-except
    pass
  os.write(2, (text.rstrip("\n") + "\n").encode(errors="replace"))
  _pending.clear()   # (only a patched `_exit` returns: nothing is sent again after it)
  _exit(128 + signum)


def check() -> None:
  """Raises the signal recorded since the last check, if any (KeyboardInterrupt for
  SIGINT, `TerminateRequested` for SIGTERM). Off the main thread (e.g. a prefetch thread
  running the same code) it does nothing: the main thread's next check raises it."""
  if _pending and threading.current_thread() is threading.main_thread():
    _stopping.append(_pending[-1])
    raise _exception(_pending.pop())


def name(e: BaseException) -> str:
  """`SIGTERM` (`SIGHUP`) for a `TerminateRequested`, `SIGINT` for anything else
  (KeyboardInterrupt)."""
  return signal.Signals(e.signum).name if isinstance(e, TerminateRequested) else "SIGINT"


def exit_code(e: BaseException) -> int:
  """128 + the signal of `e` (`name`): 130 for SIGINT, 143 for SIGTERM."""
  return 128 + signal.Signals[name(e)]


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def hangup() -> tuple[int, ...]:
  """(SIGHUP,) where it has its default action (not ignored: `nohup`), for a script that
  takes it as SIGTERM (train.py) to defer from its start: a closed terminal's SIGHUP
  before the trainer's own handler (imports, the config) or after `done()` (the ~0.7 s
  teardown) killed the process by the signal, with no line, exit 129 after its `done:`."""
  return (signal.SIGHUP,) if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL else ()


def recording(signum: int) -> bool:
  """Whether `signum` is deferred (recorded for `check()`)."""
  return signal.getsignal(signum) is _record


def defer(signums: Sequence[int] = STOP_SIGNALS) -> dict:
  """Records `signums` from now on instead of acting on them (`check()` raises them);
  returns the handlers replaced, for `undefer`. Off the main thread (no handler can be set
  there), and for a signal already deferred, nothing changes. The first call also has
  the process ignore a deferred signal once it exits (`_ignore_at_exit`)."""
  if threading.current_thread() is not threading.main_thread():
    return {}
  if not _exit_hooked:
    _exit_hooked.append(1)
    atexit.register(_ignore_at_exit)   # registered first, so it runs last
  return {s: signal.signal(s, _record) for s in signums if signal.getsignal(s) is not _record}


_exit_hooked: list[int] = []
_done: list[int] = []   # `done()` was called: the work is complete, the exit status 0


def done() -> str | None:
  """Says the program's work is complete (its output written): a signal from here on
  exits at once with status 0 (the teardown cut short), or is ignored once the exit has
  begun (`_ignore_at_exit`): a conversion that had printed `wrote ...` exited 130 from a
  Ctrl-C in its teardown, and `convert || rm -rf OUT` removed a complete copy. Returns
  the name of a signal recorded and not raised (it came after the last check), for the
  caller to say it was too late to stop anything."""
  _done.append(1)
  late = _pending[:1]
  _pending.clear()
  return signal.Signals(late[0]).name if late else None


def _ignore_at_exit() -> None:
  """The last atexit hook: a deferred SIGTERM is ignored from here on (SIGINT too after
  `done()`). The interpreter's finalisation then puts SIG_DFL back for every Python
  handler, so a SIGTERM in its last moments killed the process by the signal (a conversion
  had printed `wrote ...`: its output was complete, and a wrapper retrying on the non-zero
  status found it there). Before `done()`, SIGINT keeps its default: Ctrl-C still stops a
  teardown that hangs (SIGQUIT and SIGKILL always do)."""
  for s in ((signal.SIGTERM, signal.SIGHUP, signal.SIGINT) if _done
            else (signal.SIGTERM, signal.SIGHUP)):
    if signal.getsignal(s) is _record:
      signal.signal(s, signal.SIG_IGN)


def undefer(previous: dict) -> None:
  """Puts back the handlers `defer` replaced; a signal of theirs still recorded is sent
  again, to them."""
  for s, handler in previous.items():
    signal.signal(s, handler)
  if previous:   # the deferral is over: its stop has been handled
    _stopping.clear()
  if _pending and _pending[0] in previous:
    signal.raise_signal(_pending.pop())


@contextlib.contextmanager
def immediate() -> Iterator[None]:
  """While the body runs (on the main thread), a deferred signal raises at once: for waits
  that can stop anywhere, e.g. reading input. One recorded before raises on entry."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  check()
  _immediate.append(1)
  try:
    yield
  finally:
    _immediate.pop()


@contextlib.contextmanager
def deferred(signums: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
  """`defer` while the body runs, `undefer` after."""
  previous = defer(signums)
  try:
    yield
  finally:
    undefer(previous)
