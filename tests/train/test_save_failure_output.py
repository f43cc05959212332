"""What a failed checkpoint save prints: `futures.join_threads` waiting for its other writer
threads, and orbax's ERROR records without their tracebacks."""

import logging
import sys
import threading

from jaxrec import futures, launch


class _FailingWriter(threading.Thread):
  """Like orbax's `_SignalingThread`: `join` re-raises what its work hit."""

  def __init__(self, release):
    super().__init__(daemon=True)
    self.release, self.done = release, False

  def run(self):
    self.release.wait(10)
    self.done = True

  def join(self, timeout=None):
    super().join(timeout)
    raise OSError(28, "No space left on device")


def test_a_writer_thread_that_raises_on_join_is_waited_for_and_dropped():
  """A second writer's ENOSPC, re-raised by its `join`, replaced the save's one-line
  CheckpointError with an OSError traceback (`CheckpointManager._save_errors`)."""
  before = set(threading.enumerate())
  release = threading.Event()
  writer = _FailingWriter(release)
  writer.start()
  threading.Timer(0.2, release.set).start()
  futures.join_threads(before, __name__.split(".")[0] + ".")
  assert writer.done and not writer.is_alive()


def test_orbax_errors_are_logged_without_their_tracebacks():
  """A full disk during a save logged two orbax tracebacks of ~50 lines each before the
  one-line `error: saving checkpoint N ... failed`; the records' first lines stay."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  handler = absl_logging.get_absl_handler()
  before = list(handler.filters)
  try:
    launch.quiet_orbax_tracebacks()
    launch.quiet_orbax_tracebacks()   # once only
    added = [f for f in handler.filters if f not in before]
    assert len(added) == 1
    try:
      raise OSError(28, "No space left on device")
    except OSError:
      info = sys.exc_info()
    mine = logging.LogRecord("absl", logging.ERROR, "/x/jaxrec/loop.py", 1, "m", (), info)
    orbax = logging.LogRecord("absl", logging.ERROR, "/x/orbax/checkpoint/f.py", 1,
                              "Failed to run", (), info)
    assert added[0].filter(orbax) and orbax.exc_info is None and orbax.getMessage()
    assert added[0].filter(mine) and mine.exc_info is info
    # the failed save's other writes, collected after its error line: one line each
    unretrieved = logging.LogRecord("asyncio", logging.ERROR, "/x/asyncio/base_events.py", 1,
                                    "Future exception was never retrieved", (), info)
    assert added[0].filter(unretrieved) and unretrieved.exc_info is None
    # tensorstore's calls into the event loop orbax closed: dropped
    assert getattr(sys.unraisablehook, "jaxrec_closed_loop", False)
  finally:
    for f in list(handler.filters):
      if f not in before:
        handler.removeFilter(f)
