"""A disk write error during write-back, in the trainer: a clear error, the last checkpoint
(and its offload snapshot) stay valid, and the same command resumes from it exactly."""

import logging
import os
import re

import numpy as np
import pytest

from jaxrec.offload import OffloadError, snapshots, store as store_lib
from tests.offload.offload_helpers import (SMALL_DLRM, logged_lines, logged_losses,
                                           train_synthetic)

BINDINGS = SMALL_DLRM + ["OffloadConfig.tables={'t0': {'cache_rows': 4000}}",
                         "OffloadConfig.host_buffer_rows=600"]    # small: write-backs start early


class _NoSpace:
  """A tensorstore array whose writes fail as a full disk would."""

  def __init__(self, arr):
    self.arr = arr

  def __getitem__(self, index):
    class Sel:
      def write(self, values):
        raise ValueError("UNKNOWN: Error writing local file: No space left on device")
    return Sel()


def _run(workdir, num_steps=30):
  return train_synthetic(workdir, num_steps, BINDINGS)


@pytest.mark.slow
def test_write_back_failure_keeps_the_last_checkpoint_and_resume_is_exact(tmp_path,
                                                                          monkeypatch):
  real_save, real_write = snapshots.save, store_lib.TableStore.write
  armed = []

  def save(directory, step, stores, keep):   # after checkpoint 10's snapshot: disk full
    out = real_save(directory, step, stores, keep)
    armed.append(step)
    return out

  def write(self, rows, values):
    if armed:
      self.arrays = dict(self.arrays, table=_NoSpace(self.arrays["table"]))
    return real_write(self, rows, values)

  monkeypatch.setattr(snapshots, "save", save)
  monkeypatch.setattr(store_lib.TableStore, "write", write)
  w = tmp_path / "w"
  with pytest.raises(OffloadError, match=r"offloaded table 't0': write-back of \d+ rows to "
                     r"'.*t0/table/' .*failed: .*No space left on device"):
    _run(w)
  monkeypatch.undo()
  assert armed == [10]
  assert sorted(p.name for p in (w / "checkpoints").iterdir()) == ["10"]
  assert snapshots.steps(str(w / "offload_snapshots")) == [10]

  _run(w)                                    # the same command again: resumes from 10
  ref = tmp_path / "ref"
  _run(ref)
  got, lines, want = logged_losses(w), logged_lines(w), logged_losses(ref)
  assert [l["checkpoint_step"] for l in lines if l.get("event") == "resume"] == [10]
  assert sorted(got) == sorted(want) and max(got) == 30
  for step in (15, 20, 25, 30):              # after the resume: the uninterrupted run's
    np.testing.assert_allclose(got[step], want[step], rtol=0, atol=1e-6, err_msg=step)


def test_eval_batches_bigger_than_the_cache_are_evaluated_in_pieces(tmp_path, caplog):
  """An eval batch whose distinct rows do not fit the cache (512 examples, a 300-row cache)
  stopped the run at its eval; it is now evaluated in several passes, with the metrics of
  the run that keeps every table on the device. The start-up says it will be, once (not at
  each of the two evals)."""
  w, ref = tmp_path / "w", tmp_path / "ref"
  small_cache = SMALL_DLRM + ["OffloadConfig.tables={'t0': {'cache_rows': 300}}"]
  with caplog.at_level(logging.WARNING):
    got = train_synthetic(w, 8, small_cache, eval_every=4)
  assert caplog.text.count("offloaded table 't0': an eval batch") == 1, caplog.text
  assert re.search(r"offloaded table 't0': an eval batch \(\d+ examples\) may read up to "
                   r"[\d,]+ distinct rows, more than its 300-row cache; such a batch is "
                   r"evaluated in several passes, each costing a whole batch \(raise its "
                   r"cache_rows/cache_bytes \(OffloadConfig.tables\['t0'\], bound by "
                   r"--gin_bindings\), or lower",
                   caplog.text)
  want = train_synthetic(ref, 8, SMALL_DLRM)
  assert got["step"] == want["step"] == 8
  np.testing.assert_allclose([got["eval_auc"], got["eval_logloss"]],
                             [want["eval_auc"], want["eval_logloss"]], rtol=0, atol=1e-6)


def test_a_failing_eval_between_checkpoints_saves_its_step_first(tmp_path, monkeypatch):
  """An eval that fails at an eval step that does not checkpoint (step 3; checkpoints
  every 10; here its second eval batch, with an example too big for the cache) stopped the
  run with nothing saved: every step since the last checkpoint was lost, on each rerun
  again. It now saves that step first (from the state the first batch's eval handed back:
  an eval pass donates it); the same command resumes from it once the cause is fixed."""
  from jaxrec.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxrec.offload import eval_split  # pylint: disable=import-outside-toplevel
  w = tmp_path / "w"
  small_cache = SMALL_DLRM + ["OffloadConfig.tables={'t0': {'cache_rows': 300}}",
                              "ExperimentConfig.eval_batch_size=256"]   # 2 eval batches
  real, calls = eval_split.pieces, []

  def too_big(batch, tables, advice):   # the second batch has an example the cache cannot hold
    calls.append(batch)
    return real(batch, {n: (f, c if len(calls) == 1 else 0) for n, (f, c) in tables.items()},
                advice)

  monkeypatch.setattr(eval_split, "pieces", too_big)
  with pytest.raises(ConfigError, match="example 0 of an eval batch alone reads 1 distinct "
                     "rows, more than its cache of 0"):
    train_synthetic(w, 8, small_cache, eval_every=3)
  monkeypatch.undo()
  assert len(calls) == 2
  assert sorted(os.listdir(w / "checkpoints")) == ["3"]
  assert sorted(os.listdir(w / "offload_snapshots")) == ["3"]
  result = train_synthetic(w, 4, small_cache)
  assert result["step"] == 4 and [l["step"] for l in logged_lines(w)
                                  if l.get("event") == "resume"] == [3]
