"""jaxrec.signals: SIGINT / SIGTERM recorded while deferred, raised at `check()`."""

import contextlib
import gc
import os
import signal
import threading
import time

import pytest

from jaxrec import signals


def _signal_inside_a_gc_callback(sig):
  """Sends `sig` to this process from a gc callback, where Python runs its handler: an
  exception the handler raises there is printed as ignored (jax's `_xla_gc_callback`)."""
  def callback(phase, info):  # pylint: disable=unused-argument
    if phase == "start":
      gc.callbacks.remove(callback)
      os.kill(os.getpid(), sig)
  gc.callbacks.append(callback)
  gc.collect()


@pytest.mark.parametrize("sig, raised", [(signal.SIGINT, KeyboardInterrupt),
                                         (signal.SIGTERM, signals.TerminateRequested)])
def test_a_signal_in_a_gc_callback_is_raised_at_the_next_check(sig, raised):
  """Without deferring, SIGINT there was swallowed and the run went on."""
  before = [signal.getsignal(s) for s in signals.STOP_SIGNALS]
  with signals.deferred():
    _signal_inside_a_gc_callback(sig)
    with pytest.raises(raised):
      signals.check()
    signals.check()   # raised once
  assert [signal.getsignal(s) for s in signals.STOP_SIGNALS] == before


def test_a_second_signal_before_a_check_raises_at_once():
  with signals.deferred():
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
    signals.check()   # nothing left


def test_a_signal_still_recorded_at_the_end_goes_to_the_previous_handler():
  """E.g. between scripts/train.py's last start-up check and the trainer's own handling."""
  with pytest.raises(KeyboardInterrupt):
    with signals.deferred():
      os.kill(os.getpid(), signal.SIGINT)
  signals.check()   # not raised twice


def test_nested_deferral_keeps_the_outer_one():
  """The supervisor defers again inside scripts/launch.py's deferral: its end must not
  put SIGINT's default back (a signal then would raise anywhere again)."""
  before = signal.getsignal(signal.SIGINT)
  outer = signals.defer()
  try:
    with signals.deferred():
      pass
    os.kill(os.getpid(), signal.SIGINT)   # still recorded, not raised here
    with pytest.raises(KeyboardInterrupt):
      signals.check()
  finally:
    signals.undefer(outer)
  assert signal.getsignal(signal.SIGINT) is before


def test_within_immediate_a_signal_raises_at_once():
  """A deferred signal in a blocking read (a pipe that stays open) was only recorded: the
  read went on waiting and no check came."""
  r, w = os.pipe()
  # the signal comes while the read waits (or just before: raised at once either way); the
  # byte written after it ends a read that only recorded it
  sender = threading.Thread(target=lambda: (os.kill(os.getpid(), signal.SIGINT),
                                            time.sleep(2), os.write(w, b"x")))
  with signals.deferred():
    try:
      os.kill(os.getpid(), signal.SIGTERM)
      with pytest.raises(signals.TerminateRequested), signals.immediate():
        pass   # one recorded before: raised on entry
      with pytest.raises(KeyboardInterrupt), signals.immediate():
        sender.start()
        os.read(r, 1)
    finally:   # a failure leaves none recorded (it would end pytest)
      if sender.ident is not None:
        sender.join()
      with contextlib.suppress(KeyboardInterrupt, signals.TerminateRequested):
        signals.check()
      os.close(r)
      os.close(w)
