"""convert_checkpoint errors that say what to pass instead, and leave nothing behind."""

import os
import shutil

import jax
import numpy as np
import pytest

from jaxrec.checkpoint import CheckpointError, CheckpointManager, convert
from jaxrec.embedding.specs import TableSpec
from jaxrec.errors import ConfigError
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


def test_import_onto_an_existing_step_names_the_flags(tmp_path):
  """It said only '<dir>/<step> already exists'."""
  coll = h.collection("rw", 8)
  npz = tmp_path / "ebc.npz"
  np.savez(npz, **{f"embedding_bags.{t.name}.weight": np.zeros((t.rows, t.dim), np.float32)
                   for t in coll.tables})
  out = tmp_path / "w" / "checkpoints"
  convert.import_torchrec(npz, out, step=2)
  with pytest.raises(ConfigError, match=rf"^{out}/2 already exists: pass --step=3 \(the "
                     r"import's step\) or a fresh --output$"):
    convert.import_torchrec(npz, out, step=2)
  assert convert.import_torchrec(npz, out, step=3)


def test_a_failed_conversion_removes_the_directories_it_created(tmp_path):
  """`--output=W2/checkpoints` of a refused conversion left an empty W2 behind."""
  snaps = _offloaded_steps(tmp_path / "w", [3])
  f = max((p for p in (snaps / "3").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  f.write_bytes(f.read_bytes()[:-1])   # a damaged array file: found, then refused
  src = tmp_path / "w" / "checkpoints"
  for fn, out in [(convert.export_checkpoint, tmp_path / "w2" / "checkpoints"),
                  (convert.export_npz, tmp_path / "w2" / "e" / "a.npz"),
                  (convert.export_zarr, tmp_path / "w2" / "z")]:
    with pytest.raises(CheckpointError, match=r"damaged; .*checkpoints holds no other step$"):
      fn(src, out)
    assert not (tmp_path / "w2").exists(), fn
  (tmp_path / "w3").mkdir()
  with pytest.raises(CheckpointError, match="holds no other step"):
    convert.export_checkpoint(src, tmp_path / "w3" / "checkpoints")
  assert os.listdir(tmp_path / "w3") == []   # it existed before: kept


def test_an_explicit_step_without_its_snapshot_lists_the_steps_that_have_one(tmp_path):
  """`--step=5` whose offload snapshot is gone said only that it was missing."""
  snaps = _offloaded_steps(tmp_path / "w", [3, 5])
  shutil.rmtree(snaps / "5")
  src = tmp_path / "w" / "checkpoints"
  with pytest.raises(CheckpointError, match=r"no offload snapshot of step 5 .*; pick another "
                     r"--step: 3$"):
    convert.export_npz(src, tmp_path / "a.npz", 5)
  assert not (tmp_path / "a.npz").exists()
  shutil.rmtree(snaps / "3")
  with pytest.raises(CheckpointError, match=r"no offload snapshot of step 5 .*; no other step "
                     r"has its offload snapshot either \(steps: 3, 5\)$"):
    convert.export_checkpoint(src, tmp_path / "w2" / "checkpoints", 5)
  assert not (tmp_path / "w2").exists()


def test_a_checkpoint_directory_copied_alone_exports_with_a_warning(tmp_path, caplog):
  """Conversion still reads the snapshot where the checkpoint was saved, but says so (a
  training restore refuses it: `tests/offload/test_snapshot_integrity.py`)."""
  snaps = _offloaded_steps(tmp_path / "w", [3])
  copy = shutil.copytree(tmp_path / "w" / "checkpoints", tmp_path / "elsewhere" / "checkpoints")
  with caplog.at_level("WARNING"):
    assert convert.export_npz(copy, tmp_path / "a.npz") == 3
  want = f"offload snapshot {snaps}/3: read from where checkpoint {copy}/3 was saved"
  assert any(want in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("fmt", ["npz", "zarr", "checkpoint"])
def test_a_corrupt_step_found_while_exported_names_the_steps_to_pick(tmp_path, fmt):
  """A flipped bit is found only while the arrays are read: the error said 'pick another
  --step' without naming one (a training restore falls back to the previous step)."""
  coll = h.collection("rw", 8)
  with CheckpointManager(tmp_path / "c") as mgr:
    for step in (2, 4):
      mgr.save(step, h.train_state(coll, seed=step, step=step), coll, force=True)
  chunk = next(p for p in (tmp_path / "c" / "4" / "embeddings" / "tables" / "t3").iterdir()
               if not p.name.startswith("."))
  data = bytearray(chunk.read_bytes())
  data[len(data) // 2] ^= 0x01
  chunk.write_bytes(bytes(data))
  export = {"npz": convert.export_npz, "zarr": convert.export_zarr,
            "checkpoint": convert.export_checkpoint}[fmt]
  with pytest.raises(CheckpointError, match=r"c/4.* corrupt.*; pick another --step: 2$"):
    export(tmp_path / "c", tmp_path / "out" / "checkpoints")
  assert not (tmp_path / "out").exists()
