"""How many slots a failure loses when several workers exit within one poll: a worker
killed from outside, and its peer that jax aborts (SIGABRT) because the peer vanished, are
one loss, not two (under load both exits land in the same poll; the job then gave up with
"only 0 process(es) ... available")."""

import signal

import pytest

from jaxrec.elastic import supervisor as sup
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
  s.procs = [sup._Proc(i, _popen(c), None, 0.0)   # pylint: disable=protected-access
             for i, c in enumerate(codes)]
  out = s._check_exits(1.0, None)   # pylint: disable=protected-access
  assert (out.kind, out.lost, out.reason) == ("failure", len(lost), culprit)
  exits = [e for e in t.events(str(tmp_path)) if e["event"] == "worker_exit"]
  assert [e["process"] for e in exits if e["lost"]] == lost
