"""convert_checkpoint errors that say what to pass instead, and leave nothing behind."""

import os
import shutil

import jax
import numpy as np
import pytest

from jaxrec.checkpoint import CheckpointError, CheckpointManager, convert
from jaxrec.embedding.specs import TableSpec
from tests.checkpoint import ckpt_helpers as h


def _offloaded_steps(w, steps):
  """Checkpoints `steps` in `w/checkpoints` of a run with table t0 offloaded, each with its
  offload snapshot in `w/offload_snapshots`; returns that snapshot directory."""
  from jaxrec import offload
  coll = h.collection("rw", 8)              # t0 stands for a 13-row cache of a 50-row table
  store = offload.TableStore(TableSpec("t0", 50, h.DIM), offload.OffloadTable("t0", 13),
                             coll.optimizer, str(w / "live" / "t0"))
  store.create(jax.random.key(0))
  snaps = w / "offload_snapshots"
  meta = {"offload": {"snapshots": str(snaps),
                      "tables": {"t0": {"rows": 50, "cache_rows": 13}}}}
  with CheckpointManager(w / "checkpoints") as mgr:
    for step in steps:
      offload.snapshots.save(str(snaps), step, {"t0": store}, keep=None)
      mgr.save(step, h.train_state(coll, step=step), coll, meta=meta, force=True)
  return snaps


def test_latest_without_its_snapshot_names_the_step_before(tmp_path):
  """A training restore falls back to the step before; the export said only that the
  snapshot was missing."""
  snaps = _offloaded_steps(tmp_path / "w", [3, 5])
  shutil.rmtree(snaps / "5")
  with pytest.raises(CheckpointError, match=r"no offload snapshot of step 5 .*; a training "
                     r"restore falls back to the step before: export that one with --step=3$"):
    convert.export_npz(tmp_path / "w" / "checkpoints", tmp_path / "a.npz")
  assert convert.export_npz(tmp_path / "w" / "checkpoints", tmp_path / "a.npz", 3) == 3
  shutil.rmtree(snaps / "3")
  with pytest.raises(CheckpointError, match=r"no offload snapshot of step 5 .*; no earlier "
                     r"step is valid either$"):
    convert.export_checkpoint(tmp_path / "w" / "checkpoints", tmp_path / "w2" / "checkpoints")
