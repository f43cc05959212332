"""Edge-case inputs of the collection: tiny and uneven tables, empty bags, zero weights,
heavy duplicates (each plan against the single device), and bad input (clear errors)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxrec.data.batch import Batch
from jaxrec.embedding import optimizers
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError, DataError
from jaxrec.sharding.mesh import make_mesh, parse_mesh_spec
from jaxrec.sharding.plan import Plan, TablePlacement, uniform_plan

# 3 tables (fewer than table=4/8), 3 rows (fewer than row=8), 13 rows (uneven); two
# features per table at different bag sizes; mean bags that are often empty.
TABLES = (TableSpec("small", 3, 8), TableSpec("odd", 13, 8), TableSpec("big", 50, 8))
FEATURES = (FeatureSpec("f_small", "small", 1), FeatureSpec("f_small7", "small", 7),
            FeatureSpec("f_odd", "odd", 5, "mean"), FeatureSpec("f_odd1", "odd", 1, "mean"),
            FeatureSpec("f_big", "big", 2, weighted=True),
            FeatureSpec("f_big3", "big", 3, "mean", weighted=True))
B = 16


def make_inputs(seed, duplicates=False):
  """Random ids with a quarter of the bags empty (all -1) and 30% zero weights; with
  `duplicates` every present id of a feature is its table's last row."""
  rng = np.random.default_rng(seed)
  rows = {t.name: t.rows for t in TABLES}
  ids, weights = {}, {}
  for f in FEATURES:
    x = rng.integers(-1, rows[f.table], (B, f.max_len)).astype(np.int32)
    if duplicates:
      x = np.where(x >= 0, rows[f.table] - 1, -1).astype(np.int32)
    x[rng.random(B) < 0.25] = -1
    ids[f.name] = x
    if f.weighted:
      w = rng.standard_normal((B, f.max_len)).astype(np.float32)
      weights[f.name] = np.where(rng.random(w.shape) < 0.3, 0, w).astype(np.float32)
  return ids, weights, rng.standard_normal((B, len(FEATURES), 8)).astype(np.float32)


def lookup_update_step(coll):
  """jit of `(state, ids, weights, gout [B, F, D], step) -> (pooled, updated state)`: one
  lookup, pooling and sparse update of `coll`, `gout` the pooled outputs' gradient."""
  @jax.jit
  def step(state, ids, weights, gout, i):
    ctx = coll.lookup(state, ids, weights)
    pooled, vjp = jax.vjp(lambda r: coll.pool(r, ctx), ctx.rows)
    return pooled, coll.apply_gradients(state, ctx, vjp(gout)[0], i)
  return step


def run(kind, mesh_spec, opt, duplicates=False, **options):
  mesh = (make_mesh({"data": 1}, jax.devices()[:1]) if mesh_spec == "single"
          else make_mesh(parse_mesh_spec(mesh_spec, 8)))
  plan = kind if isinstance(kind, Plan) else uniform_plan(kind, TABLES, mesh.shape["table"])
  coll = EmbeddingCollection.create(TABLES, FEATURES, plan, mesh, opt, **options)
  state = coll.init(jax.random.key(0))
  step = lookup_update_step(coll)
  pooled = []
  for i in range(2):
    ids, weights, gout = make_inputs(i, duplicates)
    coll.check_ids(ids)
    out, state = step(state, ids, weights, gout, jnp.int32(i))
    pooled.append(np.asarray(out))
  tables, opt_state = coll.unstack_tables(state)
  return pooled, {k: np.asarray(v) for k, v in tables.items()}, opt_state


def assert_runs_match(out, ref):
  """`run`'s pooled outputs, tables and optimizer state equal the reference run's."""
  for a, b in zip(out[0], ref[0]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for name in ref[1]:
    np.testing.assert_allclose(out[1][name], ref[1][name], rtol=1e-5, atol=1e-6)
    for k in ref[2].get(name, {}):
      np.testing.assert_allclose(np.asarray(out[2][name][k]), np.asarray(ref[2][name][k]),
                                 rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,mesh_spec,opt,duplicates", [
    ("grid", "table=2,row=2,col=2", optimizers.Adam(0.01), False),
    ("twrw", "table=4,row=2", optimizers.SGD(0.1), True),
    ("rw", "row=8", optimizers.FTRL(0.1, l1=0.01, l2=0.01), True),
], ids=["grid-Adam", "twrw-SGD-duplicates", "rw-FTRL-duplicates"])
def test_edge_cases_match_single_device(kind, mesh_spec, opt, duplicates):
  ref = run("dp", "single", opt, duplicates)
  out = run(kind, mesh_spec, opt, duplicates)
  ids, _, _ = make_inputs(0, duplicates)
  empty = (ids["f_odd"] < 0).all(1)
  assert empty.any() and (out[0][0][empty, 2] == 0).all()   # empty mean bag → 0, not NaN
  assert_runs_match(out, ref)


MIXED = Plan({"small": TablePlacement("dp"), "odd": TablePlacement("grid", 1),
              "big": TablePlacement("twcw", 0)})


@pytest.mark.slow   # ~15 s: five stacks, compiled twice
@pytest.mark.parametrize("opt", [optimizers.Adam(0.01), optimizers.SGD(0.1)],
                         ids=["Adam", "SGD-no-dedup"])
def test_mixed_plan_on_a_mesh_with_size_1_axes_between_matches_single_device(opt):
  """dp, grid and twcw stacks in one collection on data=1,table=2,row=1,col=4: each stack's
  collectives skip the size-1 axes, and replicas sit on different axes per stack."""
  ref = run("dp", "single", opt, True)
  out = run(MIXED, "data=1,table=2,row=1,col=4", opt, True)
  assert_runs_match(out, ref)


def test_sizes_must_be_whole_numbers():
  """Gin writes `rows = 1e6` as a float: whole numbers become ints (shapes need them),
  anything else is an error naming the table or feature."""
  t = TableSpec("a", 1e3, 8.0)
  assert (t.rows, t.dim) == (1000, 8) and isinstance(t.rows, int) and isinstance(t.dim, int)
  assert FeatureSpec("f", "a", np.int64(2)).max_len == 2
  with pytest.raises(ConfigError, match=r"table 'a': rows must be a positive integer, got 2.5"):
    TableSpec("a", 2.5, 8)
  with pytest.raises(ConfigError, match=r"table 'a': dim must be a positive integer, got 0"):
    TableSpec("a", 5, 0)
  with pytest.raises(ConfigError, match=r"feature 'f': max_len must be a positive integer"):
    FeatureSpec("f", "a", "3")


def make_collection(mesh_spec="table=2,row=2,col=2", kind="grid"):
  mesh = make_mesh(parse_mesh_spec(mesh_spec, 8))
  return EmbeddingCollection.create(TABLES, FEATURES, uniform_plan(kind, TABLES,
                                                                   mesh.shape["table"]),
                                    mesh, optimizers.SGD(0.1))


def test_batch_not_divisible_by_the_devices_is_a_clear_error():
  coll = make_collection()
  state = coll.init(jax.random.key(0))
  ids, weights, _ = make_inputs(0)
  ids = {k: v[:12] for k, v in ids.items()}
  weights = {k: v[:12] for k, v in weights.items()}
  with pytest.raises(DataError, match="batch of 12 examples is not divisible by the 8 devices "
                     "of mesh data=1,table=2,row=2,col=2"):
    jax.jit(coll.lookup)(state, ids, weights)
  with pytest.raises(DataError, match=r"packed ids shape \(16, 5\), expected \[batch, 24\]"):
    coll.lookup(state, np.zeros((B, 5), np.int32))


def test_an_empty_batch_is_a_clear_error():
  """A batch of 0 examples passed the lookup and failed in the pooling with jax's
  `ZeroDivisionError` (a reshape by the per-device batch)."""
  coll = make_collection()
  ids, weights, _ = make_inputs(0)
  with pytest.raises(DataError, match="^batch of 0 examples: a lookup needs at least one"):
    coll.lookup(coll.init(jax.random.key(0)), {k: v[:0] for k, v in ids.items()},
                {k: v[:0] for k, v in weights.items()})


def test_host_ids_wider_than_int32():
  """`pack` cast int64 ids to int32 unchecked: 2**32 + 1 read (and would update) row 1.
  Ids past int32 (or their table) are refused on the host, naming the id as given; int64
  and uint64 ids in range pack as int32 ones do."""
  coll = make_collection()
  ids, weights, _ = make_inputs(0)
  for dtype in (np.int64, np.uint64):
    wide = {k: (np.where(v < 0, 0, v) if dtype == np.uint64 else v).astype(dtype)
            for k, v in ids.items()}
    narrow = {k: v.astype(np.int32) for k, v in wide.items()}
    np.testing.assert_array_equal(np.asarray(coll.pack(wide, weights)),
                                  np.asarray(coll.pack(narrow, weights)))
    wide["f_big"][0] = [2**32 + 1, 2**40]
    with pytest.raises(DataError, match=r"feature 'f_big' \(table 'big', \d+ rows\): id "
                       "4294967297 is out of range"):
      coll.pack(wide, weights)
  with pytest.raises(DataError, match="id -8589934592 is out of range"):
    coll.pack(dict(ids, f_small=np.full((B, 1), -2**33, np.int64)), weights)


def test_features_of_different_batch_sizes_are_a_clear_error():
  coll = make_collection()
  ids, weights, _ = make_inputs(0)
  for n in (1, 8):   # one example would broadcast silently
    with pytest.raises(DataError, match=f"feature 'f_odd1': {n} examples, but the batch's "
                       "other features have 16"):
      coll.pack(dict(ids, f_odd1=ids["f_odd1"][:n]), weights)
  with pytest.raises(DataError, match="batch has no ids for feature 'f_big3'"):
    coll.pack({k: v for k, v in ids.items() if k != "f_big3"}, weights)


def test_non_integer_ids_are_rejected():
  coll = make_collection()
  ids, _, _ = make_inputs(0)
  with pytest.raises(DataError, match=r"feature 'f_small' \(table 'small'\): ids must be "
                     "integers, got float64"):
    coll.check_ids(dict(ids, f_small=ids["f_small"] + 0.5))


@pytest.mark.parametrize("bad,want", [
    (lambda x: x + 0.5, r"feature 'f_small' \(table 'small'\): ids must be integers, got float64"),
    (lambda x: x > 0, r"feature 'f_small' \(table 'small'\): ids must be integers, got bool"),
    (lambda x: np.where(x == x[0, 0], np.int64(2**40), x),
     r"feature 'f_small' \(table 'small', \d+ rows\): id 1099511627776 is out of range"),
    (lambda x: np.full_like(x, -5), r"feature 'f_small' .*: id -5 is out of range")])
def test_host_ids_are_checked_where_they_are_packed(bad, want):
  """`pack` / `pack_batch` and `lookup` of numpy ids took float ids (as their integer part),
  bools, and ids outside `[-1, rows)` (read as absent, also left out of a mean's count)
  without a word: only a separate `check_ids` refused them (a user's own step trained on
  wrong rows)."""
  coll = make_collection()
  ids, weights, _ = make_inputs(0)
  bad_ids = dict(ids, f_small=bad(ids["f_small"]))
  state = coll.init(jax.random.key(0))
  for call in (lambda: coll.pack(bad_ids, weights),
               lambda: coll.pack_batch(Batch(np.zeros((16, 13), np.float32),
                                             np.zeros(16, np.float32), bad_ids, weights)),
               lambda: coll.lookup(state, bad_ids, weights)):
    with pytest.raises(DataError, match=want):
      call()
  coll.pack(ids, weights)   # the same batch with its own ids packs


def test_a_mesh_without_the_four_axes_is_a_clear_error():
  mesh = Mesh(np.asarray(jax.devices()), ("x",))
  with pytest.raises(ConfigError, match=r"mesh axes \('x',\): expected \('data', 'table', "
                     r"'row', 'col'\)"):
    EmbeddingCollection.create(TABLES, FEATURES, uniform_plan("dp", TABLES, 1), mesh,
                               optimizers.SGD(0.1))
  # make_mesh read an unknown axis as absent: {"rows": 8} on one device was a 1-device mesh
  with pytest.raises(ConfigError, match=r"unknown axes \['rows'\] \(axes: data, table, row, "
                     r"col\)"):
    make_mesh({"rows": 8})
  with pytest.raises(ConfigError, match=r"unknown axes \['rows'\]"):
    make_mesh({"data": 1, "rows": 1}, jax.devices()[:1])


def test_more_rows_on_a_slice_than_int32_reaches_is_a_clear_error():
  """Stage 1 numbers a table slice's rows (table offset + id) in int32: two 1.5e9-row tables
  on one slice wrapped past 2**31 (the second table's rows read as zeros, never updated)."""
  tables = (TableSpec("a", 1_500_000_000, 4), TableSpec("b", 1_500_000_000, 4))
  features = (FeatureSpec("fa", "a"), FeatureSpec("fb", "b"))
  create = lambda tables, kind, mesh_spec: EmbeddingCollection.create(
      tables, features[:len(tables)], uniform_plan(kind, tables, 2 if "table" in mesh_spec
                                                   else 1),
      make_mesh(parse_mesh_spec(mesh_spec, 8)), optimizers.SGD(0.1))
  with pytest.raises(ConfigError, match=r"tables \['a', 'b'\] \(rw, dim 4, float32\) stack "
                     r"3,000,000,000 rows on one table slice, over the 2,147,483,647"):
    create(tables, "rw", "row=8")
  with pytest.raises(ConfigError, match="table 'a' has 3,000,000,000 rows, over the "
                     "2,147,483,647 that int32 ids reach"):
    create((TableSpec("a", 3_000_000_000, 4),), "rw", "row=8")
  with pytest.raises(ConfigError, match="^table 'a' has 3,000,000,000 rows"):   # was the
    create((TableSpec("a", 3_000_000_000, 4), TableSpec("b", 10, 4)), "rw", "row=8")  # stack's
  create(tables, "twrw", "table=2,row=4")   # one table per slice: fine (nothing allocated)


def test_weights_for_an_unweighted_feature_are_a_clear_error():
  """Weights for a feature configured unweighted were dropped: the model trained unweighted."""
  coll = make_collection()
  ids, weights, _ = make_inputs(0)
  with pytest.raises(DataError, match=r"weights for features \['f_odd'\], which are not "
                     "weighted"):
    coll.pack(ids, dict(weights, f_odd=np.ones_like(ids["f_odd"], np.float32)))


def test_weights_beside_packed_ids_are_a_clear_error():
  """`lookup(state, packed, weights)` pooled with the weights packed in and dropped the
  ones passed: a caller changing them trained on the old ones without a word."""
  coll = make_collection()
  state = coll.init(jax.random.key(0))
  ids, weights, _ = make_inputs(0)
  packed = coll.pack(ids, weights)
  other = {k: v * 2 for k, v in weights.items()}
  for call, name in ((lambda: coll.lookup(state, packed, other), "lookup"),
                     (lambda: coll.feature_inputs(packed, other, "f_big"), "feature_inputs")):
    with pytest.raises(ConfigError, match=rf"{name}: ids are packed \(`pack`\), which already "
                       r"holds the weights, but weights for \['f_big', 'f_big3'\] were passed"):
      call()
  for empty in (None, {}):   # alone, or with the empty weights `pack_batch` leaves
    np.testing.assert_array_equal(np.asarray(coll.feature_inputs(packed, empty, "f_big")[1]),
                                  weights["f_big"])


def test_plan_entries_for_unknown_tables_are_named(caplog):
  mesh = make_mesh(parse_mesh_spec("table=2,row=2,col=2", 8))
  extra = (TableSpec("t10", 5, 8), TableSpec("t2", 5, 8), TableSpec("typo", 5, 8))
  plan = uniform_plan("grid", TABLES + extra, mesh.shape["table"])
  with caplog.at_level("WARNING"):
    EmbeddingCollection.create(TABLES, FEATURES, plan, mesh, optimizers.SGD(0.1))
  # numbers in names compare as numbers (text order listed t10 before t2)
  assert "places tables ['t2', 't10', 'typo'] that are not configured" in caplog.text


@pytest.mark.parametrize("kind,mesh_spec", [("dp", "data=8"), ("rw", "row=8")])
def test_a_table_no_feature_reads_stays_as_it_was(kind, mesh_spec):
  """'spare' is read by no feature: it joins the stack of the multi-hot features (it used
  to be refused on kinds that keep one-hot and multi-hot stacks apart), is never updated,
  and the rest trains as on one device."""
  tables = TABLES[1:] + (TableSpec("spare", 20, 8),)
  features = FEATURES[2:]
  results = []
  for kind_, spec in ((kind, mesh_spec), ("dp", "single")):
    mesh = (make_mesh({"data": 1}, jax.devices()[:1]) if spec == "single"
            else make_mesh(parse_mesh_spec(spec, 8)))
    coll = EmbeddingCollection.create(tables, features, uniform_plan(kind_, tables, 1), mesh,
                                      optimizers.Adagrad(0.1))
    state = coll.init(jax.random.key(0))
    before = np.asarray(coll.unstack_tables(state)[0]["spare"])
    ids, weights, gout = make_inputs(0)
    ids = {f.name: ids[f.name] for f in features}
    weights = {f.name: weights[f.name] for f in features if f.weighted}

    def step(state, ids, weights, gout):
      ctx = coll.lookup(state, ids, weights)
      pooled, vjp = jax.vjp(lambda r: coll.pool(r, ctx), ctx.rows)
      return pooled, coll.apply_gradients(state, ctx, vjp(gout)[0], jnp.int32(0))

    pooled, state = jax.jit(step)(state, ids, weights, gout[:, 2:])
    tables_out = {k: np.asarray(v) for k, v in coll.unstack_tables(state)[0].items()}
    np.testing.assert_array_equal(tables_out["spare"], before)
    results.append((np.asarray(pooled), tables_out))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
  for name in results[1][1]:
    np.testing.assert_allclose(results[0][1][name], results[1][1][name], rtol=1e-5, atol=1e-6)


def test_an_unread_table_of_its_own_optimizer_family_names_it():
  """An unread table's own optimizer family (`table_optimizers`) keeps it out of the read
  tables' stacks: the error said no read table had its kind, dim and dtype (two had)."""
  tables = (TableSpec("a", 37, 4), TableSpec("b", 13, 4), TableSpec("unread", 7, 4))
  features = (FeatureSpec("fa", "a", 2), FeatureSpec("fb", "b", 1))
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  for rate_only in ({}, {"unread": optimizers.SGD(0.5)}):   # the same family: joins b's stack
    coll = EmbeddingCollection.create(
        tables, features, uniform_plan("dp", tables, 1), mesh,
        optimizers.per_table(optimizers.SGD(0.1), rate_only, tables=[t.name for t in tables]))
    assert [s.name for s in coll.layouts[0].slots] == ["b", "unread"]
  with pytest.raises(ConfigError, match=re.escape(
      "tables ['unread'] (dp, dim 4, float32, sparse optimizer Adam(lr=0.1, b1=0.9, "
      "b2=0.999, eps=1e-08)) are read by no feature, and no table a feature reads has the "
      "same kind, dim, dtype and optimizer family (its class and every setting but lr), "
      "whose stack they would join; add a feature for them, place them like a read table, "
      "give them a read table's optimizer, or leave them out")):
    EmbeddingCollection.create(
        tables, features, uniform_plan("dp", tables, 1), mesh,
        optimizers.per_table(optimizers.SGD(0.1), {"unread": optimizers.Adam(0.1)},
                             tables=[t.name for t in tables]))


def test_stack_tables_names_a_missing_or_misshapen_table():
  """`stack_tables` concatenates a stack's tables row-wise: an array of the wrong row count
  used to be stacked anyway (every later table of the stack shifted, the stack the wrong
  size), a wrong dim or a missing table died in jnp.concatenate or as a bare KeyError."""
  mesh = make_mesh(parse_mesh_spec("table=2,row=4", 8))
  coll = EmbeddingCollection.create(TABLES, FEATURES, uniform_plan("twrw", TABLES, 2), mesh,
                                    optimizers.RowWiseAdagrad(0.1))
  good = {t.name: np.zeros((t.rows, t.dim), np.float32) for t in TABLES}
  good_opt = {t.name: {"accum": np.zeros(t.rows, np.float32)} for t in TABLES}
  state = coll.stack_tables(good, good_opt)
  assert {k: v.shape for k, v in state["tables"].items()} == \
      {l.name: l.shape for l in coll.layouts}
  with pytest.raises(ConfigError, match=r"array of table 'small' has shape \[4, 8\], "
                     r"expected \[3, 8\]"):
    coll.stack_tables({**good, "small": np.zeros((4, 8), np.float32)})
  with pytest.raises(ConfigError, match=r"table 'odd' has shape \[13, 4\], expected \[13, 8\]"):
    coll.stack_tables({**good, "odd": np.zeros((13, 4), np.float32)})
  with pytest.raises(ConfigError, match="no array for table 'big'"):
    coll.stack_tables({k: v for k, v in good.items() if k != "big"})
  with pytest.raises(ConfigError, match=r"state 'accum' of table 'odd' has shape \[13, 8\], "
                     r"expected \[13\]"):
    coll.stack_tables(good, {**good_opt, "odd": {"accum": np.zeros((13, 8), np.float32)}})
  with pytest.raises(ConfigError, match="no optimizer state 'accum' for table 'big'"):
    coll.stack_tables(good, {**good_opt, "big": {}})


def test_slice_overflow_error_names_a_few_of_many_tables():
  """3,000 tables of 1e6 rows forced `dp`: the int32 overflow error listed every table of the
  slice, a 26 KB line; it names the first few and how many more."""
  from jaxrec.embedding import layout as layout_lib  # pylint: disable=import-outside-toplevel
  tables = tuple(TableSpec(f"t{i}", 1_000_000, 1) for i in range(3000))
  features = tuple(FeatureSpec(f"f{i}", f"t{i}") for i in range(3000))
  layouts = layout_lib.build_layouts(tables, features, uniform_plan("dp", tables, 1),
                                     {"data": 1, "table": 1, "row": 1, "col": 1},
                                     optimizers.SGD(0.1))
  problem = layout_lib.stack_problems(layouts[0])[2]
  assert problem.startswith("tables ['t0', 't1', "), problem
  assert "+2992 more] (dp, dim 1, float32) stack 3,000,000,000 rows" in problem, problem
  assert len(problem) < 500, len(problem)
