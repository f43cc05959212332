"""Which slots the supervisor plans on when they change under it (no workers): a capacity
file shrunk below a running slot, a slot returning between the plan and the launch, and
slots due back while the job is below --min_processes."""

import time

from jaxrec.elastic import replan
from jaxrec.elastic import supervisor as sup, watching
from tests.elastic import elastic_testlib as t


def _supervisor(w, **options):
  options = {"num_processes": 4, "devices_per_process": 2, **options}
  s = sup.Supervisor(sup.Options(**options), [f"--workdir={w}", "--gin_file=configs/x.gin"])
  s.config = None
  return s


def _choice(processes, k=2):
  return replan.Choice(processes, k, {"data": processes * k}, "dp", {"dp": 1}, 0.0)


def _every_count_plans(monkeypatch):
  """replan.best_choice stand-in: any count of processes is a job of that many."""
  monkeypatch.setattr(sup.replan, "best_choice",
                      lambda config, args, available, k, *rest: (
                          (_choice(available, k), []) if available else (None, ["none"])))


def _running(s, slots):
  """`s` as after a launch of one process per slot in `slots`, planned on them."""
  s._plan()                                           # pylint: disable=protected-access
  s.choice, s.slots = _choice(len(slots)), list(slots)
  s._capacity_seen = s._planned_on                    # pylint: disable=protected-access


def test_a_capacity_shrunk_below_a_running_slot_moves_the_process(tmp_path, monkeypatch):
  """Slot 1 lost, 3 processes on slots 0, 2, 3; the file then says 3 (slots 0-2, and the
  rewrite returns slot 1). The count is unchanged, so the job ran on on slot 3, which the
  file no longer lists."""
  _every_count_plans(monkeypatch)
  s = _supervisor(str(tmp_path))
  s.lost = {1: time.time()}
  _running(s, [0, 2, 3])
  assert s._check_capacity(time.time()) is None       # pylint: disable=protected-access
  with open(s.capacity_file, "w") as f:
    f.write("3\n")
  out = s._check_capacity(time.time())                # pylint: disable=protected-access
  assert (out.kind, out.reason) == ("planned", "rescale"), out
  [event] = [e for e in t.events(str(tmp_path)) if e["event"] == "rescale"]
  assert event["note"] == "slot(s) [3] no longer in the capacity", event
  assert (event["current"], event["target"]) == ([3, 2], [3, 2]), event


def test_the_same_count_on_slots_still_listed_is_no_change(tmp_path, monkeypatch):
  _every_count_plans(monkeypatch)
  s = _supervisor(str(tmp_path))
  _running(s, [0, 1, 2])
  s.capacity = (3, 2)   # e.g. a rewrite read elsewhere: slots 0-2 are still usable
  assert s._check_capacity(time.time()) is None       # pylint: disable=protected-access


def test_a_slot_returning_between_plan_and_launch_is_a_change(tmp_path, monkeypatch):
  """`_launch` took its 'seen' capacity when it started the workers: a slot back since the
  plan (`--rejoin_after`) counted as seen, and the job ran one process short."""
  _every_count_plans(monkeypatch)
  s = _supervisor(str(tmp_path), rejoin_after=0.2)
  s.lost = {3: time.time()}
  s._plan()                                           # pylint: disable=protected-access
  assert s._planned_on == ((0, 1, 2), 2)              # pylint: disable=protected-access
  time.sleep(0.25)                                    # slot 3 is back: the launch sees it
  s.choice, s.slots = _choice(3), s._free_slots()[:3]  # pylint: disable=protected-access
  s._capacity_seen = s._planned_on                    # pylint: disable=protected-access
  out = s._check_capacity(time.time())                # pylint: disable=protected-access
  assert (out.kind, out.reason) == ("planned", "scale_up"), out


def test_below_minimum_with_a_slot_due_back_waits_for_it(tmp_path, monkeypatch):
  """A lone worker's slot lost (a SIGTERM, a crash) with --rejoin_after: the job gave up
  at once (exit 2) though the slot was due back; it now waits and plans on it."""
  _every_count_plans(monkeypatch)
  s = _supervisor(str(tmp_path), num_processes=1, rejoin_after=0.3)
  s.lost = {0: time.time()}
  choice, why, cause = s._plan()                      # pylint: disable=protected-access
  assert choice is None and cause == "below_min", why
  t0 = time.time()
  assert s._wait_for_returns(why)                     # pylint: disable=protected-access
  assert 0.2 < time.time() - t0 < 2.0
  choice, _, _ = s._plan()                            # pylint: disable=protected-access
  assert choice.processes == 1 and s.lost == {}
  names = [e["event"] for e in t.events(str(tmp_path))]
  assert names[-2:] == ["wait", "capacity"], names   # then the slot's `rejoin`
  [wait] = [e for e in t.events(str(tmp_path)) if e["event"] == "wait"]
  assert wait["lost"] == [0] and 0.0 < wait["seconds"] <= 0.3, wait


def test_below_minimum_without_returns_gives_up(tmp_path, monkeypatch):
  _every_count_plans(monkeypatch)
  s = _supervisor(str(tmp_path), num_processes=2, min_processes=2, rejoin_after=0.0)
  s.lost = {0: time.time()}
  assert not s._wait_for_returns("below")            # pylint: disable=protected-access
  s = _supervisor(str(tmp_path), num_processes=3, min_processes=3, rejoin_after=5.0)
  s.lost = {0: time.time()}
  s.capacity = (2, 2)   # slot 1 and 0 back would still be 2 < 3
  assert not s._wait_for_returns("below")            # pylint: disable=protected-access


def test_a_capacity_rewrite_ends_the_wait(tmp_path, monkeypatch):
  _every_count_plans(monkeypatch)
  s = _supervisor(str(tmp_path), num_processes=1, rejoin_after=60.0)
  s.lost = {0: time.time()}
  with open(s.capacity_file, "w") as f:
    f.write("1\n")
  t0 = time.time()
  assert s._wait_for_returns("below")                # pylint: disable=protected-access
  assert time.time() - t0 < 5.0 and s.lost == {}


def test_the_run_loop_waits_instead_of_giving_up(tmp_path, monkeypatch):
  """`_run`: below the minimum with a slot due back plans again after the wait."""
  _every_count_plans(monkeypatch)
  monkeypatch.setattr(sup.replan, "load_config", lambda args: None)
  s = _supervisor(str(tmp_path), num_processes=1, rejoin_after=0.2)
  outcomes = [sup._Outcome("failure", "worker 0 exited (SIGKILL)", lost=1,   # pylint: disable=protected-access
                           detected=time.time(), slots=(0,)),
              sup._Outcome("finished", "done")]                               # pylint: disable=protected-access
  monkeypatch.setattr(s, "_launch_and_watch", lambda choice: outcomes.pop(0))
  s.procs = [watching.WorkerProc(0, None, None, 0.0, last_step=7)]
  monkeypatch.setattr(s, "_stop_all", lambda *a, **k: None)
  assert s._run() == sup.EXIT_OK
  names = [e["event"] for e in t.events(str(tmp_path))]
  assert "wait" in names and "give_up" not in names and names[-1] == "finished", names


def test_slots_past_the_capacity_are_not_waited_for(tmp_path, monkeypatch):
  """Capacity 2 with slot 1 lost for good and slot 2 (past it) sitting out: the job waited
  for slot 2's cool-down, then gave up anyway; a slot both lost and sitting out is back
  when both are over."""
  _every_count_plans(monkeypatch)
  s = _supervisor(str(tmp_path), num_processes=3, min_processes=2)
  s.capacity = (2, 2)
  s.lost, s.quarantine = {1: time.time()}, {2: time.time() + 30}
  assert not s._wait_for_returns("below")            # pylint: disable=protected-access
  s = _supervisor(str(tmp_path), num_processes=2, min_processes=2, rejoin_after=0.2)
  s.lost, s.quarantine = {1: time.time()}, {1: time.time() + 0.5}
  t0 = time.time()
  assert s._wait_for_returns("below")                # pylint: disable=protected-access
  assert time.time() - t0 >= 0.45


def test_capacity_the_job_cannot_use_is_said(tmp_path, monkeypatch):
  """`echo 3 > capacity` on a 2-process job whose batch 12 devices do not divide: only the
  `capacity` event, no word of why the job stayed on 2 processes."""
  monkeypatch.setattr(sup.replan, "best_choice", lambda config, args, available, k, *rest: (
      _choice(min(available, 2), k),
      [f"{n} process(es): batch_size=512 is not divisible by {n * k} devices"
       for n in range(available, 2, -1)]))
  s = _supervisor(str(tmp_path))
  _running(s, [0, 1])
  with open(s.capacity_file, "w") as f:
    f.write("3\n")
  assert s._check_capacity(time.time()) is None       # pylint: disable=protected-access
  [note] = [e for e in t.events(str(tmp_path)) if e.get("source") == "plan"]
  assert (note["available"], note["running"]) == (3, [2, 2]), note
  assert note["note"] == ("the job stays on 2 process(es): 3 process(es): batch_size=512 is "
                          "not divisible by 6 devices"), note
