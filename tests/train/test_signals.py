"""jaxrec.signals: SIGINT / SIGTERM recorded while deferred, raised at `check()`."""

import contextlib
import gc
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from jaxrec import signals
from tests.train.conftest import Exited


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


def _second_signal_exit(sig) -> int:
  with pytest.raises(Exited) as e:
    os.kill(os.getpid(), sig)
  return e.value.args[0]


@pytest.mark.usefixtures("exits")
def test_a_second_signal_before_a_check_exits_at_once_with_the_line(capfd):
  """It raised KeyboardInterrupt, which a gc callback swallowed (and cleared the first)."""
  signals.on_second_signal(lambda name: f"error: interrupted again by {name}; checkpoint 3")
  with signals.deferred():
    os.kill(os.getpid(), signal.SIGTERM)
    assert _second_signal_exit(signal.SIGINT) == 130
  assert capfd.readouterr().err == "error: interrupted again by SIGINT; checkpoint 3\n"


@pytest.mark.usefixtures("exits")
def test_a_signal_while_stopping_after_a_check_exits_at_once(capfd):
  """The clean-up after the first (a checkpoint save in flight, removing temporary output)
  is not waited for: a second signal there exits too, with 128 + its number."""
  with signals.deferred():
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
      signals.check()
    assert _second_signal_exit(signal.SIGTERM) == 143
  assert capfd.readouterr().err == "error: interrupted again by SIGTERM\n"   # no line given
  with signals.deferred():   # a new deferral starts afresh: the first is recorded again
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
      signals.check()


@pytest.mark.usefixtures("exits")
def test_a_failing_line_still_exits(capfd):
  signals.on_second_signal(lambda name: {}["workdir"])
  with signals.deferred():
    os.kill(os.getpid(), signal.SIGINT)
    assert _second_signal_exit(signal.SIGINT) == 130
  assert capfd.readouterr().err == (
      "error: interrupted again by SIGINT (KeyError composing the message)\n")


@pytest.mark.slow
def test_a_second_signal_inside_a_gc_callback_exits_the_process(tmp_path):
  """In a process of its own (it exits): sent where a raise is swallowed, the second
  signal still ends it, with its line and 130, and nothing after it runs."""
  proc = _in_a_process(tmp_path, "from tests.train.test_signals import "
                       "_signal_inside_a_gc_callback as send",
                       "signals.defer(); signals.on_second_signal(lambda n: 'second ' + n)",
                       "send(signal.SIGINT); send(signal.SIGINT)", "print('went on')")
  assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "second SIGINT\n")


def _in_a_process(cwd, *lines):
  """`lines` run as a Python program of its own (with this checkout importable, `os`,
  `signal`, `time` and `jaxrec.signals` imported), in `cwd`."""
  code = "\n".join([f"import sys; sys.path.insert(0, {repr(os.getcwd())})",
                    "import os, signal, time", "from jaxrec import signals", *lines])
  return subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True,
                        timeout=60, cwd=cwd)


def test_a_signal_in_the_interpreters_last_moments_is_ignored(tmp_path):
  """Finalisation puts SIG_DFL back for Python handlers: a SIGTERM then (here from a
  `__del__` at module teardown) killed a finished script by the signal (exit 143 after a
  conversion printed `wrote ...`). The last atexit hook now ignores deferred signals."""
  proc = _in_a_process(tmp_path, "signals.defer()", "class Late:", "  def __del__(self):",
                       "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)",
                       "late = Late()", "print('done')")
  assert (proc.returncode, proc.stdout) == (0, "done\n"), proc.stderr


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
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(signals.TerminateRequested), signals.immediate():
      pass   # one recorded before: raised on entry
  with signals.deferred():   # a new deferral (a second signal in this one would exit)
    try:
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


def test_a_check_off_the_main_thread_leaves_the_signal_to_the_main_thread():
  """Code with checks (an offloaded store's writes) also runs on prefetch threads: a raise
  there consumed the signal and ended only that thread."""
  with signals.deferred():
    os.kill(os.getpid(), signal.SIGINT)
    raised = []

    def in_thread():
      try:
        signals.check()
      except BaseException as e:  # pylint: disable=broad-except
        raised.append(e)
    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert not raised
    with pytest.raises(KeyboardInterrupt):
      signals.check()


@pytest.mark.parametrize("when", ["teardown", "recorded", "running"])
def test_after_done_a_sigint_leaves_the_exit_status_0(tmp_path, when):
  """A conversion that had printed `wrote ...` exited 130 from a Ctrl-C in its teardown (a
  wrapper's `|| rm -rf OUT` removed the complete copy). After `done()`: ignored in the
  teardown, a recorded one reported, a later one exits at once with status 0."""
  lines = {"teardown": ["signals.done()", "class Late:", "  def __del__(self):",
                        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.05)",
                        "late = Late()"],
           "recorded": ["os.kill(os.getpid(), signal.SIGINT)", "late = signals.done()",
                        "print(late)"],
           "running": ["signals.done()", "os.kill(os.getpid(), signal.SIGINT)",
                       "time.sleep(5)", "print('not reached')"]}[when]
  proc = _in_a_process(tmp_path, "signals.defer()", *lines, "print('done')")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == {"teardown": "done\n", "recorded": "SIGINT\ndone\n", "running": ""}[when]
  if when == "running":
    assert proc.stderr.endswith("note: SIGINT after the output was complete; it is kept "
                                "(exiting now)\n"), proc.stderr
