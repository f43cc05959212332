"""Checkpoints of column-padded stacks hold the real `[rows, dim]` tables."""

import jax
import numpy as np

from jaxrec.checkpoint import CheckpointManager, convert, tables as tables_lib
from jaxrec.embedding import optimizers
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.sharding.mesh import make_mesh
from jaxrec.sharding.plan import uniform_plan
from tests.checkpoint import ckpt_helpers as h

DIM = 12   # col=8: 16 stored columns, the last two devices hold padding only


def _collection(kind, shape, dim=DIM):
  tables, features = h.specs(dim=dim)
  devices = int(np.prod(list(shape.values())))
  return EmbeddingCollection.create(tables, features,
                                    uniform_plan(kind, tables, shape.get("table", 1)),
                                    make_mesh(shape, devices=jax.devices()[:devices]),
                                    optimizers.Adagrad())


def test_padded_cw_round_trip_through_one_device_dp(tmp_path):
  """cw on col=8 → dp on 1 device → cw on col=8: equal tables and optimizer state, the
  index and the npz export hold `[rows, 12]`, the restored padding is zero again."""
  cw, dp = _collection("cw", {"col": 8}), _collection("dp", {"data": 1})
  assert cw.layouts[0].shape[1] == 16
  state = h.train_state(cw, seed=4, step=3)
  with CheckpointManager(tmp_path / "a") as mgr:
    mgr.save(3, state, cw, force=True)
  index = tables_lib.read_index(tmp_path / "a" / "3" / "embeddings")["arrays"]
  assert index["tables/t0"]["shape"] == [13, DIM]
  assert index["table_opt/t0/accum"]["shape"] == [13, DIM]
  with CheckpointManager(tmp_path / "a") as mgr:
    one = mgr.restore(h.dense(dp.mesh), dp).state
  h.assert_tables_equal(cw, state, dp, one)
  convert.export_npz(tmp_path / "a", tmp_path / "c.npz")
  with np.load(tmp_path / "c.npz") as z:
    assert z["tables/t1"].shape == (20, DIM)
    np.testing.assert_array_equal(z["tables/t1"],
                                  np.asarray(jax.device_get(cw.unstack_tables(state["emb"])[0]["t1"])))
  with CheckpointManager(tmp_path / "b") as mgr:
    mgr.save(4, one, dp, force=True)
    mgr.wait()
    back = mgr.restore(h.dense(cw.mesh), cw).state
  h.assert_tables_equal(cw, state, cw, back)
  for a, b in zip(jax.tree.leaves(back["emb"]), jax.tree.leaves(state["emb"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # padding included
    assert not np.asarray(a)[..., DIM:].any()
