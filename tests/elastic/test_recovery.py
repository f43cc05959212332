"""Restarts in `W/events.jsonl`: a generation that fails before its first step reports the
recovery it was making (`recovery_failed`), and the next one counts the attempt. The
supervisor's loop runs with its planning, workers and watching replaced (no processes)."""

import types

from jaxrec.elastic import recovery, replan, supervisor as sup
from tests.elastic import elastic_testlib as t


def _supervisor(tmp_path, monkeypatch, outcomes):
  """A Supervisor on 2 x 2 devices whose generations end with `outcomes` in turn."""
  s = sup.Supervisor(sup.Options(num_processes=2, devices_per_process=2, max_restarts=5),
                     [f"--workdir={tmp_path}", "--gin_file=configs/x.gin"])
  monkeypatch.setattr(sup.replan, "load_config", lambda args: None)
  choice = replan.Choice(1, 2, {"data": 2}, "auto", {"dp": 1}, 0.01)
  monkeypatch.setattr(s, "_plan", lambda first=False: (choice, "", ""))

  def launch(c):
    s.choice, s._launched, s.procs = c, s.generation, []   # pylint: disable=protected-access

  monkeypatch.setattr(s, "_launch", launch)
  monkeypatch.setattr(s, "_stop_all", lambda *a, **k: None)
  outs = iter(outcomes)

  def watch():
    out = next(outs)
    if isinstance(out, BaseException):
      raise out
    return out

  monkeypatch.setattr(s, "_watch", watch)
  return s


def test_a_generation_failing_before_its_first_step_reports_the_recovery(tmp_path,
                                                                           monkeypatch):
  """Generation 1 (restarted after worker 1 died) crashed before its first step: its
  recovery vanished from the events (the next failure replaced it, no `resume` came)."""
  fail = sup._Outcome   # pylint: disable=protected-access
  s = _supervisor(tmp_path, monkeypatch, [
      fail("failure", "worker 1 exited (killed by SIGKILL)", lost=1, detected=100.0),
      fail("failure", "worker 0 exited (exit code 1)", lost=1, detected=110.0),
      fail("user_error", "user error", message="worker 0: bad flag", detected=120.0)])
  assert s.run() == sup.EXIT_USER_ERROR
  ev = t.events(str(tmp_path))
  failed = [e for e in ev if e["event"] == "recovery_failed"]
  assert [(e["generation"], e["reason"], e["attempt"], e["ended_by"],
           e["seconds_since_detection"]) for e in failed] == [
      (1, "worker 1 exited (killed by SIGKILL)", 1, "worker 0 exited (exit code 1)", 10.0),
      (2, "worker 0 exited (exit code 1)", 2, "user error", 10.0)]
  assert t.names(ev)[-3:] == ["replan", "recovery_failed", "give_up"], t.names(ev)


def test_an_interrupt_during_a_recovery_reports_it(tmp_path, monkeypatch):
  fail = sup._Outcome   # pylint: disable=protected-access
  s = _supervisor(tmp_path, monkeypatch, [
      fail("failure", "worker 1 hung", lost=1, detected=100.0), KeyboardInterrupt()])
  assert s.run() == 130
  ev = t.events(str(tmp_path))
  assert t.names(ev)[-2:] == ["recovery_failed", "give_up"], t.names(ev)
  assert (ev[-2]["generation"], ev[-2]["reason"], ev[-2]["ended_by"]) == (
      1, "worker 1 hung", "supervisor got SIGINT")


def test_resume_counts_the_attempts():
  first = recovery.begin(100.0, "worker 1 exited", now=101.0)
  again = recovery.begin(110.0, "worker 0 exited", now=110.5, pending=first)
  assert (first["attempt"], again["attempt"], again["stop_s"]) == (1, 2, 0.5)
  proc = types.SimpleNamespace(launched=111.0, initialized={"time": 112.0},
                               first={"time": 115.0, "step": 21, "step_time_s": 2.0})
  resume = recovery.resumed(dict(again, replan_s=0.5), [proc])
  assert (resume["attempt"], resume["step"], resume["seconds_since_detection"]) == (2, 21, 5.0)
  assert resume["breakdown"] == {"stop_s": 0.5, "replan_s": 0.5, "restart_s": 1.0,
                                 "restore_s": 1.0, "compile_s": 2.0}


def test_an_interrupt_while_stopping_a_failed_recovery_reports_it_once(tmp_path, monkeypatch):
  """SIGINT while the supervisor stops a restarted generation that failed before its first
  step: that recovery's `recovery_failed` came twice (ended_by the failure, then SIGINT)."""
  fail = sup._Outcome   # pylint: disable=protected-access
  s = _supervisor(tmp_path, monkeypatch, [
      fail("failure", "worker 1 hung", lost=1, detected=100.0),
      fail("failure", "worker 0 exited (exit code 1)", lost=1, detected=110.0)])
  stops = []

  def stop_all(reason, **_):
    stops.append(reason)
    if reason == "worker 0 exited (exit code 1)":
      raise KeyboardInterrupt

  monkeypatch.setattr(s, "_stop_all", stop_all)
  assert s.run() == 130
  ev = t.events(str(tmp_path))
  failed = [(e["generation"], e["ended_by"]) for e in ev if e["event"] == "recovery_failed"]
  assert failed == [(1, "worker 0 exited (exit code 1)")], failed
  assert t.names(ev)[-2:] == ["recovery_failed", "give_up"], t.names(ev)
