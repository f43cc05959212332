"""An int8-table checkpoint restores into float32 tables (the values the lookup saw), on any
mesh and plan, also into an offloaded table; its stored parts are still checked."""

import shutil

import jax
import numpy as np
import pytest
import tensorstore as ts

from jaxrec.checkpoint import CheckpointError, CheckpointManager
from jaxrec.checkpoint import dequantized as dequantized_lib
from jaxrec.kernels import quant
from tests.checkpoint import ckpt_helpers as h
from tests.offload.offload_helpers import SMALL_DLRM, logged_lines, train_synthetic


@pytest.fixture(scope="module")
def int8_checkpoint(tmp_path_factory):
  """Steps 2 and 3 of an int8 grid run on 8 devices (Adagrad state stored)."""
  path = tmp_path_factory.mktemp("int8")
  coll = h.collection("grid", 8, dtype="int8")
  state = h.train_state(coll, seed=4, step=3)
  with CheckpointManager(path) as mgr:
    mgr.save(2, h.train_state(coll, seed=2, step=2), coll, force=True)
    mgr.save(3, state, coll, force=True)
  return path, coll, state


def _stored(path, step, name):
  spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(
      path / str(step) / "embeddings" / "tables" / name)}}
  return ts.open(spec, open=True).result().read().result()


@pytest.mark.parametrize("kind,devices", [("twrw", 6), ("cw", 4), ("dp", 1)])
def test_int8_restores_into_float32(int8_checkpoint, tmp_path, kind, devices):
  path, coll, state = int8_checkpoint
  new = h.collection(kind, devices)
  with CheckpointManager(path, read_only=True) as mgr:
    restored = mgr.restore(h.dense(new.mesh), new)
  got, got_opt = jax.device_get(new.unstack_tables(restored.state["emb"]))
  saved, saved_opt = jax.device_get(coll.unstack_tables(state["emb"]))
  for t in coll.tables:
    parts = [_stored(path, 3, f"{t.name}/{p}") for p in dequantized_lib.PARTS]
    assert got[t.name].dtype == np.float32
    np.testing.assert_array_equal(got[t.name], dequantized_lib.dequantize(*parts))
    np.testing.assert_allclose(got[t.name], np.asarray(quant.dequantize(saved[t.name])),
                               rtol=1e-6, atol=1e-7)   # the lookup's view, on the device
    np.testing.assert_array_equal(got_opt[t.name]["accum"], saved_opt[t.name]["accum"])


def test_int8_into_float16_is_refused(int8_checkpoint):
  path, _, _ = int8_checkpoint
  new = h.collection("rw", 4, dtype="float16")
  h.assert_restore_refused(path, new, r"table 't0': checkpoint .* stores it as int8 \(q, "
                           r"scale, bias\), which restores into int8 or, dequantised, float32; "
                           r"not the configured float16")


def test_float_into_int8_is_refused_saying_so(tmp_path):
  """A float16 table resumed as int8: refused, saying a restore does not quantise and what
  to configure (it said only 'has tables/t0 [..] float16; the configuration has [..] int8')."""
  old = h.collection("dp", 1, dtype="float16")
  with CheckpointManager(tmp_path) as mgr:
    mgr.save(1, h.train_state(old, step=1), old, force=True)
  new = h.collection("dp", 1, dtype="int8")
  h.assert_restore_refused(tmp_path, new, r"table 't0': checkpoint .* stores it as float16 "
                           r"\[\d+, \d+\], which a restore does not quantise to the "
                           r"configured int8 .*configure the table's dtype as float16")


def test_a_damaged_int8_part_falls_back(int8_checkpoint, tmp_path):
  """The dequantised values are not the stored ones, so the parts' own fingerprints are
  checked: a changed scale makes step 3 unreadable and the restore falls back to step 2."""
  path = shutil.copytree(int8_checkpoint[0], tmp_path / "ckpt")
  scale = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(
      path / "3" / "embeddings" / "tables" / "t1" / "scale")}}, open=True).result()
  scale[0].write(scale[0].read().result() * 2).result()
  new = h.collection("rw", 4)
  with CheckpointManager(path) as mgr:
    restored = mgr.restore(h.dense(new.mesh), new)
  assert int(restored.state["step"]) == 2
  assert [p.name.split(".")[:2] for p in (path / "rejected").iterdir()] == [["3", "corrupt"]]
  with CheckpointManager(path) as mgr:   # step 2 alone, damaged too: no valid checkpoint
    scale = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(
        path / "2" / "embeddings" / "tables" / "t1" / "scale")}}, open=True).result()
    scale[0].write(scale[0].read().result() * 2).result()
    with pytest.raises(CheckpointError, match=r"tables/t1/scale.* fails its fingerprint"):
      mgr.restore(h.dense(new.mesh), new)


@pytest.mark.slow   # ~20-40 s: three short trainer runs
def test_training_goes_on_in_float32_and_offloaded(tmp_path):
  """Through the trainer: 10 steps with int8 tables, then on in float32 (one run on the
  device, one with t0 offloaded: its store is written from the dequantised table)."""
  w = tmp_path / "w"
  train_synthetic(w, 10, SMALL_DLRM + ["uniform_tables.dtype='int8'"])
  w2 = shutil.copytree(w, tmp_path / "w2")
  device = train_synthetic(w, 20, SMALL_DLRM)
  offloaded = train_synthetic(w2, 20, SMALL_DLRM + [
      "OffloadConfig.tables={'t0': {'cache_rows': 4000}}", "OffloadConfig.host_buffer_rows=600"])
  for workdir in (w, w2):
    resumes = [l for l in logged_lines(workdir) if l.get("event") == "resume"]
    assert [r["checkpoint_step"] for r in resumes] == [10]
  np.testing.assert_allclose(offloaded["loss"], device["loss"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(offloaded["eval_logloss"], device["eval_logloss"], atol=1e-5)
