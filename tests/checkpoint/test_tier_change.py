"""`CheckpointManager.restore(offloaded=...)` with a table the checkpoint holds whole:
what restoring does not read of it is still checked (fingerprints, NaN/inf), so a damaged
or non-finite step is skipped as on the device; a forgotten `offloaded=` is named."""

import json

import jax
import numpy as np
import pytest

from jaxrec.checkpoint import CheckpointManager
from jaxrec.errors import ConfigError
from tests.checkpoint import ckpt_helpers as h

ROWS = (13, 20, 7, 32)
CACHED = (5, 20, 7, 32)     # t0 offloaded: a 5-row device cache of its 13 rows


def _saved(tmp_path, bad_t0):
  """Steps 1 and 2 on the device; step 2's t0 is `bad_t0(values)`."""
  coll = h.collection("rw", 8, rows=ROWS)
  mgr = CheckpointManager(tmp_path)
  mgr.save(1, h.train_state(coll, seed=1, step=1), coll, force=True)
  tables, opt = h.per_table_values(coll, seed=2)
  tables["t0"] = bad_t0(tables["t0"])
  s2 = dict(h.train_state(coll, seed=2, step=2),
            emb=jax.jit(coll.stack_tables, out_shardings=coll.shardings())(tables, opt))
  mgr.save(2, s2, coll, force=True)
  mgr.wait()
  return mgr, coll


def _offloading(coll):
  cached = h.collection("rw", 8, rows=CACHED)
  return cached, {"t0": next(t for t in coll.tables if t.name == "t0")}


def test_nan_in_a_table_moving_to_the_host_rolls_back_further(tmp_path):
  def nan(t0):
    t0[3, 1] = np.nan
    return t0
  mgr, coll = _saved(tmp_path, nan)
  cached, whole = _offloading(coll)
  target = h.train_state(cached)
  restored = mgr.restore(target, cached, require_finite=True, offloaded=whole)
  assert int(restored.state["step"]) == 1 and sorted(restored.host_tables) == ["t0"]
  assert mgr.all_steps() == [1]                 # step 2 moved to rejected/
  mgr.close()


def test_a_damaged_table_moving_to_the_host_falls_back(tmp_path):
  mgr, coll = _saved(tmp_path, lambda t0: t0)
  prints = tmp_path / "2" / "embeddings" / "fingerprints.0.json"
  saved = json.loads(prints.read_text())
  saved["tables/t0"] = (saved["tables/t0"] + 1) & 0xFFFFFFFF
  prints.write_text(json.dumps(saved))
  cached, whole = _offloading(coll)
  restored = mgr.restore(h.train_state(cached), cached, offloaded=whole)
  assert int(restored.state["step"]) == 1
  assert [p.name.split(".")[:2] for p in (tmp_path / "rejected").iterdir()] == [["2", "corrupt"]]
  mgr.close()


def test_a_cache_sized_collection_without_offloaded_is_named(tmp_path):
  coll = h.collection("rw", 8, rows=ROWS)
  with CheckpointManager(tmp_path) as mgr:
    meta = {"offload": {"snapshots": str(tmp_path / "nowhere"),
                        "tables": {"t0": {"rows": 13, "cache_rows": 5}}}}
    cached, _ = _offloading(coll)
    mgr.save(1, h.train_state(cached, step=1), cached, meta=meta, force=True)
    mgr.wait()
    with pytest.raises(ConfigError, match=r"table 't0': the collection holds 5 rows, the device "
                       r"cache of the offloaded table \(13 rows\) .*restore\(offloaded="):
      mgr.restore(h.train_state(cached), cached)
