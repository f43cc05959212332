"""Tiny collections and train states for checkpoint tests."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec.checkpoint import CheckpointManager, canonical
from jaxrec.embedding import optimizers
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError
from jaxrec.sharding.mesh import make_mesh
from jaxrec.sharding.plan import uniform_plan

ROWS = (13, 20, 7, 32)
DIM = 8

# Mesh shapes per plan kind and device count.
MESHES = {
    1: {"dp": dict(data=1), "rw": dict(row=1)},
    8: {"dp": dict(data=8), "tw": dict(table=4, data=2), "rw": dict(row=4, data=2),
        "cw": dict(col=2, data=4), "twrw": dict(table=2, row=2, data=2),
        "twcw": dict(table=2, col=2, data=2), "grid": dict(table=2, row=2, col=2)},
    4: {"dp": dict(data=4), "tw": dict(table=2, data=2), "rw": dict(row=4),
        "cw": dict(col=4), "twrw": dict(table=2, row=2), "twcw": dict(table=2, col=2),
        "grid": dict(table=2, row=2)},
    6: {"dp": dict(data=6), "tw": dict(table=3, data=2), "rw": dict(row=6),
        "cw": dict(col=2, data=3), "twrw": dict(table=3, row=2),
        "twcw": dict(table=3, col=2), "grid": dict(table=3, row=2, col=1)},
}


def specs(rows=ROWS, dim=DIM, dtype="float32"):
  tables = tuple(TableSpec(f"t{i}", r, dim, dtype) for i, r in enumerate(rows))
  features = tuple(FeatureSpec(f"f{i}", f"t{i}", 2) for i in range(len(rows)))
  return tables, features


def collection(kind="rw", devices=8, optimizer=None, rows=ROWS, dim=DIM, dtype="float32"):
  tables, features = specs(rows, dim, dtype)
  shape = MESHES[devices][kind]
  mesh = make_mesh(shape, devices=jax.devices()[:devices])
  plan = uniform_plan(kind, tables, shape.get("table", 1))
  return EmbeddingCollection.create(tables, features, plan, mesh,
                                    optimizer or optimizers.Adagrad())


def per_table_values(coll, seed=0):
  """Random per-table arrays (and optimizer state) in canonical layout, as numpy."""
  rng = np.random.default_rng(seed)
  tables, opt = {}, {}
  for t in coll.tables:
    tables[t.name] = rng.standard_normal((t.rows, t.dim)).astype(np.float32)
    opt[t.name] = {k: rng.random((t.rows, t.dim) if per == "element" else (t.rows,)
                                 ).astype(np.float32)
                   for k, (per, _) in coll.optimizer_of(t.name).state_layout().items()}
  return tables, opt


def dense(mesh, seed=0, typed_key=True):
  rep = NamedSharding(mesh, P())
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"bottom": {"kernel": jax.random.normal(k1, (5, 3)), "bias": jnp.zeros((3,))},
            "top": {"kernel": jax.random.normal(k2, (3, 1))}}
  params = jax.device_put(params, rep)
  tx = optax.adam(1e-3)
  opt_state = jax.device_put(tx.init(params), rep)
  # Make the moments non-trivial.
  opt_state = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x + 3, opt_state)
  rng = jax.random.key(seed + 7) if typed_key else jax.random.key_data(jax.random.key(seed))
  return {"step": jax.device_put(jnp.int32(0), rep), "params": params,
          "opt_state": opt_state, "rng": jax.device_put(rng, rep)}


def train_state(coll, seed=0, typed_key=True, step=0):
  tables, opt = per_table_values(coll, seed)
  tables = {t.name: _as_dtype(tables[t.name], t.dtype) for t in coll.tables}
  state = dense(coll.mesh, seed, typed_key)
  state["step"] = jax.device_put(jnp.int32(step), NamedSharding(coll.mesh, P()))
  state["emb"] = jax.jit(coll.stack_tables, out_shardings=coll.shardings())(
      tables, opt if any(opt.values()) else None)
  return state


def _as_dtype(x, dtype):
  """A float32 table in its storage dtype (int8: a `QuantizedTable`)."""
  from jaxrec.kernels import quant
  return quant.quantize(jnp.asarray(x)) if dtype == "int8" else jnp.asarray(x).astype(dtype)


def bytes_of(x):
  return np.frombuffer(np.ascontiguousarray(np.asarray(x)).tobytes(), np.uint8)


def flip_middle_byte(path) -> None:
  """Flips one bit of the byte in the middle of file `path` (silent corruption)."""
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x10]))


def assert_tables_equal(coll_a, state_a, coll_b, state_b):
  """Per-table values and optimizer state bit-identical across two layouts."""
  ta, oa = jax.device_get(coll_a.unstack_tables(state_a["emb"]))
  tb, ob = jax.device_get(coll_b.unstack_tables(state_b["emb"]))
  assert sorted(ta) == sorted(tb)
  for name in ta:
    assert jax.tree.structure(ta[name]) == jax.tree.structure(tb[name])
    for x, y in zip(jax.tree.leaves(ta[name]), jax.tree.leaves(tb[name])):
      assert x.dtype == y.dtype and x.shape == y.shape, name
      np.testing.assert_array_equal(bytes_of(x), bytes_of(y), err_msg=name)
    assert sorted(oa.get(name, {})) == sorted(ob.get(name, {})), name   # SGD: none
    for k in oa.get(name, {}):
      np.testing.assert_array_equal(bytes_of(oa[name][k]), bytes_of(ob[name][k]))


def assert_dense_equal(a, b):
  for key in ("step", "params", "opt_state", "rng"):
    la = jax.tree.leaves(jax.tree.map(_bits, a[key]))
    lb = jax.tree.leaves(jax.tree.map(_bits, b[key]))
    assert jax.tree.structure(a[key]) == jax.tree.structure(b[key]), key
    for x, y in zip(la, lb):
      np.testing.assert_array_equal(x, y, err_msg=key)


def _bits(x):
  if canonical.is_key(x):
    x = jax.random.key_data(x)
  return np.asarray(jax.device_get(x))


def assert_restore_refused(path, new, match: str, error=None) -> None:
  """Restoring checkpoint directory `path` (read-only) into collection `new` raises `error`
  (default `ConfigError`) matching `match`."""
  with CheckpointManager(path, read_only=True) as mgr:
    with pytest.raises(error or ConfigError, match=match):
      mgr.restore(dense(new.mesh), new)
