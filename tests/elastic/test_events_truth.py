"""What `W/events.jsonl` says about restarts adds up (fake workers, tests/elastic/fake_train.py):
the `resume` breakdown covers the whole recovery."""

import json
import os
import re

import pytest

from jaxrec.elastic import events as events_lib
from tests.elastic import elastic_testlib as t

FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_train.py")
TRAIN = ["--gin_file=configs/dlrm_synthetic.gin",
         "--gin_bindings=ExperimentConfig.batch_size=256", "--mesh=data=2,table=2",
         "--plan=auto", "--checkpoint_every=5"]


def _launch(w, launch_flags, steps, step_s):
  return t.launch(w, ["--devices_per_process=2", "--hang_timeout=10", "--startup_timeout=60",
                      "--stop_grace=2", f"--train_script={FAKE}", *launch_flags],
                  [*TRAIN, f"--num_steps={steps}", f"--step_s={step_s}"])


def test_resume_breakdown_counts_the_time_a_requested_stop_takes(tmp_path):
  # A scale-up asks the workers to stop at the next check step (40): they keep training
  # ~2 s before they save and exit. That time was missing from the breakdown (stop_s ~0,
  # measured only after the workers had already gone).
  w = str(tmp_path)
  os.makedirs(os.path.join(w, "elastic"))
  with open(os.path.join(w, "elastic", "capacity"), "w") as f:
    f.write("1\n")
  proc = _launch(w, ["--num_processes=2", "--check_every=40"], steps=60, step_s=0.05)
  t.wait_step(w, 0, 0, 2, timeout=120, proc=proc)
  with open(os.path.join(w, "elastic", "capacity"), "w") as f:
    f.write("2\n")
  assert t.finish(proc) == 0, open(os.path.join(w, "launch.log")).read()[-2000:]
  ev = t.events(w)
  scale = next(e for e in ev if e["event"] == "scale_up")
  exits = [e for e in ev if e["event"] == "worker_exit" and e["generation"] == 0]
  resume = next(e for e in ev if e["event"] == "resume")
  stopping = max(e["time"] for e in exits) - scale["time"]
  assert stopping > 1.0, (scale, exits)          # the workers ran on to the check step
  assert resume["breakdown"]["stop_s"] >= stopping - 0.2, json.dumps(resume)
  total = sum(resume["breakdown"].values())
  assert abs(total - resume["seconds_since_detection"]) < 0.5, json.dumps(resume)


def test_the_same_command_again_continues_the_generation_count(tmp_path):
  # The rerun's workers were generation 0 again: events.jsonl held two `launch` of
  # generation 0 (two different sets of workers, pids and meshes) and `jq
  # 'select(.generation == 0)'` mixed them.
  w = str(tmp_path)
  proc = _launch(w, ["--num_processes=2", "--check_every=5"], steps=100000, step_s=0.03)
  t.wait_step(w, 1, 0, 8, timeout=120, proc=proc)
  t.kill(t.worker_pids(w, 0)[1])                       # generation 1 on one process
  t.wait_step(w, 0, 1, 12, timeout=120, proc=proc)
  proc_pid = proc.pid
  t.kill(proc.pid)                                     # the supervisor (and so its workers)
  proc.wait()
  t.wait_for(lambda: not any(t.alive(p) for p in t.worker_pids(w, 1)), 20, "workers gone")
  n = len(t.events(w))
  proc = _launch(w, ["--num_processes=2", "--check_every=5"], steps=30, step_s=0.03)
  assert t.finish(proc) == 0, open(os.path.join(w, "launch.log")).read()[-2000:]
  later = t.events(w)[n:]
  # The killed supervisor left no `give_up`: the next one says it died (and its pid)
  assert t.names(later)[:4] == ["start", "supervisor_died", "plan", "launch"], later
  died, first_start = later[1], t.events(w)[0]
  assert died["pid"] == first_start["pid"] == proc_pid and later[0]["pid"] == proc.pid
  assert died["generation"] == 1 and died["started"] == first_start["time"], died
  assert died["checkpoint"] is not None and died["checkpoint"] >= 10, died
  log = open(os.path.join(w, "launch.log")).read()
  assert f"previous scripts/launch.py on {w} (pid {proc_pid}) ended without recording why" in log
  assert f"resuming from checkpoint step {died['checkpoint']}" in log, log[-2000:]
  assert later[2]["generation"] == later[3]["generation"] == 2, later[:4]
  # (`supervisor_died` names the dead run's last generation, 1)
  assert {e["generation"] for e in later[2:] if "generation" in e} == {2}
  launches = [e["generation"] for e in t.events(w) if e["event"] == "launch"]
  assert launches == [0, 1, 2]
  assert t.wait_step(w, 0, 2, 30, timeout=1)            # its workers report as generation 2


@pytest.mark.parametrize("ending, died", [
    ([], True),                                      # killed right after it started
    (["plan", "launch"], True),
    (["launch", "give_up"], False),
    (["launch", "finished"], False),
    (["launch", "give_up", "start", "launch"], True),     # the one after a clean run died
    (["launch", "finished", "start", "give_up"], False),
])
def test_unfinished_run_is_a_last_start_without_give_up_or_finished(ending, died):
  evts = [{"event": "start", "time": 1.0, "pid": 7}]
  evts += [{"event": e, "time": 2.0 + i, "generation": i} for i, e in enumerate(ending)]
  got = events_lib.unfinished_run(evts)
  assert (got is not None) == died, got
  if died:
    assert got["last_event"] == evts[-1]["event"]
    assert got["last_event_time"] == evts[-1]["time"]
    launches = [e for e in evts[[i for i, e in enumerate(evts) if e["event"] == "start"][-1]:]
                if e["event"] == "launch"]
    assert got["generation"] == (launches[-1]["generation"] if launches else None)
  assert events_lib.unfinished_run([]) is None
  assert events_lib.unfinished_run([{"event": "capacity"}]) is None   # no run yet


def test_a_run_that_finds_a_capacity_file_begins_with_start(tmp_path):
  # A restarted supervisor finds the previous run's capacity file: its `capacity` event was
  # written before its `start`, so that run's events began with `capacity`.
  w = str(tmp_path)
  os.makedirs(os.path.join(w, "elastic"))
  with open(os.path.join(w, "elastic", "capacity"), "w") as f:
    f.write("1\n")
  proc = _launch(w, ["--num_processes=2"], steps=5, step_s=0.01)
  assert t.finish(proc) == 0, open(os.path.join(w, "launch.log")).read()[-2000:]
  ev = t.events(w)
  assert t.names(ev)[:3] == ["start", "capacity", "plan"], ev
  assert (ev[0]["num_processes"], ev[0]["devices_per_process"]) == (2, 2)   # the flags
  assert ev[1]["num_processes"] == 1 and ev[1]["previous"] == [2, 2] and ev[1]["initial"]
  assert ev[2]["processes"] == 1


def test_every_event_is_listed_and_in_the_docs_table():
  """Every event the supervisor emits is in `events.EVENTS` (`port_in_use` and `warning`
  were not), and docs/elastic.md's table names each (`terminate` was missing at first)."""
  from jaxrec.elastic.events import EVENTS  # pylint: disable=import-outside-toplevel
  emitted = set()
  for name in os.listdir(os.path.join(t.ROOT, "jaxrec", "elastic")):
    if name.endswith(".py"):
      with open(os.path.join(t.ROOT, "jaxrec", "elastic", name)) as f:
        emitted |= set(re.findall(r'emit\(\s*"(\w+)"', f.read()))
  assert "terminate" in emitted and emitted <= set(EVENTS), sorted(emitted - set(EVENTS))
  with open(os.path.join(t.ROOT, "docs", "elastic.md")) as f:
    rows = [line for line in f if line.startswith("| `")]
  documented = {name for line in rows for name in
                line.split("|")[1].replace("`", "").replace(" ", "").split("/")}
  assert set(EVENTS) <= documented, sorted(set(EVENTS) - documented)


def test_a_launcher_killed_while_saving_after_sigterm_is_told_about_the_grace(tmp_path,
                                                                              capsys):
  """Preempted (`terminate`), then SIGKILLed by the scheduler before the workers saved:
  the next start says the grace period was too short for the save."""
  import types  # pylint: disable=import-outside-toplevel
  from jaxrec.elastic import supervisor  # pylint: disable=import-outside-toplevel
  emitted = []
  fake = types.SimpleNamespace(
      workdir=str(tmp_path),
      events=types.SimpleNamespace(emit=lambda name, **kw: emitted.append((name, kw))))
  previous = {"pid": 41, "started": 1.0, "last_event": "terminate", "last_event_time": 9.0,
              "generation": 2}
  supervisor.Supervisor._previous_died(fake, previous)   # pylint: disable=protected-access
  err = capsys.readouterr().err
  assert emitted == [("supervisor_died", dict(previous, checkpoint=None))]
  assert "(pid 41) ended without recording why" in err and "starting fresh" in err
  assert "saving after a SIGTERM" in err and "lower --check_every" in err
  died = supervisor.Supervisor._previous_died   # pylint: disable=protected-access
  died(fake, dict(previous, last_event="launch", pid=None))
  err = capsys.readouterr().err
  assert "SIGTERM when" not in err and "saving after" not in err and "(pid" not in err
