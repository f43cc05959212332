"""Edge cases of a table changing tier between runs (tests/offload/test_move_tier.py has
the main cases): a missing offload snapshot, a changed cache size, the snapshot lookup."""

import re
import shutil

import numpy as np
import pytest
import tensorstore as ts

from jaxrec.checkpoint import offloaded as offloaded_lib
from jaxrec.errors import CheckpointError
from jaxrec.offload import snapshots
from tests.offload.offload_helpers import SMALL_DLRM, logged_lines, train_synthetic


def _offload(cache_rows=4000):
  return [f"OffloadConfig.tables={{'t0': {{'cache_rows': {cache_rows}}}}}",
          "OffloadConfig.host_buffer_rows=600"]


def _run(workdir, num_steps, extra=()):
  return train_synthetic(workdir, num_steps, SMALL_DLRM + list(extra))


@pytest.fixture(scope="module")
def offloaded_run(tmp_path_factory):
  """A workdir of 10 steps with t0 offloaded (checkpoint and offload snapshot of step 10);
  tests that change it work on a copy."""
  w = tmp_path_factory.mktemp("offloaded") / "w"
  _run(w, 10, _offload())
  return w


def _copy(src, tmp_path):
  dst = tmp_path / "w"
  shutil.copytree(src, dst)
  return dst


def test_snapshot_arrays_takes_any_iterable(offloaded_run):
  step_dir = offloaded_run / "checkpoints" / "10"
  got = offloaded_lib.snapshot_arrays(step_dir, iter(["t0"]))
  assert sorted(got) == ["table_opt/t0/accum", "tables/t0"]
  assert offloaded_lib.snapshot_arrays(step_dir, iter([])) == {}


def test_a_missing_snapshot_names_the_step_and_its_directory(tmp_path):
  """Back on the device without the snapshot: the error names the step and the snapshot
  directory, once and in full, and the checkpoint stays where it is."""
  w = tmp_path / "w"
  _run(w, 10, _offload())
  shutil.rmtree(w / "offload_snapshots")
  snaps = re.escape(str(w / "offload_snapshots"))
  with pytest.raises(CheckpointError, match=rf"step 10: CheckpointError: .* no offload snapshot "
                     rf"of step 10 \(looked in {snaps}\)"):
    _run(w, 20)
  assert sorted(p.name for p in (w / "checkpoints").iterdir()) == ["10"]


def test_a_copied_workdir_reads_its_own_snapshot(tmp_path):
  """A copy of a workdir moves its table to the device: the whole table comes from the
  copy's snapshot (as the tier would restore it), not from the original's, which may have
  changed since (here: zeroed)."""
  a = tmp_path / "a" / "w"
  want = _run(a, 10, _offload())
  b = shutil.copytree(a, tmp_path / "b" / "w")
  table = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(
      a / "offload_snapshots" / "10" / "t0" / "table") + "/"}}, open=True).result()
  table.write(np.zeros(table.shape, table.dtype.numpy_dtype)).result()
  got = _run(b, 10)        # already trained: restores on the device and evaluates
  np.testing.assert_allclose(got["eval_logloss"], want["eval_logloss"], rtol=0, atol=1e-6)


@pytest.mark.slow   # 25-45 s of script runs: kept out of the default suite for its time
def test_a_changed_cache_size_resumes(offloaded_run, tmp_path):
  """Offloaded again with a smaller cache: the checkpoint's old cache is not read (caches
  start empty on a restore; the snapshot holds every row), and the run continues as with
  the old size."""
  ref, w = _copy(offloaded_run, tmp_path / "ref"), _copy(offloaded_run, tmp_path / "small")
  want = _run(ref, 20, _offload())
  got = _run(w, 20, _offload(3000))
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(got["eval_logloss"], want["eval_logloss"], rtol=0, atol=1e-6)



def test_snapshots_go_once_no_kept_checkpoint_needs_them(offloaded_run, tmp_path):
  """Back on the device, keeping one checkpoint: once checkpoint 10 (the last offloaded
  one) is rotated out, its snapshot goes; a kept offloaded checkpoint keeps its own, and
  the run resumes from 20 without the old one."""
  w = _copy(offloaded_run, tmp_path)
  snaps = w / "offload_snapshots"
  before = logged_lines(w)
  train_synthetic(w, 10, SMALL_DLRM, keep_checkpoints=1)   # trained already: evaluates
  assert snapshots.steps(str(snaps)) == [10]
  added = logged_lines(w)[len(before):]    # one line: the resume, with its evaluation
  assert len(added) == 1 and added[0]["event"] == "resume", added
  np.testing.assert_allclose(added[0]["eval_logloss"], before[-1]["eval_logloss"], atol=1e-6)
  train_synthetic(w, 20, SMALL_DLRM, keep_checkpoints=1)
  assert sorted(p.name for p in (w / "checkpoints").iterdir()) == ["20"]
  assert snapshots.steps(str(snaps)) == []
  train_synthetic(w, 30, SMALL_DLRM, keep_checkpoints=1)
  assert sorted(p.name for p in (w / "checkpoints").iterdir()) == ["30"]


def test_prune_keeps_the_kept_steps_and_newer(tmp_path):
  """Snapshots between kept checkpoints go too: early stopping keeps its best step (10)
  far behind the newest (30), and the snapshots of the steps rotated out between them
  (20) stayed on disk until the best moved (a table's whole store each)."""
  for step in (5, 10, 20, 30, 40):
    (tmp_path / str(step)).mkdir()
    (tmp_path / str(step) / snapshots.META).write_text("{}")
  (tmp_path / "3.tmp-1").mkdir()   # an unfinished save is not a step: left to `save`
  assert snapshots.prune(str(tmp_path), [10, 30]) == [5, 20]   # 40: a save in progress
  assert snapshots.steps(str(tmp_path)) == [10, 30, 40]
  assert (tmp_path / "3.tmp-1").exists()
  assert snapshots.prune(str(tmp_path), []) == []


def test_a_crash_while_a_save_is_in_flight_keeps_the_last_checkpoints_snapshot(
    tmp_path, monkeypatch):
  """One checkpoint kept; the save of step 20 fails while the run goes on (a crash
  mid-save): checkpoint 10 is the only one on disk, so its snapshot must still be there (a
  count of snapshots, or the step list of a save in flight, removed it and the restart
  found no valid checkpoint). The loop waits for a save in flight before it snapshots the
  next step (`47e65ce`), so the snapshot of 30 never comes first: the test waited 120 s
  for it (the longest test of the suite), now the save fails after its steps went on."""
  import os
  import time
  from jaxrec.checkpoint import tables as tables_lib
  w = tmp_path / "w"
  real = tables_lib.write_pieces

  async def write_pieces(directory, arrays, pieces, chunk_bytes=tables_lib.CHUNK_BYTES):
    if directory.parent.name.startswith("20.") and "tmp" in directory.parent.name:
      time.sleep(0.5)   # (the loop's steps after 20 run meanwhile)
      raise OSError("simulated crash mid-save of step 20")
    await real(directory, arrays, pieces, chunk_bytes)

  monkeypatch.setattr(tables_lib, "write_pieces", write_pieces)
  with pytest.raises(OSError, match="simulated crash"):
    _run_keep1(w, 30)
  monkeypatch.setattr(tables_lib, "write_pieces", real)
  assert sorted(p for p in os.listdir(w / "checkpoints") if p.isdigit()) == ["10"]
  assert 10 in snapshots.steps(str(w / "offload_snapshots"))
  _run_keep1(w, 20)   # resumes from 10
  assert sorted(p.name for p in (w / "checkpoints").iterdir() if p.name.isdigit()) == ["20"]


def _run_keep1(workdir, num_steps):
  return train_synthetic(workdir, num_steps, SMALL_DLRM + _offload(), keep_checkpoints=1)


def test_a_rejected_checkpoint_keeps_its_snapshot(offloaded_run, tmp_path):
  """Checkpoint 20's snapshot is damaged: the restart falls back to 10 and moves 20 to
  checkpoints/rejected/; its snapshot goes with it, where saving step 20 again replaced
  (deleted) it: a rejected checkpoint is never deleted, its offloaded table included."""
  w = _copy(offloaded_run, tmp_path)
  _run(w, 20, _offload())
  meta = w / "offload_snapshots" / "20" / snapshots.META
  meta.write_text("{damaged")
  _run(w, 20, _offload())
  rejected = [p.name for p in (w / "checkpoints" / "rejected").iterdir()]
  assert len(rejected) == 1 and rejected[0].startswith("20.corrupt.")
  aside = w / "offload_snapshots" / "rejected" / rejected[0]
  assert (aside / snapshots.META).read_text() == "{damaged"
  assert (aside / "t0" / "table").is_dir()
  assert snapshots.steps(str(w / "offload_snapshots")) == [10, 20]   # 20 saved again
