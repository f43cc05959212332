"""The supervisor's decisions, with fake workers (tests/elastic/fake_train.py: no jax, a step
is a short sleep): kill, hang, minimum, restarts, user error, capacity, stragglers."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest

from jaxrec.elastic import stragglers, supervisor as sup
from tests.elastic import elastic_testlib as t

FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_train.py")
TRAIN = ["--gin_file=configs/dlrm_synthetic.gin",
         "--gin_bindings=ExperimentConfig.batch_size=256", "--mesh=data=2,table=2",
         "--plan=auto", "--checkpoint_every=5"]
QUICK = ["--devices_per_process=2", "--hang_timeout=4", "--startup_timeout=60",
         "--stop_grace=2", "--check_every=5", f"--train_script={FAKE}"]


def start(w, launch_flags, steps=150, step_s=0.03, extra=()):
  return t.launch(str(w), [*QUICK, *launch_flags],
                  [*TRAIN, f"--num_steps={steps}", f"--step_s={step_s}", *extra])


def runs(w):
  with open(os.path.join(w, "fake_runs.jsonl")) as f:
    return [json.loads(l) for l in f]


def final_checkpoint(w):
  return max(int(d) for d in os.listdir(os.path.join(w, "checkpoints")) if d.isdigit())


def test_killed_worker_shrinks_and_finishes(tmp_path):
  w = str(tmp_path)
  proc = start(w, ["--num_processes=2"])
  t.wait_step(w, 1, 0, 20, timeout=120, proc=proc)
  t.kill(t.worker_pids(w, 0)[1])
  assert t.finish(proc) == 0, open(os.path.join(w, "launch.log")).read()[-2000:]
  ev = t.events(w)
  names = t.names(ev)
  for name in ("worker_exit", "stop", "replan", "restore", "resume", "finished"):
    assert name in names, names
  assert names.index("worker_exit") < names.index("replan") < names.index("resume")
  exit_ev = next(e for e in ev if e["event"] == "worker_exit")
  assert exit_ev["process"] == 1 and exit_ev["signal"] == "SIGKILL" and exit_ev["lost"]
  assert exit_ev["error"] == "killed by SIGKILL"           # not its last (normal) log line
  assert re.fullmatch(r"step \d+", exit_ev["last_log_line"]), exit_ev
  replan = next(e for e in ev if e["event"] == "replan")
  assert replan["processes"] == 1 and replan["mesh"] == {"data": 1, "table": 2, "row": 1,
                                                          "col": 1}
  restore = [e for e in ev if e["event"] == "restore"][-1]
  launch = [e for e in ev if e["event"] == "launch"][-1]
  assert restore["step"] == launch["checkpoint"] >= 15
  resume = next(e for e in ev if e["event"] == "resume")
  assert set(resume["breakdown"]) == {"stop_s", "replan_s", "restart_s", "restore_s",
                                      "compile_s"}
  assert [(r["generation"], r["processes"], r["mesh"]) for r in runs(w)] == [
      (0, 2, "data=2,table=2,row=1,col=1"), (0, 2, "data=2,table=2,row=1,col=1"),
      (1, 1, "data=1,table=2,row=1,col=1")]
  assert final_checkpoint(w) == 150
  for e in ev:
    assert isinstance(e["time"], float) and isinstance(e["event"], str)


def test_hung_worker_is_treated_as_dead(tmp_path):
  w = str(tmp_path)
  proc = start(w, ["--num_processes=2"])
  t.wait_step(w, 1, 0, 20, timeout=120, proc=proc)
  t.kill(t.worker_pids(w, 0)[1], signal.SIGSTOP)
  assert t.finish(proc) == 0
  ev = t.events(w)
  hang = next(e for e in ev if e["event"] == "hang")
  assert hang["process"] == 1 and hang["seconds_without_progress"] >= 4
  assert hang["state"] in ("T", "t")
  assert next(e for e in ev if e["event"] == "replan")["processes"] == 1
  assert "resume" in t.names(ev) and final_checkpoint(w) == 150


def test_an_eval_longer_than_the_hang_timeout_is_no_hang(tmp_path):
  """The final eval (7 s of batches, no step) outlasts --hang_timeout=4: its batches
  (`worker.report_alive`) count as progress, so nobody is killed; evaluating silently the
  same time is a hang (what every long eval was before)."""
  w = str(tmp_path / "reported")
  proc = start(w, ["--num_processes=2"], steps=20, extra=["--eval_s=7"])
  assert t.finish(proc) == 0, open(os.path.join(w, "launch.log")).read()[-2000:]
  names = t.names(t.events(w))
  assert "hang" not in names and names[-1] == "finished", names
  evals = [r for r in t.progress(w, 0) if r.get("phase") == "eval"]
  assert len(evals) >= 7 and evals[-1]["batches"] >= 60

  w = str(tmp_path / "silent")
  proc = start(w, ["--num_processes=2", "--max_restarts=0"], steps=20,
               extra=["--eval_s=7", "--eval_silent"])
  assert t.finish(proc) != 0
  hang = next(e for e in t.events(w) if e["event"] == "hang")
  assert hang["last_step"] == 20 and hang["seconds_without_progress"] >= 4


def test_an_eval_only_generation_is_not_held_to_the_startup_timeout(tmp_path):
  """A generation that starts at --num_steps only evaluates, so it never reports a step;
  once it reports eval batches, --hang_timeout applies to it, not --startup_timeout from
  its launch (3 s here, shorter than the 6 s eval)."""
  w = str(tmp_path)
  os.makedirs(os.path.join(w, "checkpoints", "20"))
  proc = start(w, ["--num_processes=2", "--startup_timeout=3"], steps=20,
               extra=["--eval_s=6"])
  assert t.finish(proc) == 0, open(os.path.join(w, "launch.log")).read()[-2000:]
  assert "hang" not in t.names(t.events(w))
  assert [r["start"] for r in runs(w)] == [20, 20]


def test_below_minimum_stops_with_a_message(tmp_path):
  w = str(tmp_path)
  proc = start(w, ["--num_processes=2", "--min_processes=2"])
  t.wait_step(w, 1, 0, 10, timeout=120, proc=proc)
  t.kill(t.worker_pids(w, 0)[0])
  assert t.finish(proc) == 2
  ev = t.events(w)
  give_up = ev[-1]
  assert give_up["event"] == "give_up" and give_up["reason"] == "below_min"
  assert give_up["generation"] == 0      # was 1: no such workers (the next run's number)
  log = open(os.path.join(w, "launch.log")).read()
  assert "error: only 1 process(es) x 2 device(s) available, below --min_processes=2" in log
  assert "run the same command again to resume" in log
  assert "replan" not in t.names(ev)
  assert all(p is None or not t.alive(p) for p in t.worker_pids(w, 0))


def _stopped_by_capacity(w, flags, capacity: str) -> list[dict]:
  """Two processes train until the capacity file states `capacity`, which no job can use:
  the supervisor exits 2; its events."""
  proc = start(w, ["--num_processes=2", *flags], steps=400)
  t.wait_step(w, 1, 0, 10, timeout=120, proc=proc)
  _set_capacity(w, capacity)
  assert t.finish(proc) == 2, open(os.path.join(w, "launch.log")).read()[-2000:]
  return t.events(w)


def test_capacity_below_minimum_says_scale_down_then_stops(tmp_path):
  """A capacity file stating fewer than --min_processes stopped the workers and gave up
  (exit 2) with no event saying the capacity dropped."""
  w = str(tmp_path)
  ev = _stopped_by_capacity(w, ["--min_processes=2"], "1\n")
  down = next(e for e in ev if e["event"] == "scale_down")
  assert (down["current"], down["target"], down["available"]) == ([2, 2], [1, 2], 1), down
  assert down["note"] == "below --min_processes=2: the workers stop", down
  names = t.names(ev)
  assert names.index("capacity", names.index("launch")) < names.index("scale_down")
  assert "replan" not in names and ev[-1]["reason"] == "below_min", ev[-1]
  assert all(p is None or not t.alive(p) for p in t.worker_pids(w, 0))


def test_capacity_no_mesh_takes_says_so_then_stops(tmp_path):
  """2 x 3 devices: the batch of 256 divides no mesh of 6 or 3 devices."""
  ev = _stopped_by_capacity(str(tmp_path), [], "2 3\n")
  up = next(e for e in ev if e["event"] == "scale_up")
  assert (up["current"], up["target"], up["available"]) == ([2, 2], [2, 3], 2), up
  assert up["note"] == "no usable mesh for 1 to 2 process(es) x 3 device(s): the workers stop"
  # was `below_min`, though 2 processes (>= --min_processes=1) were available
  assert "replan" not in t.names(ev) and ev[-1]["reason"] == "no_usable_mesh", ev[-1]
  assert ev[-1]["message"].startswith("no usable mesh: 2 process(es): "), ev[-1]


def test_max_restarts(tmp_path):
  w = str(tmp_path)
  proc = start(w, ["--num_processes=2", "--max_restarts=0"])
  t.wait_step(w, 1, 0, 10, timeout=120, proc=proc)
  t.kill(t.worker_pids(w, 0)[1])
  assert t.finish(proc) == 3
  assert t.events(w)[-1]["reason"] == "max_restarts"
  assert ("1 failure (the last: worker 1 killed by SIGKILL): --max_restarts=0 allows 0 "
          "restart(s) after failures"   # ("1 failures exceed ...")
          in open(os.path.join(w, "launch.log")).read())


@pytest.mark.slow   # 12 s: two generations (fast: tests/elastic/test_warnings.py)
def test_a_workers_warning_reaches_the_launchers_stderr_once(tmp_path):
  """The trainer's unused-gin-bindings warning went to W/workers/0.log only (and again for
  each generation), never to the terminal the job was started from."""
  w = str(tmp_path)
  proc = start(w, ["--num_processes=2"], steps=12, extra=["--warn=gin bindings unused: X",
                                                         "--crash_at=0:3"])
  assert t.finish(proc) == 0
  assert [r["generation"] for r in runs(w) if r["process"] == 0] == [0, 1]   # warned twice
  assert open(os.path.join(w, "launch.log")).read().count(
      "warning: gin bindings unused: X\n") == 1
  warned = [e for e in t.events(w) if e["event"] == "warning"]
  assert [(e["generation"], e["process"], e["message"]) for e in warned] == [
      (0, 0, "warning: gin bindings unused: X")]


def _set_capacity(w, text):
  """Writes the supervisor's capacity file `W/elastic/capacity`."""
  os.makedirs(os.path.join(w, "elastic"), exist_ok=True)
  with open(os.path.join(w, "elastic", "capacity"), "w") as f:
    f.write(text)


def test_user_error_is_not_retried(tmp_path):
  w = str(tmp_path)
  proc = start(w, ["--num_processes=2"], extra=["--error"])
  assert t.finish(proc) == 1
  ev = t.events(w)
  assert t.names(ev).count("launch") == 1
  assert ev[-1]["event"] == "give_up" and ev[-1]["reason"] == "user_error"
  assert "the fake trainer fails as asked" in open(os.path.join(w, "launch.log")).read()
  exits = [e for e in ev if e["event"] == "worker_exit"]
  assert exits and all(e["returncode"] == 1 and e["signal"] is None for e in exits)
  assert all(e["error"] == e["last_log_line"] == "error: --error: the fake trainer fails as "
             "asked" for e in exits)                      # an exit code: its last log line
  assert not any(e["lost"] for e in exits), exits         # was true: no slot is lost


def test_user_error_after_a_checkpoint_says_to_fix_it_not_to_rerun(tmp_path):
  """The give_up said 'run the same command again to resume': the same command fails again."""
  w = str(tmp_path)
  os.makedirs(os.path.join(w, "checkpoints", "5"))
  proc = start(w, ["--num_processes=2"], extra=["--error"])
  assert t.finish(proc) == 1
  message = t.events(w)[-1]["message"]
  assert "run the same command again" not in message, message
  assert re.match(r"worker [01]: --error: the fake trainer fails as asked\. Stopping; fix what "
                  r"it names, then run again to resume from the latest checkpoint, step 5 in ",
                  message), message


def test_capacity_file_grows_the_job_after_a_clean_stop(tmp_path):
  w = str(tmp_path)
  _set_capacity(w, "1\n")
  proc = start(w, ["--num_processes=2"], steps=200)
  t.wait_step(w, 0, 0, 20, timeout=120, proc=proc)
  _set_capacity(w, json.dumps({"num_processes": 2, "devices_per_process": 2}))
  assert t.finish(proc) == 0
  ev = t.events(w)
  names = t.names(ev)
  assert "scale_up" in names and "worker_exit" in names
  stop = next(e for e in ev if e["event"] == "stop" or e["event"] == "replan")
  assert stop["event"] == "replan" and stop["processes"] == 2   # workers stopped themselves
  r = runs(w)
  assert [(x["generation"], x["processes"]) for x in r] == [(0, 1), (1, 2), (1, 2)]
  assert r[1]["start"] % 5 == 0 and r[1]["start"] >= 20      # the stop step's checkpoint
  assert final_checkpoint(w) == 200


def test_lost_slot_rejoins(tmp_path):
  w = str(tmp_path)
  proc = start(w, ["--num_processes=2", "--rejoin_after=2"], steps=300)
  t.wait_step(w, 1, 0, 10, timeout=120, proc=proc)
  t.kill(t.worker_pids(w, 0)[1])
  assert t.finish(proc) == 0
  ev = t.events(w)
  names = t.names(ev)
  assert names.index("replan") < names.index("scale_up")
  assert [e["processes"] for e in ev if e["event"] in ("plan", "replan")] == [2, 1, 2]
  assert any(e["event"] == "capacity" and e.get("source") == "rejoin" for e in ev)


@pytest.mark.parametrize("slow", [1, 0])
def test_straggler_is_reported_and_moved_off(tmp_path, slow):
  """The slow slot sits out. A straggler on slot 0 was flagged, and the next generation
  ran on slot 0 again (every generation used slots 0..n-1): a healthy process was dropped
  and the slow one kept, until it was left alone."""
  w = str(tmp_path)
  proc = start(w, ["--num_processes=2", f"--inject_delay={slow}:0.06",
                   "--straggler_window_steps=5", "--replan_on_straggler"], steps=120,
               step_s=0.01)
  assert t.finish(proc) == 0
  ev = t.events(w)
  s = next(e for e in ev if e["event"] == "straggler")
  assert s["kind"] == "process" and s["process"] == slow and s["windows"] == 3
  assert s["slot"] == slow and s["ratio"] > 1.5 and s["action"] == "replan without it"
  replan = next(e for e in ev if e["event"] == "replan")
  assert replan["processes"] == 1 and replan["reason"] == f"straggler process {slow}"
  assert [e["slots"] for e in ev if e["event"] == "launch"] == [[0, 1], [1 - slow]]
  assert [e for e in ev if e["event"] == "straggler"] == [s]
  assert "finished" in t.names(ev)


def test_a_generation_runs_on_the_slots_not_set_aside(tmp_path):
  """Lost and sitting-out slots are skipped, and on GPUs a process gets its slot's devices
  (process p got devices p*K.. whatever slot had failed)."""
  options = sup.Options(num_processes=4, devices_per_process=2, platform="gpu")
  s = sup.Supervisor(options, [f"--workdir={tmp_path}", "--gin_file=configs/x.gin"])
  s.lost, s.quarantine = {0: time.time()}, {2: time.time() + 100}
  assert s._free_slots() == [1, 3] and s._available() == 2
  s.slots = s._free_slots()
  env = s._env(0, types.SimpleNamespace(processes=2, devices_per_process=2), 1234)
  assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env[sup.worker_lib.ENV_SLOT] == "1"
  assert s._env(1, types.SimpleNamespace(processes=2, devices_per_process=2), 1234)[
      "CUDA_VISIBLE_DEVICES"] == "6,7"
  s.quarantine = {2: time.time() - 1}            # its cool-down is over: it returns
  assert s._free_slots() == [1, 2, 3]


def test_a_straggler_is_only_reported_when_setting_it_aside_changes_nothing(tmp_path):
  """3 processes available, 2 used (the batch of 256 does not divide 6 devices): setting
  the slow one's slot aside leaves 2 usable. The event said 'replan without it' and the job
  stopped and restarted on the same 2 processes."""
  w = str(tmp_path)
  _set_capacity(w, "3\n")
  proc = start(w, ["--num_processes=2", "--inject_delay=1:0.1", "--straggler_window_steps=5",
                   "--replan_on_straggler"], steps=50, step_s=0.01)
  assert t.finish(proc) == 0, open(os.path.join(w, "launch.log")).read()[-2000:]
  ev = t.events(w)
  s = next(e for e in ev if e["event"] == "straggler")
  assert s["process"] == 1 and s["action"] == "report", s
  assert s["note"] == "without its slot the job would run 2 process(es), not fewer", s
  assert [e["processes"] for e in ev if e["event"] in ("plan", "replan")] == [2]
  assert "stop" not in t.names(ev) and ev[-1]["event"] == "finished"


def test_a_second_straggler_in_the_same_poll_says_the_job_is_already_replanning(
    tmp_path, monkeypatch):
  """Two stragglers found in one poll (no workers): the first triggers the replan; the
  second was `action: report` with no note saying why it was not acted on."""
  options = sup.Options(num_processes=3, devices_per_process=2, replan_on_straggler=True)
  s = sup.Supervisor(options, [f"--workdir={tmp_path}", "--gin_file=configs/x.gin"])
  found = [stragglers.Straggler(kind, entity, 2.0, 3, 30, 0.02, 0.01)
           for kind, entity in (("process", "1"), ("shard", "2/0"))]
  s.detectors = (types.SimpleNamespace(poll=lambda: found),)
  s.choice, s.config, s.slots = types.SimpleNamespace(processes=3), None, [0, 1, 2]
  monkeypatch.setattr(sup.replan, "without_one", lambda *args: 2)
  out = s._check_stragglers(100.0)
  assert out.kind == "planned" and out.reason == "straggler process 1"
  first, second = [e for e in t.events(str(tmp_path)) if e["event"] == "straggler"]
  assert first["action"] == "replan without it" and "note" not in first, first
  assert second["process"] == 2 and second["action"] == "report", second
  assert second["note"] == "the job is already re-planning for straggler process 1", second


def test_no_usable_mesh_is_its_own_give_up_reason(tmp_path, monkeypatch):
  """Enough processes but no mesh of them (no workers): the give_up reason was `below_min`."""
  s = sup.Supervisor(sup.Options(num_processes=2, devices_per_process=3, min_processes=1),
                     [f"--workdir={tmp_path}", "--gin_file=configs/x.gin"])
  s.config = None
  monkeypatch.setattr(sup.replan, "best_choice",
                      lambda *args: (None, ["2 process(es): not divisible"]))
  assert s._plan() == (None, "no usable mesh: 2 process(es): not divisible",
                       "no_usable_mesh")
  s.lost = {0: 0.0, 1: 0.0}
  assert s._plan() == (None, "only 0 process(es) x 3 device(s) available, below "
                       "--min_processes=1 (lost slot(s) [0, 1] never come back without "
                       "--rejoin_after=S, which offers a lost slot again after S seconds, e.g. "
                       "to restart a crashed worker where it ran)", "below_min")
  s.o = dataclasses.replace(s.o, rejoin_after=60.0)   # they do come back: nothing to add
  s.lost = {0: time.time(), 1: time.time()}
  assert s._plan() == (None, "only 0 process(es) x 3 device(s) available, below "
                       "--min_processes=1", "below_min")


@pytest.mark.slow
def test_run_again_after_the_end_reports_the_final_step(tmp_path):
  w = str(tmp_path)
  assert t.finish(start(w, ["--num_processes=2"], steps=30)) == 0
  n = len(t.events(w))
  assert t.finish(start(w, ["--num_processes=2"], steps=30)) == 0   # nothing left to train
  ev = t.events(w)[n:]
  assert [e["last_step"] for e in ev if e["event"] == "worker_exit"] == [30, 30]
  assert ev[-1]["event"] == "finished" and ev[-1]["step"] == 30


def test_a_worker_given_sigterm_checkpoints_and_the_job_replans_without_its_slot(tmp_path):
  """A preempted worker's SIGTERM: with several processes jax's preemption notifier
  swallowed it (no event, no checkpoint: the job trained on until the SIGKILL came); a
  single worker died at once. Now the generation saves at its next check step and stops,
  and the job goes on without that slot."""
  w = str(tmp_path)
  proc = start(w, ["--num_processes=2"], steps=60)
  t.wait_step(w, 1, 0, 7, timeout=120, proc=proc)
  t.kill(t.worker_pids(w, 0)[1], signal.SIGTERM)
  assert t.finish(proc) == 0, open(os.path.join(w, "launch.log")).read()[-2000:]
  ev = t.events(w)
  (term,) = [e for e in ev if e["event"] == "sigterm"]
  assert (term["process"], term["slot"], term["generation"]) == (1, 1, 0)
  stop = next(e for e in ev if e["event"] == "replan")
  assert stop["reason"] == "worker 1 got SIGTERM" and stop["processes"] == 1
  assert [e["slots"] for e in ev if e["event"] == "launch"] == [[0, 1], [0]]
  exits = [e for e in ev if e["event"] == "worker_exit" and e["generation"] == 0]
  assert sorted(e["returncode"] for e in exits) == [0, 0]   # both saved and left
  assert ev[-1]["event"] == "finished" and ev[-1]["restarts"] == 0
  second = [r for r in runs(w) if r["generation"] == 1]
  assert second and second[0]["start"] % 5 == 0 and second[0]["start"] > 7   # its checkpoint


def test_the_only_worker_given_sigterm_checkpoints_then_the_job_stops(tmp_path):
  w = str(tmp_path)
  proc = start(w, ["--num_processes=1"], steps=200, extra=["--mesh=data=2"])
  t.wait_step(w, 0, 0, 7, timeout=120, proc=proc)
  t.kill(t.worker_pids(w, 0)[0], signal.SIGTERM)
  assert t.finish(proc) == 2
  ev = t.events(w)
  assert [e["process"] for e in ev if e["event"] == "sigterm"] == [0]
  (exit_,) = [e for e in ev if e["event"] == "worker_exit"]
  assert exit_["returncode"] == 0 and ev[-1]["event"] == "give_up"
  assert ev[-1]["reason"] == "below_min" and ev[-1]["checkpoint"] > 7


def test_the_only_worker_given_sigterm_with_rejoin_after_waits_for_its_slot(tmp_path):
  """With --rejoin_after the slot is due back: the job waited for it, not gave up (exit 2)."""
  w = str(tmp_path)
  proc = start(w, ["--num_processes=1", "--rejoin_after=1"], steps=60, extra=["--mesh=data=2"])
  t.wait_step(w, 0, 0, 7, timeout=120, proc=proc)
  t.kill(t.worker_pids(w, 0)[0], signal.SIGTERM)
  assert t.finish(proc) == 0
  ev = t.events(w)
  names = t.names(ev)
  assert names.index("sigterm") < names.index("wait") < names.index("replan"), names
  assert "give_up" not in names and names[-1] == "finished", names
  (launch,) = [e for e in ev if e["event"] == "launch" and e["generation"] == 1]
  assert launch["slots"] == [0] and launch["checkpoint"] > 7, launch
  assert final_checkpoint(w) == 60


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")
def test_workers_die_with_a_killed_supervisor(tmp_path):
  w = str(tmp_path)
  proc = start(w, ["--num_processes=2"], steps=100000)
  t.wait_step(w, 1, 0, 5, timeout=120, proc=proc)
  pids = t.worker_pids(w, 0)
  t.kill(proc.pid)                                # no chance to stop them
  proc.wait()
  try:
    t.wait_for(lambda: not any(t.alive(p) for p in pids), 20, "the workers to die")
  finally:
    for p in pids:
      if t.alive(p):
        t.kill(p)


def test_requested_stop_waits_for_the_check_step_not_a_periodic_checkpoint(tmp_path):
  w = str(tmp_path)
  _set_capacity(w, "1\n")
  # Checkpoints every 5 steps, stop checks every 30. Under load the supervisor may see the
  # new capacity after step 30; the workers then stop at the next check step (60, 90 or,
  # on a busy machine, 120: it once saw it only after step 90 of 100). After saving they
  # take 0.3 s to exit; the grace (2 x 0.75 s) counts from the checkpoint's appearance, not
  # from the request ~2.8 s before it (a stop there failed CI).
  proc = start(w, ["--num_processes=2", "--check_every=30", "--stop_grace=0.75"], steps=150,
               step_s=0.1, extra=["--linger_s=0.3"])
  t.wait_step(w, 0, 0, 2, timeout=120, proc=proc)
  _set_capacity(w, "2\n")
  assert t.finish(proc) == 0
  events = t.events(w)
  names = t.names(events)
  assert "scale_up" in names and "stop" not in names, events  # the worker stopped itself
  gens = [(x["generation"], x["start"]) for x in runs(w)]
  assert gens[0] == (0, 0) and len(gens) == 3, gens
  assert gens[1] == gens[2] and gens[1][0] == 1 and gens[1][1] in (30, 60, 90, 120), gens


def test_a_second_supervisor_on_the_workdir_is_refused(tmp_path):
  """It used to start its own workers: it deleted the first one's stop requests, wrote its
  events (start ... give_up) into the first one's events.jsonl and its workers' progress
  lines (generation 0) into the files the first one reads."""
  w = str(tmp_path)
  first = start(w, ["--num_processes=2"], steps=100000)
  t.wait_step(w, 1, 0, 5, timeout=120, proc=first)
  n = len(t.events(w))
  cmd = [sys.executable, os.path.join(t.ROOT, "scripts", "launch.py"), "--quiet", *QUICK,
         "--num_processes=2", "--", f"--workdir={w}", *TRAIN, "--num_steps=50"]
  try:
    second = subprocess.run(cmd, capture_output=True, text=True, env=t.env(), cwd=t.ROOT,
                            timeout=120)
  finally:
    first.send_signal(signal.SIGTERM)
    t.finish(first, timeout=60)
  assert second.returncode == 1, second.stderr[-2000:]
  assert (f"error: --workdir: {w} is in use by another scripts/launch.py (pid {first.pid})"
          in second.stderr), second.stderr[-2000:]
  later = t.events(w)[n:]
  assert "start" not in t.names(later) and later[-1]["event"] == "give_up", later
  assert later[-1]["reason"] == "interrupted"           # the first's SIGTERM, not the second


def test_a_capacity_file_found_at_start_is_an_upper_bound_like_later(tmp_path):
  """A running job given `3` (6 devices: the batch of 256 does not divide them) stays on 2
  processes; the same command run again (after a crash of the supervisor) found the file
  and stopped: 'error: 3 process(es): ExperimentConfig.batch_size=256 is not divisible by
  the 6 devices' (exit 1), blaming the config that ran a moment before."""
  w = str(tmp_path)
  _set_capacity(w, "3\n")
  assert t.finish(start(w, ["--num_processes=2"], steps=10)) == 0, (
      open(os.path.join(w, "launch.log")).read()[-2000:])
  plan = next(e for e in t.events(w) if e["event"] == "plan")
  assert plan["processes"] == 2 and final_checkpoint(w) == 10


def test_the_same_devices_in_other_processes_is_a_rescale(tmp_path):
  """A capacity of `1 8` replacing `2 4` was reported as `scale_down`."""
  s = sup.Supervisor(sup.Options(num_processes=2, devices_per_process=4),
                     [f"--workdir={tmp_path}", "--gin_file=configs/x.gin"])
  s.choice = types.SimpleNamespace(processes=2, devices_per_process=4)
  assert [s._emit_scale(target, 1) for target in ((1, 8), (1, 4), (4, 4))] == [
      "rescale", "scale_down", "scale_up"]
  assert [e["event"] for e in t.events(str(tmp_path))] == ["rescale", "scale_down", "scale_up"]


def test_a_worker_that_never_joins_is_the_one_blamed(tmp_path):
  """Before any step every worker is at step 0, equally silent: the hang was blamed on
  process 0, its healthy slot was counted lost, the next generation ran on the broken slot
  alone, hung again, and the job gave up with both slots lost. The one that never wrote
  its `joining` record is the one the others wait for."""
  w = str(tmp_path)
  proc = start(w, ["--num_processes=2", "--startup_timeout=4"], steps=20,
               extra=["--stuck_slot=1"])
  assert t.finish(proc) == 0, open(os.path.join(w, "launch.log")).read()[-2000:]
  ev = t.events(w)
  hang = next(e for e in ev if e["event"] == "hang")
  assert hang["process"] == 1 and hang["last_step"] == 0, hang
  assert [(r["generation"], r["processes"]) for r in runs(w)] == [(1, 1)]
  assert final_checkpoint(w) == 20
