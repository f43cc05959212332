"""Restored train states save again on every mesh size (typed PRNG keys included)."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec.checkpoint import CheckpointManager, canonical
from tests.checkpoint import ckpt_helpers as h


@pytest.mark.parametrize("first,middle", [(8, 1), (1, 1), (1, 8)])
def test_restore_then_save_again(tmp_path, first, middle):
  """Saved on `first` devices, restored on `middle`, saved there, restored on `first`:
  dense state (rng included) and tables equal the original."""
  a, b = h.collection("dp", first), h.collection("dp", middle)
  state = h.train_state(a, seed=3, step=5)
  with CheckpointManager(tmp_path / "a") as mgr:
    mgr.save(5, state, a, force=True)
  with CheckpointManager(tmp_path / "a") as mgr:
    restored = mgr.restore(h.dense(b.mesh, seed=8), b).state
  rng = restored["rng"]
  assert len(rng.sharding.spec) <= rng.ndim, rng.sharding   # not its key data's spec
  with CheckpointManager(tmp_path / "b") as mgr:
    mgr.save(6, restored, b, force=True)
    mgr.wait()
    back = mgr.restore(h.dense(a.mesh, seed=9), a).state
  h.assert_dense_equal(state, dict(back, step=state["step"]))
  h.assert_tables_equal(a, state, a, back)


def test_eagerly_wrapped_one_device_key_saves():
  """A key wrapped outside jit on one device (its spec that of its data) stores as its data."""
  mesh = h.collection("dp", 1).mesh
  data = jax.device_put(jax.random.key_data(jax.random.key(4)), NamedSharding(mesh, P(None)))
  out = canonical.canonical_dense({"rng": jax.random.wrap_key_data(data)}, mesh)
  np.testing.assert_array_equal(np.asarray(out["rng"]), np.asarray(data))
