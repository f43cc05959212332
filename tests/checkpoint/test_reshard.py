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


# Every kind restored into another kind on another device count (a rotation over KINDS),
# plus the classic rw -> tw on the same devices.
OTHER = [(k, KINDS[(i + 1) % len(KINDS)], (6, 4)[i % 2]) for i, k in enumerate(KINDS)]


@pytest.mark.parametrize("src,dst,devices", OTHER + [("rw", "tw", 8), ("cw", "twrw", 8)])
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



def test_restore_reads_shard_by_shard(tmp_path, monkeypatch):
  """Restore never holds a whole row-sharded table on the host: it reads one device block
  (a quarter of the table on row=4) and puts it on its devices before reading the next.
  (`jax.make_array_from_callback` would read every block first, then copy them all.)"""
  from jaxrec.checkpoint import tables as tables_lib
  rows = (1 << 12, 8, 8, 8)
  coll = h.collection("rw", 8, optimizer=optimizers.RowWiseAdagrad(), rows=rows)
  state = h.train_state(coll, seed=1, step=1)
  events = []
  real_read, real_put = tables_lib._read_block, jax.device_put

  def read_block(*args):
    block = real_read(*args)
    events.append(("read", id(block), block.shape[0]))
    return block

  def device_put(x, *args, **kw):
    events.append(("put", id(x), None))
    return real_put(x, *args, **kw)

  with CheckpointManager(tmp_path) as mgr:
    mgr.save(1, state, coll, force=True)
    mgr.wait()
    monkeypatch.setattr(tables_lib, "_read_block", read_block)
    monkeypatch.setattr(jax, "device_put", device_put)
    restored = mgr.restore(h.dense(coll.mesh), coll)
  at = [i for i, e in enumerate(events) if e[0] == "read"]
  assert len(at) == 4 * 2         # 4 row blocks x (table, optimizer state); replicas once
  assert max(events[i][2] for i in at) < rows[0]
  for i, j in zip(at, at[1:] + [len(events)]):   # on its devices before the next read
    puts = [e for e in events[i:j] if e == ("put", events[i][1], None)]
    assert len(puts) == 2, (i, events)         # data=2: both replicas of the block
  monkeypatch.undo()
  h.assert_tables_equal(coll, state, coll, restored.state)


@pytest.mark.parametrize("src,dst,devices", [("rw", "cw", 8), ("cw", "twcw", 8),
                                             ("grid", "grid", 8), ("dp", "cw", 4)])
def test_column_blocks_are_read_in_row_windows(saved, monkeypatch, src, dst, devices):
  """A column split is read in windows of rows written into each block on its device
  (a block at a time decoded every stored chunk once per column block, all of a block's
  chunks at once): with small windows every block takes several, and the values are the
  saved ones, bit for bit."""
  from jaxrec.checkpoint import tables as tables_lib
  monkeypatch.setattr(tables_lib, "WINDOW_BYTES", 128)   # 4 rows of dim 8
  writes = []
  write_rows = tables_lib._write_rows   # pylint: disable=protected-access
  monkeypatch.setattr(tables_lib, "_write_rows", lambda *a: writes.append(1) or write_rows(*a))
  path, coll, state = saved[src]
  new = h.collection(dst, devices, optimizer=_optimizer(src))
  with CheckpointManager(path) as mgr:
    restored = mgr.restore(h.dense(new.mesh, seed=5), new)
  assert len(writes) > 2 * devices
  h.assert_tables_equal(coll, state, new, restored.state)
