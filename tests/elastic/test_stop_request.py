"""When a requested stop counts as saved (`stopping.StopRequest.overdue`): the workers then
get 2 x `--stop_grace` to exit, else `--stop_timeout` from the request."""

import os

from jaxrec.elastic import stopping
from jaxrec.elastic.scaling import Outcome

CHECK_EVERY, TIMEOUT, GRACE = 5, 300.0, 10.0


def _request(checkpoint_before, step):
  return stopping.StopRequest(Outcome("planned", "capacity 2 -> 3", detected=0.0), 0.0,
                              checkpoint_before, step)


def test_an_older_periodic_checkpoint_committing_after_the_request_is_not_the_stops():
  # Asked at step 37 while the asynchronous save of periodic checkpoint 35 was in flight:
  # 35 committing counted as the stop's own, and the workers (still training to check step
  # 40) were killed 2 x stop_grace later.
  stop = _request(30, 37)
  assert not stop.overdue(1.0, 35, CHECK_EVERY, TIMEOUT, GRACE)
  assert stop.saved is None
  assert not stop.overdue(60.0, 35, CHECK_EVERY, TIMEOUT, GRACE)   # no grace deadline
  assert not stop.overdue(61.0, 40, CHECK_EVERY, TIMEOUT, GRACE)   # the stop's checkpoint
  assert stop.saved == 61.0
  assert not stop.overdue(81.0, 40, CHECK_EVERY, TIMEOUT, GRACE)
  assert stop.overdue(81.5, 40, CHECK_EVERY, TIMEOUT, GRACE)       # 2 x stop_grace since


def test_a_checkpoint_of_the_requests_own_step_counts():
  stop = _request(30, 35)   # the workers may have seen the request at step 35 itself
  assert not stop.overdue(1.0, 35, CHECK_EVERY, TIMEOUT, GRACE) and stop.saved == 1.0


def test_off_check_step_or_unchanged_checkpoints_do_not_count_and_the_timeout_holds():
  stop = _request(30, 31)
  for checkpoint in (None, 30, 33):
    assert not stop.overdue(5.0, checkpoint, CHECK_EVERY, TIMEOUT, GRACE)
  assert stop.saved is None
  assert stop.overdue(TIMEOUT + 0.1, 30, CHECK_EVERY, TIMEOUT, GRACE)


def test_request_records_the_step(tmp_path):
  os.makedirs(os.path.join(tmp_path, "elastic"))
  stop = stopping.request(str(tmp_path), 0, Outcome("planned", "x", detected=0.0), 2.0, 37)
  assert (stop.step, stop.requested, stop.checkpoint_before) == (37, 2.0, None)


def test_a_checkpoint_of_the_requests_step_that_the_workers_trained_past_is_not_the_stops():
  # Asked at step 20, a periodic checkpoint step whose save (40 s for 1.3 GiB of tables on
  # a loaded host) was in flight: 20 committing counted as the stop's own, the workers
  # trained on to check step 25 and were killed 2 x stop_grace later, in their stop's save.
  stop = _request(10, 20)
  assert not stop.overdue(1.0, 20, CHECK_EVERY, TIMEOUT, GRACE, reported=20)
  assert stop.saved == 1.0                     # as before: they may have stopped at 20
  assert not stop.overdue(2.0, 20, CHECK_EVERY, TIMEOUT, GRACE, reported=23)
  assert stop.saved is None                    # they trained past it: not the stop's
  assert not stop.overdue(40.0, 20, CHECK_EVERY, TIMEOUT, GRACE, reported=25)
  assert not stop.overdue(60.0, 25, CHECK_EVERY, TIMEOUT, GRACE, reported=25)
  assert stop.saved == 60.0
  assert stop.overdue(80.5, 25, CHECK_EVERY, TIMEOUT, GRACE, reported=25)
