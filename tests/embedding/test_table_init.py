"""Initial tables (`embedding.table_init`): built in the stacked layout by one kernel per
stack, the same values as table by table, on every plan, mesh and dtype."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry2x32_p

from jaxrec.embedding import layout as layout_lib, optimizers, table_init
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.kernels import dequantize
from jaxrec.sharding.mesh import make_mesh, parse_mesh_spec
from jaxrec.sharding.plan import Plan, TablePlacement, uniform_plan
from tests.embedding.test_collection import FEATURES, TABLES


def test_threefry_matches_jax():
  rng = np.random.default_rng(0)
  k = rng.integers(0, 2**32, size=(2, 500), dtype=np.uint32)
  x = rng.integers(0, 2**32, size=(2, 500), dtype=np.uint32)
  want = threefry2x32_p.bind(*map(jnp.asarray, (k[0], k[1], x[0], x[1])))
  got = table_init.threefry2x32(*map(jnp.asarray, (k[0], k[1], x[0], x[1])))
  for w, g in zip(want, got):
    np.testing.assert_array_equal(g, w)


def test_counter_carries_into_the_high_word():
  row = jnp.asarray([0, 1, 2**28 - 1, 2**28, 2**32 - 1], jnp.uint32)
  hi, lo = table_init._counter(row, jnp.uint32(5), 16)
  want = [int(r) * 16 + 5 for r in np.asarray(row)]
  assert [(int(h) << 32) | int(l) for h, l in zip(hi, lo)] == want


def test_rows_are_any_range_of_the_table_and_uniform():
  key = jax.random.key(3)
  full = np.asarray(table_init.table_values(key, "t", 1000, 8, 0.25))
  words = table_init.key_words(key, ["t"])[0]
  np.testing.assert_array_equal(table_init.row_values(words, 123, 400, 8, 0.25),
                                full[123:523])
  assert -0.25 <= full.min() and full.max() < 0.25
  assert abs(full.mean()) < 0.01 and abs(full.std() - 0.25 / np.sqrt(3)) < 0.005
  other = np.asarray(table_init.table_values(key, "u", 1000, 8, 0.25))
  assert not np.allclose(full, other)          # each table has its own key


@pytest.mark.parametrize("kind,mesh_spec,dtype", [
    ("dp", "data=8", "float32"), ("dp", "data=8", "int8"), ("tw", "table=8", "float32"),
    ("rw", "row=8", "bfloat16"),
    ("cw", "col=8", "float16"), ("twrw", "data=2,table=2,row=2", "int8"),
    ("grid", "table=2,row=2,col=2", "float32"), ("tw", "table=3", "int8")])
def test_stacked_init_equals_the_tables_stacked(kind, mesh_spec, dtype):
  tables = tuple(dataclasses.replace(t, dtype=dtype) for t in TABLES)
  mesh = make_mesh(parse_mesh_spec(mesh_spec, 8 if mesh_spec != "table=3" else 3),
                   jax.devices()[:8 if mesh_spec != "table=3" else 3])
  coll = EmbeddingCollection.create(tables, FEATURES, uniform_plan(kind, tables,
                                                                   mesh.shape["table"]),
                                    mesh, optimizers.RowWiseAdagrad(0.1))
  key = jax.random.key(11)
  state = coll.init(key)
  want = coll.stack_tables({t.name: layout_lib.init_table(key, t) for t in tables})
  for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  # placed as the plan says (a replicated stack on CPU devices is drawn split, then copied)
  for got, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(coll.shardings())):
    assert got.sharding.is_equivalent_to(sharding, got.ndim), (got.sharding, sharding)
  # The same values on one device, whatever the plan (here the first table, as f32).
  per_table, _ = coll.unstack_tables(state)
  t0 = tables[0]
  one = np.asarray(dequantize(layout_lib.init_table(key, t0)))
  np.testing.assert_array_equal(np.asarray(dequantize(per_table[t0.name])), one)


@pytest.mark.parametrize("num_tables", [3, table_init._COMPARE_ALL_WIDTH + 8])
def test_stack_values_and_unstack_on_both_row_lookups(num_tables):
  """A slice's rows find their table by comparing with every table's first row (a few
  tables) or by a binary search (many): both give each table its own values, and
  `unstack` (one compiled cut per leaf) gives them back, padding rows and columns gone."""
  tables = tuple(TableSpec(f"t{i}", 4 + (i == 1), 6) for i in range(num_tables))
  features = tuple(FeatureSpec(f"f{i}", t.name) for i, t in enumerate(tables))
  (l,) = layout_lib.build_layouts(tables, features, uniform_plan("dp", tables, 1), {})
  key = jax.random.key(2)
  stacked = layout_lib.init_stack(key, l, tables)
  assert stacked.shape[0] >= sum(t.rows for t in tables)
  per_table = layout_lib.unstack(l, {"w": stacked, "acc": stacked[:, 0]})
  for t in tables:
    want = np.asarray(layout_lib.init_table(key, t))
    np.testing.assert_array_equal(np.asarray(per_table[t.name]["w"]), want)
    np.testing.assert_array_equal(np.asarray(per_table[t.name]["acc"]), want[:, 0])


def test_stacks_of_over_2_31_rows_get_their_tables_values():
  """Four tables of ~1e9 rows on four `table` slices stack 4e9 rows (each slice within
  int32). `stack_values` numbered rows across the stack in int32: slices 2 and 3 start
  past 2**31, whose rows then took another table's key and wrapped counters. Numbered per
  slice (`slice_values`) they are the tables' own rows; checked on a few rows of each slice
  (the stack itself, 128 GB, is not built)."""
  names = "abcd"
  tables = tuple(TableSpec(n, 1_000_000_000 - (n == "d"), 8) for n in names)
  plan = Plan({n: TablePlacement("tw", i) for i, n in enumerate(names)})
  (l,) = layout_lib.build_layouts(tables, tuple(FeatureSpec("f" + n, n) for n in names), plan,
                                  {"table": 4})
  assert l.shape[0] == 4_000_000_000 and l.slice_rows == 1_000_000_000
  key, scales = jax.random.key(5), [0.5, 0.25, 0.125, 1.0]
  rows = [0, 2**31 - 2 * l.slice_rows - 1, 2**31 - 2 * l.slice_rows, l.slice_rows - 2]
  got = np.asarray(table_init.slice_values(key, l, scales,
                                           np.array(rows + [l.slice_rows - 1], np.uint32)))
  for t, spec in enumerate(tables):
    words = table_init.key_words(key, [spec.name])[0]
    want = np.concatenate([table_init.row_values(words, r, 1, 8, scales[t]) for r in rows])
    np.testing.assert_array_equal(got[t, :4], want)
  assert np.all(got[:3, 4] != 0)
  np.testing.assert_array_equal(got[3, 4], 0)        # d's slice: one padding row
