"""The planner starts a batch's store reads before it waits for an earlier batch's, so
reads run while other work does (`lookahead`'s docstring)."""

import pytest

from jaxrec.offload import tier as tier_lib
from jaxrec.offload.lookahead import READS_AHEAD, LookAhead
from tests.offload.offload_helpers import Run, experiment, mesh_of, offload_config


@pytest.fixture
def events(monkeypatch):
  """`[("assign" | "finish" | "step", seq)]` in the order they happen."""
  out = []
  assign, finish, before_step = (LookAhead._assign_next, LookAhead._finish,
                                 tier_lib.OffloadTier.before_step)

  def logged_assign(self):
    a = assign(self)
    out.append(("assign", a.seq))
    return a

  def logged_finish(self, a):
    out.append(("finish", a.seq))
    return finish(self, a)

  def logged_step(self, state, batch):
    out.append(("step", self._handed[0].seq))
    return before_step(self, state, batch)
  monkeypatch.setattr(LookAhead, "_assign_next", logged_assign)
  monkeypatch.setattr(LookAhead, "_finish", logged_finish)
  monkeypatch.setattr(tier_lib.OffloadTier, "before_step", logged_step)
  return out


def _where(events):
  return {e: i for i, e in enumerate(events)}


def test_the_planner_thread_keeps_reads_ahead_in_flight(tmp_path, events):
  """K=3: when batch t's reads are waited for, batches t+1..t+READS_AHEAD-1 are already
  assigned (their reads started), and no more."""
  run = Run(experiment("sgd"), mesh_of(), offload_config(tmp_path, prefetch_depth=3)).train(6)
  run.close()
  planner = [e for e in events if e[0] != "step"]   # the planner thread's, in its order
  at = _where(planner)
  for seq in range(6):
    assert at[("assign", seq + READS_AHEAD - 1)] < at[("finish", seq)], planner
    assert at[("finish", seq)] < at.get(("assign", seq + READS_AHEAD), len(planner)), planner


def test_the_training_thread_reads_the_next_batch_during_a_step(tmp_path, events):
  """K=0: batch t+1 is assigned (reads started) before step t; finished only after it."""
  run = Run(experiment("sgd"), mesh_of(), offload_config(tmp_path, prefetch_depth=0)).train(6)
  run.close()
  at = _where(events)
  for seq in range(5):
    assert at[("assign", seq + 1)] < at[("step", seq)] < at[("finish", seq + 1)], events
