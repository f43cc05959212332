"""Restore onto other device counts and plans: per-table values equal exactly."""

import jax
import numpy as np
import pytest

from jaxrec.checkpoint import CheckpointManager
from jaxrec.embedding import optimizers
from jaxrec.sharding.plan import KINDS
from tests.checkpoint import ckpt_helpers as h


def _optimizer(kind):   # alternate per-element and per-row optimizer state
  return optimizers.Adagrad() if KINDS.index(kind) % 2 else optimizers.RowWiseAdagrad()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """One checkpoint per plan kind, saved on 8 devices."""
  out = {}
  for kind in KINDS:
    coll = h.collection(kind, 8, optimizer=_optimizer(kind))
    state = h.train_state(coll, seed=KINDS.index(kind), step=10)
    path = tmp_path_factory.mktemp(f"ckpt_{kind}")
    with CheckpointManager(path) as mgr:
      mgr.save(10, state, coll, data_state={"examples_consumed": 640}, force=True)
    out[kind] = (path, coll, state)
  return out


@pytest.mark.parametrize("devices", [4, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_same_plan_fewer_devices(saved, kind, devices):
  path, coll, state = saved[kind]
  new = h.collection(kind, devices, optimizer=_optimizer(kind))
  with CheckpointManager(path) as mgr:
    restored = mgr.restore(h.dense(new.mesh, seed=99), new)
  h.assert_tables_equal(coll, state, new, restored.state)
  h.assert_dense_equal(state, restored.state)
  assert restored.data_state == {"examples_consumed": 640}
  for a, s in zip(jax.tree.leaves(restored.state["emb"]), jax.tree.leaves(new.shardings())):
    assert a.sharding == s


@pytest.mark.parametrize("src,dst,devices", [("rw", "tw", 8), ("tw", "grid", 4),
                                             ("grid", "dp", 6), ("cw", "twrw", 8)])
def test_other_plan(saved, src, dst, devices):
  path, coll, state = saved[src]
  new = h.collection(dst, devices, optimizer=_optimizer(src))
  with CheckpointManager(path) as mgr:
    restored = mgr.restore(h.dense(new.mesh, seed=5), new)
  h.assert_tables_equal(coll, state, new, restored.state)


def test_8_to_4_to_8_round_trip(tmp_path, saved):
  path, coll8, state8 = saved["twrw"]
  coll4 = h.collection("rw", 4, optimizer=_optimizer("twrw"))
  with CheckpointManager(path) as mgr:
    state4 = mgr.restore(h.dense(coll4.mesh), coll4).state
  with CheckpointManager(tmp_path) as mgr:
    mgr.save(11, state4, coll4, force=True)
    mgr.wait()
    back = mgr.restore(h.dense(coll8.mesh), coll8).state
  h.assert_tables_equal(coll8, state8, coll8, back)
  h.assert_dense_equal(state8, dict(back, step=state8["step"]))
  for a, b in zip(jax.tree.leaves(back["emb"]), jax.tree.leaves(state8["emb"])):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8"])
def test_low_precision_tables(tmp_path, dtype):
  coll = h.collection("grid", 8, dtype=dtype)
  state = h.train_state(coll, seed=4, step=3)
  with CheckpointManager(tmp_path) as mgr:
    mgr.save(3, state, coll, force=True)
    mgr.wait()
    assert mgr.latest_valid_step(full=True) == 3
    new = h.collection("twrw", 6, dtype=dtype)
    restored = mgr.restore(h.dense(new.mesh), new)
  h.assert_tables_equal(coll, state, new, restored.state)
  for a, s in zip(jax.tree.leaves(restored.state["emb"]), jax.tree.leaves(new.shardings())):
    assert a.sharding == s
