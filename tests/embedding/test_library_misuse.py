"""The collection used as a library, from a user's own code: eager calls compile once, and
what gave silently wrong results (zero weight gradients, integer stacks, another
collection's state, a misspelt feature) or a bare KeyError is refused naming the cause."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import monitoring
from jax.sharding import AxisType, Mesh

from jaxrec.embedding import optimizers
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError, DataError
from jaxrec.sharding.mesh import make_mesh
from jaxrec.sharding.plan import uniform_plan

TABLES = (TableSpec("user", 40, 8), TableSpec("item", 48, 8))
FEATURES = (FeatureSpec("user", "user"), FeatureSpec("hist", "item", 3, weighted=True))


def collection(tables=TABLES, kind="rw", optimizer=None):
  return EmbeddingCollection.create(tables, FEATURES, uniform_plan(kind, tables, 1),
                                    make_mesh({"row": 8}), optimizer or optimizers.SGD(0.1))


def inputs():
  rng = np.random.default_rng(0)
  ids = {"user": rng.integers(0, 40, (8, 1)).astype(np.int32),
         "hist": rng.integers(-1, 48, (8, 3)).astype(np.int32)}
  return ids, {"hist": rng.random((8, 3)).astype(np.float32)}


def test_eager_calls_compile_once_and_match_jit():
  """Each eager lookup/pool/apply_gradients built new shard_maps and compiled ~80 programs:
  2-7 s a call against under 1 ms jitted."""
  coll = collection()
  state = coll.init(jax.random.key(0))
  ids, weights = inputs()
  compiles = []
  monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None)

  def eager():
    ctx = coll.lookup(state, ids, weights)
    pooled = coll.pool(ctx.rows, ctx)
    grads = {name: jnp.ones_like(r) for name, r in ctx.rows.items()}
    return pooled, coll.apply_gradients(state, ctx, grads, 0)

  first = eager()
  before = len(compiles)
  again = eager()
  assert len(compiles) == before   # nothing compiled the second time
  jax.tree.map(np.testing.assert_array_equal, first, again)

  @jax.jit
  def jitted(state, ids, weights):
    ctx = coll.lookup(state, ids, weights)
    grads = {name: jnp.ones_like(r) for name, r in ctx.rows.items()}
    return coll.pool(ctx.rows, ctx), coll.apply_gradients(state, ctx, grads, 0)

  jax.tree.map(np.testing.assert_array_equal, jitted(state, ids, weights), first)
  with pytest.raises(DataError, match="id 40 is out of range"):   # eager ids are checked
    coll.lookup(state, dict(ids, user=jnp.full((8, 1), 40, jnp.int32)), weights)


def test_a_gradient_with_respect_to_per_id_weights_is_refused():
  """It was zero everywhere (the weights travel as int32 bits), without a word."""
  coll = collection()
  state = coll.init(jax.random.key(0))
  ids, weights = inputs()

  def loss(w):
    ctx = coll.lookup(state, ids, {"hist": w})
    return coll.pool(ctx.rows, ctx).sum()

  with pytest.raises(ConfigError, match="gradients with respect to per-id weights are not "
                     "supported"):
    jax.grad(loss)(jnp.asarray(weights["hist"]))
  # the tables' gradient still flows (through the rows)
  ctx = coll.lookup(state, ids, weights)
  g = jax.grad(lambda r: coll.pool(r, ctx).sum())(ctx.rows)
  assert all(float(jnp.abs(x).sum()) > 0 for x in g.values())


def test_stack_tables_takes_each_tables_dtype():
  """Integer arrays made an int32 stack (SGD rows stayed at 1, Adagrad's dropped to 0)."""
  coll = collection()
  ones = {t.name: np.ones((t.rows, t.dim), np.int64) for t in TABLES}
  with pytest.raises(ConfigError, match=r"stack_tables: the array of table 'user' is int64: "
                     "give float values"):
    coll.stack_tables(ones)
  stacked = coll.stack_tables({n: x.astype(np.float64) for n, x in ones.items()})
  assert {str(x.dtype) for x in stacked["tables"].values()} == {"float32"}
  low = collection((TableSpec("user", 40, 8, "bfloat16"), TableSpec("item", 48, 8, "int8")))
  stacked = low.stack_tables({n: x.astype(np.float32) for n, x in ones.items()})
  tables, _ = low.unstack_tables(stacked)
  assert tables["user"].dtype == jnp.bfloat16 and tables["item"].q.dtype == jnp.int8


def test_another_collections_state_is_refused():
  """A state of 40-row tables given to a collection of 48: rows read from the wrong table."""
  other = collection((TableSpec("user", 40, 8), TableSpec("item", 40, 8)), kind="dp")
  coll = collection(kind="dp")
  ids, weights = inputs()
  with pytest.raises(ConfigError, match=r"lookup: the state's stack 'dp_d8_float32_.*' has "
                     r"shape \[40, 8\], this collection's is \[48, 8\]: the state was laid "
                     "out by another collection"):
    coll.lookup(other.init(jax.random.key(0)), ids, weights)


def test_misspelt_features_and_missing_gradients_are_named():
  coll = collection()
  state = coll.init(jax.random.key(0))
  ids, weights = inputs()
  with pytest.raises(DataError, match=r"batch has ids for \['usr'\], not features of this "
                     r"collection \(\['hist', 'user'\]\)"):
    coll.lookup(state, dict(ids, usr=ids["user"]), weights)
  ctx = coll.lookup(state, ids, weights)
  with pytest.raises(ConfigError, match=r"apply_gradients: row_grads has no gradient for "
                     r"stacks \['rw_d8"):
    coll.apply_gradients(state, ctx, {}, 0)
  pooled = coll.pool(ctx.rows, ctx)   # its gradient is not the rows': a reshape's TypeError
  with pytest.raises(ConfigError, match=r"stacks \['rw_d8.*\] shaped as their rows in "
                     r"`ctx.rows`: pass the rows' gradients by stack"):
    coll.apply_gradients(state, ctx, {n: jnp.ones_like(pooled) for n in ctx.rows}, 0)


def test_a_mesh_of_explicit_axes_is_refused_at_create():
  """The lookup then failed deep in jax (a ShardingTypeError from a shard_map)."""
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(1, 1, 8, 1), ("data", "table", "row", "col"),
              axis_types=(AxisType.Explicit,) * 4)
  with pytest.raises(ConfigError, match=r"mesh axes \['data', 'table', 'row', 'col'\] are not "
                     "of type Auto"):
    EmbeddingCollection.create(TABLES, FEATURES, uniform_plan("rw", TABLES, 1), mesh,
                               optimizers.SGD(0.1))


def test_a_lookup_inside_a_shard_map_is_refused():
  """It said 'batch of 1 examples is not divisible by the 8 devices' for 8 examples."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  coll = collection()
  state = coll.init(jax.random.key(0))
  ids, weights = inputs()
  packed = coll.pack(ids, weights)

  def inner(p):
    return coll.lookup(state, p).rows

  with pytest.raises(ConfigError, match=r"lookup inside a shard_map \(manual axes \['data', "
                     r"'table', 'row', 'col'\]\): call it outside"):
    jax.jit(jax.shard_map(inner, mesh=coll.mesh, in_specs=P("row"), out_specs=P()))(packed)


def test_misspelt_feature_among_many_names_a_few_and_the_close_one():
  """Among 3,000 features a batch's misspelt one listed every feature, a 26 KB DataError;
  it names the first 8, how many more, and the feature it is close to."""
  tables = tuple(TableSpec(f"t{i}", 10, 4) for i in range(3000))
  features = tuple(FeatureSpec(f"feat{i}", f"t{i}") for i in range(3000))
  coll = EmbeddingCollection.create(tables, features, uniform_plan("dp", tables, 1),
                                    make_mesh({"data": 1}, jax.devices()[:1]), optimizers.SGD(0.1))
  ids = {f.name: np.zeros((8, 1), np.int32) for f in features}
  ids["faet2999"] = ids.pop("feat2999")
  with pytest.raises(DataError, match=r"batch has ids for \['faet2999'\], not features of this "
                     r"collection \(\['feat0', .*, \+2992 more\]\); did you mean 'feat2999'\?$"
                     ) as e:
    coll.pack(ids)
  assert len(str(e.value)) < 500, len(str(e.value))
