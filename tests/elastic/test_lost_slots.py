"""How many slots a failure loses when several workers exit within one poll: a worker
killed from outside, and its peer that jax aborts (SIGABRT) because the peer vanished, are
one loss, not two (under load both exits land in the same poll; the job then gave up with
"only 0 process(es) ... available")."""

import signal

import pytest

from jaxrec.elastic import supervisor as sup, watching
from tests.elastic import elastic_testlib as t
from tests.elastic.test_coordinator_port import _popen, _supervisor

KILL, ABRT, TERM = -signal.SIGKILL, -signal.SIGABRT, -signal.SIGTERM


@pytest.mark.parametrize("codes, lost, culprit", [
    ((ABRT, KILL), [1], "worker 1 exited (SIGKILL)"),   # the killed one, not its peer
    ((KILL, ABRT), [0], "worker 0 exited (SIGKILL)"),
    ((KILL, KILL), [0, 1], "worker 0 exited (SIGKILL)"),   # e.g. the OOM killer took both
    ((ABRT, None), [0], "worker 0 exited (SIGABRT)"),   # an abort alone: its own crash
    ((ABRT, 1), [1], "worker 1 exited (exit code 1)"),   # the crash, then its peer's abort
    ((1, 1), [0], "worker 0 exited (exit code 1)"),
    ((TERM, ABRT), [0], "worker 0 exited (SIGTERM)"),
])
def test_one_poll_of_exits_loses_the_killed_workers_only(tmp_path, codes, lost, culprit):
  s = _supervisor(str(tmp_path))
  s.procs = [watching.WorkerProc(i, _popen(c), None, 0.0)
             for i, c in enumerate(codes)]
  out = s._check_exits(1.0, None)   # pylint: disable=protected-access
  assert (out.kind, out.lost, out.reason) == ("failure", len(lost), culprit)
  exits = [e for e in t.events(str(tmp_path)) if e["event"] == "worker_exit"]
  assert [e["process"] for e in exits if e["lost"]] == lost


def test_a_sigterm_told_just_before_clean_exits_is_a_planned_stop(tmp_path):
  """Workers that voted to stop on a SIGTERM exit 0 below --num_steps: when their record
  came between the supervisor's progress read and its exit check, the job was reported
  `finished` at step 20 of 40 (exit 0)."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  from jaxrec.elastic import worker  # pylint: disable=import-outside-toplevel
  s = _supervisor(str(tmp_path))
  s.args = s.args.parse(["--workdir=w", "--gin_file=g", "--num_steps=40"])
  s.procs = [watching.WorkerProc(i, _popen(0), None, 0.0, last_step=20)
             for i in range(2)]
  os.makedirs(tmp_path / "workers")
  with open(worker.progress_path(str(tmp_path), 1), "w") as f:
    f.write(json.dumps({"generation": 0, "process": 1, "sigterm": 1.0, "at_step": 20}) + "\n")
  out = s._check_exits(5.0, None)   # pylint: disable=protected-access
  assert (out.kind, out.reason) == ("planned", "worker 1 got SIGTERM")
  assert s.lost == {1: 5.0}
  exits = [e for e in t.events(str(tmp_path)) if e["event"] == "worker_exit"]
  assert [e["lost"] for e in exits] == [False, True]
