"""SIGTERM to scripts/launch.py (a preemption: Kubernetes and Slurm send it to the launcher,
then SIGKILL a grace period later): the workers save at their next check step, then the
job stops with exit 143. It used to kill the workers at once, losing every step since the
last periodic checkpoint (a bare train.py saved them). SIGHUP (a closed terminal) does the
same, exit 129, unless ignored. Fake workers (fake_train.py)."""

import os
import signal

import pytest

from tests.elastic import elastic_testlib as t

FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_train.py")
# Periodic checkpoints are rare (every 1000 steps): a checkpoint is the stop's own.
TRAIN = ["--gin_file=configs/dlrm_synthetic.gin", "--mesh=data=2,table=2", "--plan=auto",
         "--checkpoint_every=1000", "--num_steps=100000"]
QUICK = ["--devices_per_process=2", "--hang_timeout=10", "--startup_timeout=60",
         "--stop_grace=2", f"--train_script={FAKE}", "--num_processes=2"]


def _default_sighup():
  """SIGHUP's default action in the launcher, whatever the suite's (a run under `nohup`)."""
  signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start(w, launch_flags=(), step_s=0.03):
  return t.launch(str(w), [*QUICK, *launch_flags], [*TRAIN, f"--step_s={step_s}"],
                  preexec_fn=_default_sighup)


def launch_log(w):
  with open(os.path.join(w, "launch.log")) as f:
    return f.read()


def sigterm_after_step(w, proc, step, signum=signal.SIGTERM):
  t.wait_step(w, 1, 0, step, timeout=120, proc=proc)
  pids = t.worker_pids(w, 0)
  t.kill(proc.pid, signum)
  return pids


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_saves_at_the_next_check_step_then_stops(tmp_path, signum):
  w, name = str(tmp_path), signal.Signals(signum).name
  proc = start(w, ["--check_every=5"])
  pids = sigterm_after_step(w, proc, 7, signum)
  assert t.finish(proc, timeout=60) == 128 + signum, launch_log(w)[-2000:]
  assert not any(t.alive(p) for p in pids)
  ev = t.events(w)
  (term,) = [e for e in ev if e["event"] == "terminate"]
  assert term["checkpoint"] is None and term["step"] >= 7 and term["generation"] == 0
  assert term["signal"] == name
  exits = [e for e in ev if e["event"] == "worker_exit"]
  assert sorted(e["returncode"] for e in exits) == [0, 0]       # they saved and left
  assert "stop" not in t.names(ev) and "replan" not in t.names(ev)
  give_up = ev[-1]
  saved = give_up["checkpoint"]
  assert give_up["event"] == "give_up" and give_up["reason"] == "interrupted"
  assert saved % 5 == 0 and saved >= term["step"], (saved, term)
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == [str(saved)]
  assert (f"{name}: the workers save at their next check step (--check_every=5; or the step "
          "of an eval in progress or coming before it, which stops), then the job stops; at "
          "most --stop_timeout=300 s." in launch_log(w))
  assert (f"error: stopped by {name} after the workers saved step {saved}. Stopping; the "
          f"latest checkpoint is step {saved}" in launch_log(w)), launch_log(w)[-2000:]


def test_a_second_sigterm_kills_the_workers_at_once(tmp_path):
  w = str(tmp_path)
  proc = start(w, ["--check_every=100000"])                   # no check step comes
  pids = sigterm_after_step(w, proc, 3)
  t.wait_for(lambda: "terminate" in t.names(t.events(w)), 30, "the terminate event", proc)
  t.kill(proc.pid, signal.SIGTERM)
  assert t.finish(proc, timeout=30) == 128 + signal.SIGTERM
  t.wait_for(lambda: not any(t.alive(p) for p in pids), 20, "the workers to die")
  assert "error: interrupted again by SIGTERM (exited at once" in launch_log(w)
  assert not os.path.isdir(os.path.join(w, "checkpoints"))
  # recorded: the next run took it for a launcher killed without a word, and blamed a
  # scheduler's grace period for the steps lost
  give_up = t.events(w)[-1]
  assert (give_up["event"], give_up["reason"]) == ("give_up", "interrupted_again"), give_up
  assert give_up["message"].startswith("interrupted again by SIGTERM (exited at once")
  from jaxrec.elastic import events  # pylint: disable=import-outside-toplevel
  assert events.unfinished_run(t.events(w)) is None


def test_workers_that_do_not_save_within_stop_timeout_are_killed(tmp_path):
  w = str(tmp_path)
  proc = start(w, ["--check_every=100000", "--stop_timeout=1"])
  pids = sigterm_after_step(w, proc, 3)
  assert t.finish(proc, timeout=60) == 128 + signal.SIGTERM
  assert not any(t.alive(p) for p in pids)
  ev = t.events(w)
  assert t.names(ev)[-3:] == ["terminate", "stop", "give_up"], t.names(ev)
  assert ev[-2]["reason"] == "supervisor got SIGTERM" and sorted(ev[-2]["stopped"]) == [0, 1]
  assert ("error: interrupted by SIGTERM (the workers saved no checkpoint within "
          "--stop_timeout=1 s and were killed). Stopping; no checkpoint was saved"
          in launch_log(w)), launch_log(w)[-2000:]


def test_sigterm_with_nothing_trained_since_the_checkpoint_kills_at_once(tmp_path):
  """Steps of 30 s: the first is still running, nothing to save; the stop would have
  waited a whole step for it."""
  w = str(tmp_path)
  proc = start(w, ["--check_every=1"], step_s=30)
  t.wait_for(lambda: t.names(t.events(w)).count("initialized") == 2, 60, "the workers", proc)
  pids = t.worker_pids(w, 0)
  t.kill(proc.pid, signal.SIGTERM)
  assert t.finish(proc, timeout=20) == 128 + signal.SIGTERM
  assert not any(t.alive(p) for p in pids)
  ev = t.events(w)
  assert "terminate" not in t.names(ev) and ev[-1]["reason"] == "interrupted"
  assert "error: interrupted by SIGTERM. Stopping" in launch_log(w)


def test_sigterm_during_an_eval_stops_it_and_saves_that_step(tmp_path):
  """The launcher's SIGTERM while the workers evaluate (a 30 s eval after step 5): they
  stop the eval at its next checked batch, save step 5 and exit, well within
  --stop_timeout. Before, the eval ran on (then the steps to the next check step): the
  workers were killed at --stop_timeout with nothing saved."""
  w = str(tmp_path)
  proc = t.launch(w, [*QUICK, "--check_every=3", "--stop_timeout=20"],
                  [*TRAIN, "--step_s=0.03", "--eval_every=5", "--eval_s=30"])
  t.wait_for(lambda: any(r.get("phase") == "eval" for r in t.progress(w, 0)), 120,
             "the eval", proc)
  pids = t.worker_pids(w, 0)
  t.kill(proc.pid, signal.SIGTERM)
  assert t.finish(proc, timeout=60) == 128 + signal.SIGTERM, launch_log(w)[-2000:]
  assert not any(t.alive(p) for p in pids)
  ev = t.events(w)
  assert sorted(e["returncode"] for e in ev if e["event"] == "worker_exit") == [0, 0]
  assert ev[-1]["checkpoint"] == 5 and "stop" not in t.names(ev), t.names(ev)
  assert ("error: stopped by SIGTERM after the workers saved step 5. Stopping" in
          launch_log(w)), launch_log(w)[-2000:]


def test_sigterm_to_the_launcher_and_its_workers_at_once_stops_the_job(tmp_path):
  """Slurm signals every process of the job: the workers' own SIGTERMs make the same stop,
  the job ends (143) rather than re-plans, and their `sigterm` events say so (they read
  `replan without it`); their `worker_exit` events do not call their slots lost."""
  w = str(tmp_path)
  # check steps 1.2 s apart: the launcher sees its SIGTERM before the workers save (when
  # they have saved first, nothing is left to save: it stops them at once, no events)
  proc = start(w, ["--check_every=40"])
  t.wait_step(w, 1, 0, 7, timeout=120, proc=proc)
  pids = t.worker_pids(w, 0)
  for pid in (proc.pid, *pids):
    t.kill(pid, signal.SIGTERM)
  assert t.finish(proc, timeout=60) == 128 + signal.SIGTERM, launch_log(w)[-2000:]
  ev = t.events(w)
  assert "replan" not in t.names(ev) and ev[-1]["reason"] == "interrupted", t.names(ev)
  assert ev[-1]["checkpoint"] == 40 and "terminate" in t.names(ev), t.names(ev)
  told = [e for e in ev if e["event"] == "sigterm"]
  assert told and all("replan" not in e["action"] for e in told), told
  # the workers saved and exited 0 as the job ends: no slot is lost (they read lost: true)
  exits = [e for e in ev if e["event"] == "worker_exit"]
  assert len(exits) == 2 and not any(e["lost"] for e in exits), exits
