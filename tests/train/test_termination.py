"""jaxrec.train.termination: SIGTERM before the first step stops at the next
`signals.check()` (a restore's blocks); from the first step on it asks for a checkpoint.
A second one exits at once with `signals`' line."""

import os
import signal

import pytest

from jaxrec import signals
from jaxrec.train import termination
from tests.train.conftest import Exited


@pytest.fixture(name="default_sighup")
def _default_sighup():
  """SIGHUP at its default action for the test (a suite run under `nohup` ignores it,
  which the trainer leaves alone), the process's own one put back after."""
  before = signal.signal(signal.SIGHUP, signal.SIG_DFL)
  yield
  signal.signal(signal.SIGHUP, before)


@pytest.fixture(name="second_line")
def _second_line(monkeypatch):
  monkeypatch.setattr(signals, "_second_line", [lambda name: f"again by {name}"])


def test_sigterm_before_training_raises_at_the_next_check():
  """It only set the event: a restore went on to its end, then the first compile, step
  and a save."""
  before = signal.getsignal(signal.SIGTERM)
  with termination.sigterm_requests() as requested:
    os.kill(os.getpid(), signal.SIGTERM)
    assert not requested.is_set()
    with pytest.raises(signals.TerminateRequested):
      signals.check()
  assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.usefixtures("exits", "second_line")
def test_a_second_sigterm_before_training_exits_with_the_line(capfd):
  """It killed the process without a line."""
  with termination.sigterm_requests():
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(Exited) as e:
      os.kill(os.getpid(), signal.SIGTERM)
  assert e.value.args == (143,)
  assert capfd.readouterr().err == "again by SIGTERM\n"


@pytest.mark.usefixtures("exits", "second_line")
def test_sigterm_while_training_asks_for_a_checkpoint_and_a_second_exits(capfd):
  with termination.sigterm_requests() as requested:
    requested.training()
    os.kill(os.getpid(), signal.SIGTERM)
    assert requested.is_set()
    signals.check()   # not raised: the loop saves after the step in progress
    with pytest.raises(Exited) as e:
      os.kill(os.getpid(), signal.SIGTERM)
  assert e.value.args == (143,)
  assert capfd.readouterr().err == "again by SIGTERM\n"


def test_disabled_leaves_sigterm_alone():
  before = signal.getsignal(signal.SIGTERM)
  with termination.sigterm_requests(enabled=False) as requested:
    assert signal.getsignal(signal.SIGTERM) == before
    requested.training()
    assert signal.getsignal(signal.SIGTERM) == before and not requested.is_set()


@pytest.mark.usefixtures("exits", "second_line", "default_sighup")
def test_sighup_asks_for_a_checkpoint_as_sigterm_does(capfd):
  """A closed terminal's SIGHUP killed the run with no line, losing the steps since the
  last checkpoint (and a save in flight)."""
  before = signal.getsignal(signal.SIGHUP)
  with termination.sigterm_requests() as requested:
    os.kill(os.getpid(), signal.SIGHUP)   # before the first step: raised at the next check
    with pytest.raises(signals.TerminateRequested) as e:
      signals.check()
    assert signals.name(e.value) == "SIGHUP" and signals.exit_code(e.value) == 129
  with termination.sigterm_requests() as requested:
    requested.training()
    os.kill(os.getpid(), signal.SIGHUP)
    assert requested.is_set() and requested.signal_name == "SIGHUP"
    stop = requested.terminated("after step 3: checkpoint 3 is saved")
    assert str(stop) == "stopped by SIGHUP after step 3: checkpoint 3 is saved"
    assert stop.exit_code == 129
    with pytest.raises(Exited) as e:
      os.kill(os.getpid(), signal.SIGTERM)
  assert e.value.args == (143,)
  assert capfd.readouterr().err == "again by SIGTERM\n"
  assert signal.getsignal(signal.SIGHUP) == before


def test_an_ignored_sighup_stays_ignored():
  """Under `nohup` SIGHUP is ignored on purpose: the run keeps going."""
  before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
  try:
    with termination.sigterm_requests() as requested:
      requested.training()
      assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
      os.kill(os.getpid(), signal.SIGHUP)
      assert not requested.is_set()
  finally:
    signal.signal(signal.SIGHUP, before)


@pytest.mark.usefixtures("default_sighup")
def test_sighup_deferred_from_the_start_is_taken_too(monkeypatch):
  """train.py defers SIGHUP from its start (`signals.hangup`): before its config, and in
  the teardown after `done:`, a closed terminal killed the run by the signal, no line
  (exit 129 after a complete run, which a wrapper reran). The trainer still takes it."""
  monkeypatch.setattr(signals, "_done", [])
  before = signal.getsignal(signal.SIGHUP)
  assert signals.hangup() == (signal.SIGHUP,)
  previous = signals.defer(signals.hangup())
  try:
    os.kill(os.getpid(), signal.SIGHUP)   # while starting: recorded, raised at a check
    with pytest.raises(signals.TerminateRequested) as e:
      signals.check()
    assert signals.name(e.value) == "SIGHUP"
    signals._stopping.clear()   # pylint: disable=protected-access
    with termination.sigterm_requests() as requested:
      requested.training()
      os.kill(os.getpid(), signal.SIGHUP)
      assert requested.is_set() and requested.signal_name == "SIGHUP"
    assert signals.recording(signal.SIGHUP)   # back to the deferral for the teardown
    signals._ignore_at_exit()   # pylint: disable=protected-access
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN   # as SIGTERM: no death at exit
  finally:
    signals.undefer(previous)
    signal.signal(signal.SIGHUP, before)
