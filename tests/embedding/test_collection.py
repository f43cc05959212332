"""Sharded embedding collection vs a plain single-device numpy reference."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.embedding import optimizers
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError, DataError
from jaxrec.kernels import quant
from jaxrec.schedules import Schedule, lr_schedule
from jaxrec.sharding.mesh import make_mesh, parse_mesh_spec
from jaxrec.embedding.layout import build_layouts, ids_gather_axes
from jaxrec.sharding.plan import MESH_AXES, Plan, TablePlacement, uniform_plan

# Row counts not divisible by 2, 4 or 8: every split below is uneven.
TABLES = (TableSpec("a", 37, 8), TableSpec("b", 50, 8), TableSpec("c", 11, 8))
FEATURES = (FeatureSpec("fa", "a", 3, "sum"), FeatureSpec("fb", "b", 1),
            FeatureSpec("fc", "c", 2, "mean"), FeatureSpec("fa2", "a", 2, "sum", weighted=True))
B = 16

PLANS = [("dp", "data=8"), ("tw", "table=8"), ("rw", "row=8"), ("cw", "col=8"),
         ("twrw", "data=2,table=2,row=2"), ("twcw", "data=2,table=2,col=2"),
         ("grid", "table=2,row=2,col=2"), ("rw", "data=2,row=4"), ("tw", "table=4,data=2"),
         # replicas on several and on non-leading axes (SGD's no-dedup gradient all-gather)
         ("tw", "table=2,row=4"), ("dp", "table=2,row=2,col=2")]


def make_inputs(seed=0, tables=TABLES):
  """Ids, weights and a pooled-output gradient for FEATURES on `tables` (a, b, c)."""
  rng = np.random.default_rng(seed)
  rows = {t.name: t.rows for t in tables}
  ids = {f.name: rng.integers(-1, rows[f.table], (B, f.max_len)).astype(np.int32)
         for f in FEATURES}
  ids["fb"][:, 0] = np.maximum(ids["fb"][:, 0], 0)
  ids["fa"][:4] = 5      # duplicates inside and across bags
  weights = {"fa2": rng.random((B, 2)).astype(np.float32)}
  dim = max(t.dim for t in tables)   # mixed dims: pooled output padded to the widest
  gout = rng.standard_normal((B, len(FEATURES), dim)).astype(np.float32)
  return ids, weights, gout


def run(kind, mesh_spec, opt, steps=2, seed=0, plan=None, tables=TABLES, **options):
  """`run_collection` of `opt` on `tables` placed by `kind` (or `plan`) on `mesh_spec`;
  `options`: `EmbeddingOptions` fields (e.g. `dedup=True`)."""
  options = tuple(sorted(options.items()))
  if mesh_spec == "single" and plan is None:
    pooled, tables_out, opt_state = _single(kind, opt, steps, seed, tables, options)
    return ([p.copy() for p in pooled], {k: v.copy() for k, v in tables_out.items()},
            opt_state)   # copies: a test may write into its own
  return _run(kind, mesh_spec, opt, steps, seed, plan, tables, options)


@functools.cache
def _single(kind, opt, steps, seed, tables, options):
  """The single-device runs many cases compare with, once per worker (the grids below
  compare 2 optimizers x 11 meshes with the same 2 references)."""
  return _run(kind, "single", opt, steps, seed, None, tables, options)


def _run(kind, mesh_spec, opt, steps, seed, plan, tables, options=()):
  if mesh_spec == "single":
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
  else:
    mesh = make_mesh(parse_mesh_spec(mesh_spec, 8))
  plan = plan or uniform_plan(kind, tables, mesh.shape["table"])
  return run_collection(EmbeddingCollection.create(tables, FEATURES, plan, mesh, opt,
                                                   **dict(options)), steps, seed)


def run_collection(coll, steps=2, seed=0):
  """`steps` lookup + pool + update steps of `coll` on `make_inputs`; returns the pooled
  outputs, the unstacked tables (numpy) and the optimizer state."""
  state = coll.init(jax.random.key(0))

  @jax.jit
  def step(state, ids, weights, gout, i):
    ctx = coll.lookup(state, ids, weights)
    pooled, vjp = jax.vjp(lambda r: coll.pool(r, ctx), ctx.rows)
    (grads,) = vjp(gout)
    return pooled, coll.apply_gradients(state, ctx, grads, i)

  pooled_all = []
  for i in range(steps):
    ids, weights, gout = make_inputs(seed + i, coll.tables)
    pooled, state = step(state, ids, weights, gout, jnp.int32(i))
    pooled_all.append(np.asarray(pooled))
  tables, opt_state = coll.unstack_tables(state)
  return pooled_all, {k: np.asarray(quant.dequantize(v)) for k, v in tables.items()}, opt_state


# ------------------------------------------------------------------- numpy reference
def ref_weights(f, ids, weights):
  """Pooling weight of each slot of feature `f`: 0 for absent ids, per-id weight, 1/len."""
  valid = ids[f.name] >= 0
  w = valid.astype(np.float32)
  if f.weighted:
    w = w * weights[f.name]
  if f.pooling == "mean":
    w = w / np.maximum(valid.sum(1, keepdims=True), 1)
  return w


def ref_pool(tables, ids, weights):
  """`[B, F, widest dim]`: a narrower table's features fill their first columns, rest 0."""
  out = np.zeros((B, len(FEATURES), max(t.shape[1] for t in tables.values())), np.float32)
  for j, f in enumerate(FEATURES):
    w = ref_weights(f, ids, weights)
    dim = tables[f.table].shape[1]
    out[:, j, :dim] = (tables[f.table][np.maximum(ids[f.name], 0)] * w[..., None]).sum(1)
  return out


def ref_grads(tables, ids, weights, gout):
  grads = {k: np.zeros_like(v) for k, v in tables.items()}
  seen = {k: np.zeros(v.shape[0], bool) for k, v in tables.items()}
  for j, f in enumerate(FEATURES):
    x = ids[f.name]
    valid = x >= 0
    w = ref_weights(f, ids, weights)
    contrib = w[..., None] * gout[:, j, :grads[f.table].shape[1]][:, None, :]
    np.add.at(grads[f.table], x[valid], contrib[valid])
    seen[f.table][x[valid]] = True
  return grads, seen


def ref_update(opt, w, g, state, t):
  """Dense numpy form of each optimizer's rule (a scheduled lr taken at step `t`)."""
  if isinstance(opt.lr, Schedule):
    opt = dataclasses.replace(opt, lr=float(np.asarray(opt.lr(t))))
  if isinstance(opt, optimizers.SGD):
    return w - opt.lr * g, state
  if isinstance(opt, optimizers.Adagrad):
    acc = state["accum"] + g * g
    return w - opt.lr * g / (np.sqrt(acc) + opt.eps), {"accum": acc}
  if isinstance(opt, optimizers.RowWiseAdagrad):
    acc = state["accum"] + (g * g).mean(1)
    return w - opt.lr * g / (np.sqrt(acc) + opt.eps)[:, None], {"accum": acc}
  if isinstance(opt, optimizers.Adam):
    m = opt.b1 * state["m"] + (1 - opt.b1) * g
    v = opt.b2 * state["v"] + (1 - opt.b2) * g * g
    mh, vh = m / (1 - opt.b1 ** (t + 1)), v / (1 - opt.b2 ** (t + 1))
    return w - opt.lr * mh / (np.sqrt(vh) + opt.eps), {"m": m, "v": v}
  if isinstance(opt, optimizers.FTRL):   # a row's first update starts z at its weight's
    fresh = (state["z"] == 0) & (state["n"] == opt.initial_accumulator)
    z0 = np.where(fresh, -w * ((opt.beta + np.sqrt(state["n"])) / opt.lr + 2 * opt.l2)
                  - np.sign(w) * opt.l1, state["z"])
    n_new = state["n"] + g * g
    z = z0 + g - (np.sqrt(n_new) - np.sqrt(state["n"])) / opt.lr * w
    denom = (opt.beta + np.sqrt(n_new)) / opt.lr + 2 * opt.l2
    w_new = np.where(np.abs(z) <= opt.l1, 0.0, -(z - np.sign(z) * opt.l1) / denom)
    return w_new, {"z": z, "n": n_new}
  raise AssertionError(opt)


def reference(opt, steps=2, specs=TABLES):
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  coll = EmbeddingCollection.create(specs, FEATURES, uniform_plan("dp", specs, 1), mesh, opt)
  tables, _ = coll.unstack_tables(coll.init(jax.random.key(0)))
  tables = {k: np.asarray(v, np.float64) for k, v in tables.items()}
  state = {t.name: {} for t in specs}
  for t in specs:   # `opt` may be per table (`optimizers.TableOptimizers`)
    for k, (per, init) in optimizers.of(opt, t.name).state_layout().items():
      shape = (t.rows, t.dim) if per == "element" else (t.rows,)
      state[t.name][k] = np.full(shape, init, np.float64)
  pooled_all = []
  for i in range(steps):
    ids, weights, gout = make_inputs(i, specs)
    pooled_all.append(ref_pool(tables, ids, weights))
    grads, seen = ref_grads(tables, ids, weights, gout)
    for name in tables:
      rows = seen[name]
      sub = {k: v[rows] for k, v in state[name].items()}
      new_w, new_s = ref_update(optimizers.of(opt, name), tables[name][rows],
                                grads[name][rows], sub, i)
      tables[name][rows] = new_w
      for k in new_s:
        state[name][k][rows] = new_s[k]
  return pooled_all, tables, state


OPTS = [optimizers.SGD(0.1), optimizers.Adagrad(0.1, 0.1), optimizers.RowWiseAdagrad(0.1, 0.1),
        optimizers.Adam(0.01), optimizers.FTRL(0.1, l1=0.01, l2=0.01)]


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: type(o).__name__)
def test_single_device_matches_dense_reference(opt):
  pooled, tables, opt_state = run("dp", "single", opt)
  ref_pooled, ref_tables, ref_state = reference(opt)
  for a, b in zip(pooled, ref_pooled):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for name in ref_tables:
    np.testing.assert_allclose(tables[name], ref_tables[name], rtol=1e-5, atol=1e-6)
    for k in ref_state[name]:
      np.testing.assert_allclose(np.asarray(opt_state[name][k]), ref_state[name][k],
                                 rtol=1e-5, atol=1e-6)


# A rate that changes every step (0.3, 0.2, 0.1, ...): a step using another step's rate
# differs from the reference.
LINEAR = lr_schedule("linear", init_value=0.3, end_value=0.0, transition_steps=3)
SCHEDULED = [optimizers.SGD(LINEAR), optimizers.Adagrad(LINEAR, 0.1),
             optimizers.RowWiseAdagrad(LINEAR, 0.1),
             # Adam's steps are ~lr whatever the gradient: at 0.3 float32 rounding of the
             # moments' ratio passes atol (as OPTS' Adam, 0.01)
             optimizers.Adam(lr_schedule("linear", init_value=0.01, end_value=0.0,
                                         transition_steps=3))]


@pytest.mark.parametrize("opt", SCHEDULED, ids=lambda o: type(o).__name__)
def test_scheduled_rates_match_the_dense_reference(opt):
  pooled, tables, _ = run("dp", "single", opt, steps=3)
  _, ref_tables, _ = reference(opt, steps=3)
  for name in ref_tables:
    np.testing.assert_allclose(tables[name], ref_tables[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,mesh_spec", [("dp", "data=8"), ("twrw", "data=2,table=2,row=2")])
def test_scheduled_sgd_without_dedup_matches_single_device(kind, mesh_spec):
  """SGD on float32 tables does not dedup: the scatter-add's delta takes the step's rate."""
  opt = SCHEDULED[0]
  ref = run("dp", "single", opt, steps=3)
  out = run(kind, mesh_spec, opt, steps=3)
  for name in ref[1]:
    np.testing.assert_allclose(out[1][name], ref[1][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,mesh_spec", PLANS, ids=[f"{k}-{m}" for k, m in PLANS])
@pytest.mark.parametrize("opt", [OPTS[0], OPTS[2]], ids=["SGD", "RowWiseAdagrad"])
def test_sharded_matches_single_device(kind, mesh_spec, opt):
  ref = run("dp", "single", opt)
  out = run(kind, mesh_spec, opt)
  for a, b in zip(out[0], ref[0]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for name in ref[1]:
    np.testing.assert_allclose(out[1][name], ref[1][name], rtol=1e-5, atol=1e-6)


# Tables of two dims: the stacks of `b` (dim 4) and of `a`, `c` (dim 8) pool separately;
# `fb`'s pooled activations are padded to 8 with zero columns, whose gradient is dropped.
MIXED = (TableSpec("a", 37, 8), TableSpec("b", 50, 4), TableSpec("c", 11, 8))


@pytest.mark.parametrize("opt", [OPTS[0], OPTS[3]], ids=["SGD", "Adam"])
def test_mixed_dims_single_device_matches_dense_reference(opt):
  pooled, tables, _ = run("dp", "single", opt, tables=MIXED)
  ref_pooled, ref_tables, _ = reference(opt, specs=MIXED)
  for a, b in zip(pooled, ref_pooled):
    assert a.shape == (B, len(FEATURES), 8)
    np.testing.assert_array_equal(a[:, 1, 4:], 0)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for name in ref_tables:
    assert tables[name].shape == ref_tables[name].shape
    np.testing.assert_allclose(tables[name], ref_tables[name], rtol=1e-5, atol=1e-6)


# Three meshes in the default suite: `cw` groups stacks of two dims over one axis (and pads
# `b`'s 4 columns to col=8), `twrw` and `grid` split three axes (`tw` in the slow target).
MIXED_FAST = {("cw", "col=8"), ("twrw", "data=2,table=2,row=2"), ("grid", "table=2,row=2,col=2")}


@pytest.mark.parametrize("kind,mesh_spec", [
    p if p in MIXED_FAST else pytest.param(*p, marks=pytest.mark.slow) for p in PLANS],
    ids=[f"{k}-{m}" for k, m in PLANS])
def test_mixed_dims_sharded_matches_single_device(kind, mesh_spec):
  opt = optimizers.RowWiseAdagrad(0.1, 0.1)
  ref = run("dp", "single", opt, tables=MIXED)
  out = run(kind, mesh_spec, opt, tables=MIXED)
  for a, b in zip(out[0], ref[0]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for name in ref[1]:
    np.testing.assert_allclose(out[1][name], ref[1][name], rtol=1e-5, atol=1e-6)


def test_bag_buckets_merge_only_where_cheaper():
  """Stacks group by bag bucket (a: bags of 3 and 2, c: 2 → L4; b: one-hot → L1). Split over
  `table`, buckets merge when W * L of the union is at most the sum: b on its own slice
  rides in the L=3 stack's slots (2*3 <= 2*3 + 1); all three on one slice would make it
  4*3 > 3*3 + 1, so the one-hot stack stays apart. Both give the single-device result."""
  mesh = {"table": 8}
  spread = uniform_plan("tw", TABLES, 8)
  crowded = Plan({t.name: TablePlacement("tw", 0) for t in TABLES})
  assert [(l.name, l.max_len, len(l.slot_features[0]))
          for l in build_layouts(TABLES, FEATURES, spread, mesh)] == [("tw_d8_float32_L4", 3, 2)]
  assert [(l.name, l.max_len, len(l.slot_features[0]))
          for l in build_layouts(TABLES, FEATURES, crowded, mesh)] == [
              ("tw_d8_float32_L1", 1, 1), ("tw_d8_float32_L4", 3, 3)]
  opt = optimizers.RowWiseAdagrad(0.1, 0.1)
  ref = run("dp", "single", opt)
  for plan in (spread, crowded):
    out = run("tw", "table=8", opt, plan=plan)
    for a, b in zip(out[0], ref[0]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for name in ref[1]:
      np.testing.assert_allclose(out[1][name], ref[1][name], rtol=1e-5, atol=1e-6)


def test_unseen_rows_untouched():
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  opt = optimizers.Adam(0.01)
  coll = EmbeddingCollection.create(TABLES, FEATURES, uniform_plan("dp", TABLES, 1), mesh, opt)
  before, _ = coll.unstack_tables(coll.init(jax.random.key(0)))
  _, after, _ = run("dp", "single", opt, steps=1)
  ids, _, _ = make_inputs(0)
  seen = np.zeros(37, bool)
  for f in ("fa", "fa2"):
    seen[ids[f][ids[f] >= 0]] = True
  np.testing.assert_array_equal(after["a"][~seen], np.asarray(before["a"])[~seen])
  assert not np.allclose(after["a"][seen], np.asarray(before["a"])[seen])


def test_out_of_range_ids_name_the_feature():
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  coll = EmbeddingCollection.create(TABLES, FEATURES, uniform_plan("dp", TABLES, 1), mesh,
                                    optimizers.SGD())
  ids, _, _ = make_inputs()
  ids["fb"][3, 0] = 50
  with pytest.raises(DataError, match=r"feature 'fb' \(table 'b', 50 rows\): id 50"):
    coll.check_ids(ids)


def test_unknown_table():
  mesh = make_mesh({"col": 8})
  with pytest.raises(ConfigError, match="feature 'fz' names unknown table 'zz'"):
    EmbeddingCollection.create(TABLES, FEATURES + (FeatureSpec("fz", "zz"),),
                               uniform_plan("dp", TABLES, 1), mesh, optimizers.SGD())


def test_an_unknown_table_among_many_is_named_with_a_near_one_and_a_short_list():
  """Among 1,000 tables the error listed every name (7,150 characters) and no near one."""
  from jaxrec.embedding.specs import validate  # pylint: disable=import-outside-toplevel
  tables = [TableSpec(f"t{i:04d}", 10, 4) for i in range(1000)]
  features = [FeatureSpec(f"f{i}", f"t{i:04d}") for i in range(999)] + [
      FeatureSpec("f999", "t05000")]
  with pytest.raises(ConfigError) as e:
    validate(tables, features)
  assert str(e.value) == ("feature 'f999' names unknown table 't05000'; did you mean 't0500'? "
                          "(tables: t0000, t0001, t0002, t0003, t0004, t0005, t0006, t0007, "
                          "+992 more)")
  with pytest.raises(ConfigError, match=r"\['t9'\] names no table \(tables: t0000, .*, "
                     r"t0019, \+980 more\)$"):
    optimizers.checked_overrides({"t9": optimizers.SGD()}, "table_optimizers",
                                 [t.name for t in tables])


def test_a_table_no_feature_reads_is_a_clear_error():
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  tables = TABLES + (TableSpec("unused", 5, 16),)
  with pytest.raises(ConfigError, match=r"tables \['unused'\] \(dp, dim 16, float32\) are read "
                     "by no feature"):
    EmbeddingCollection.create(tables, FEATURES, uniform_plan("dp", tables, 1), mesh,
                               optimizers.SGD())


def test_dedup_off_equals_dedup_on_for_sgd():
  """SGD without dedup (per-slot gather + scatter-add) matches the deduplicated path."""
  mesh = make_mesh(parse_mesh_spec("data=2,table=2,row=2", 8))
  out = {}
  for dedup in (True, False):
    coll = EmbeddingCollection.create(TABLES, FEATURES, uniform_plan("twrw", TABLES, 2), mesh,
                                      optimizers.SGD(0.1), dedup=dedup)
    assert {coll.dedup(l) for l in coll.layouts} == {dedup}
    state = coll.init(jax.random.key(0))
    ids, weights, gout = make_inputs(0)

    @jax.jit
    def step(state, ids, weights, gout, coll=coll):
      ctx = coll.lookup(state, ids, weights)
      pooled, vjp = jax.vjp(lambda r: coll.pool(r, ctx), ctx.rows)
      (grads,) = vjp(gout)
      return pooled, coll.apply_gradients(state, ctx, grads, jnp.int32(0))

    pooled, new_state = step(state, ids, weights, gout)
    tables, _ = coll.unstack_tables(new_state)
    out[dedup] = (np.asarray(pooled), {k: np.asarray(v) for k, v in tables.items()})
  np.testing.assert_allclose(out[False][0], out[True][0], rtol=1e-6, atol=1e-7)
  for name in out[True][1]:
    np.testing.assert_allclose(out[False][1][name], out[True][1][name], rtol=1e-6, atol=1e-7)


def test_replicated_stacks_gather_slot_gradients_in_one_collective():
  """dp on data=8 without dedup: one all-gather per step, of both stacks' slots and slot
  gradients (L1 and L4 side by side): not one per stack, and no ids all-gather in stage 1
  (no stack needs another device's ids before the update)."""
  import re  # pylint: disable=import-outside-toplevel
  mesh = make_mesh(parse_mesh_spec("data=8", 8))
  coll = EmbeddingCollection.create(TABLES, FEATURES, uniform_plan("dp", TABLES, 1), mesh,
                                    optimizers.SGD(0.1))
  assert len(coll.layouts) == 2 and not any(coll.dedup(l) for l in coll.layouts)
  state = coll.init(jax.random.key(0))
  ids, weights, gout = make_inputs()

  def step(state, ids, weights, gout):
    ctx = coll.lookup(state, ids, weights)
    _, vjp = jax.vjp(lambda r: coll.pool(r, ctx), ctx.rows)
    return coll.apply_gradients(state, ctx, vjp(gout)[0], jnp.int32(0))

  hlo = jax.jit(step).lower(state, ids, weights, gout).compile().as_text()
  assert len(re.findall(r" all-gather(?:-start)?\(", hlo)) == 1, hlo


@pytest.mark.parametrize("optimizer,axes", [(optimizers.SGD(0.1), ("table", "row")),
                                            (optimizers.Adagrad(0.1), MESH_AXES[:3])])
def test_ids_gathered_only_over_the_axes_a_stack_needs(optimizer, axes):
  """twrw on data=2,table=2,row=2: without dedup stage 1 gathers ids over the split axes
  only (the data replicas' ids come with the slot gradients); with dedup over data too."""
  mesh = make_mesh(parse_mesh_spec("data=2,table=2,row=2", 8))
  coll = EmbeddingCollection.create(TABLES, FEATURES, uniform_plan("twrw", TABLES, 2), mesh,
                                    optimizer)
  assert ids_gather_axes(coll.layouts, [coll.dedup(l) for l in coll.layouts]) == axes


def test_a_kernels_optimizer_is_a_clear_error():
  """`jaxrec.kernels.SGD` (same name, no `state_layout`/`update`) was accepted by `create`,
  and `init` then failed with an AttributeError."""
  from jaxrec import kernels  # pylint: disable=import-outside-toplevel
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  with pytest.raises(ConfigError, match=r"is not a sparse optimizer of "
                     r"jaxrec.embedding.optimizers"):
    EmbeddingCollection.create(TABLES, FEATURES, uniform_plan("dp", TABLES, 1), mesh,
                               kernels.SGD(0.1))


def test_dedup_off_needs_a_linear_optimizer():
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  with pytest.raises(ConfigError, match="dedup=False needs SGD"):
    EmbeddingCollection.create(TABLES, FEATURES, uniform_plan("dp", TABLES, 1), mesh,
                               optimizers.Adagrad(), dedup=False)


def test_host_packed_ids_equal_ids_by_feature():
  """`pack` on the host (numpy) is what `lookup` builds under jit, and looking up the
  packed array gives the same pooled activations as the per-feature dict."""
  mesh = make_mesh(parse_mesh_spec("data=2,table=2,row=2", 8))
  coll = EmbeddingCollection.create(TABLES, FEATURES, uniform_plan("twrw", TABLES, 2), mesh,
                                    optimizers.SGD(0.1))
  state = coll.init(jax.random.key(0))
  ids, weights, _ = make_inputs(3)
  host = coll.pack(ids, weights)
  assert host.dtype == np.int32 and host.shape[0] == B
  np.testing.assert_array_equal(host, np.asarray(jax.jit(
      lambda i, w: coll.pack(i, w, xp=jnp))(ids, weights)))
  pool = jax.jit(lambda s, i, w: coll.pool(coll.lookup(s, i, w).rows, coll.lookup(s, i, w)))
  np.testing.assert_array_equal(np.asarray(pool(state, host, {})),
                                np.asarray(pool(state, ids, weights)))
  with pytest.raises(DataError, match="no weights for weighted feature 'fa2'"):
    coll.pack(ids, {})
  # Every feature sends its own max_len columns (ids, then weights), not its stack's
  # longest bag: fa (3), fc (2) and fa2 (2) share the L=3 stack.
  assert host.shape[1] == sum(f.max_len for f in FEATURES) + 2
  with pytest.raises(DataError, match=r"feature 'fc': ids shape \(16, 3\), expected \[batch, 2\]"):
    coll.pack(dict(ids, fc=np.zeros((B, 3), np.int32)), weights)
  with pytest.raises(DataError, match="feature 'fa2': weights shape"):
    coll.pack(ids, {"fa2": np.ones((B, 1), np.float32)})


def test_one_slice_stacks_take_every_feature_in_order():
  """`build_layouts` lists a one-slice stack's features in order, unpadded: the case in
  which `local_ops.select_features` skips its gather."""
  for kind, mesh_spec in PLANS:
    mesh = parse_mesh_spec(mesh_spec, 8)
    for l in build_layouts(TABLES, FEATURES, uniform_plan(kind, TABLES, mesh.get("table", 1)),
                           mesh):
      if l.num_slices == 1:
        assert l.slot_features == (tuple(range(len(l.features))),), (kind, mesh_spec, l.name)


# One-slice `slot_features` that `build_layouts` does not make but `lookup` and `pool` take
# (any order, -1 padding): `select_features` must gather them, not skip as for 0..F_s-1.
SLOT_ORDERS = {"permuted": {"L1": (0,), "L4": (2, 0, 1)},
               "padded": {"L1": (0, -1), "L4": (0, 1, 2, -1)},
               "padded_inside_permuted": {"L1": (-1, 0), "L4": (1, -1, 2, 0)}}


@pytest.mark.parametrize("order", list(SLOT_ORDERS))
@pytest.mark.parametrize("opt,options", [
    (OPTS[2], {}), (OPTS[0], {"dedup": False}),
    (OPTS[0], {"kernel": "pallas", "interpret": True})], ids=["dedup", "no-dedup", "pallas"])
def test_one_slice_stack_with_reordered_or_padded_slot_features(order, opt, options):
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  coll = EmbeddingCollection.create(TABLES, FEATURES, uniform_plan("dp", TABLES, 1), mesh, opt,
                                    **options)
  layouts = tuple(dataclasses.replace(l, slot_features=(SLOT_ORDERS[order][l.name[-2:]],))
                  for l in coll.layouts)
  assert [l.name for l in layouts] == ["dp_d8_float32_L1", "dp_d8_float32_L4"]
  pooled, tables, _ = run_collection(dataclasses.replace(coll, layouts=layouts))
  ref_pooled, ref_tables, _ = reference(opt)
  for i in range(2):
    np.testing.assert_allclose(pooled[i], ref_pooled[i], rtol=1e-5, atol=1e-6)
  for name in ref_tables:
    np.testing.assert_allclose(tables[name], ref_tables[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,mesh_spec", [("dp", "single"), ("rw", "row=8"), ("tw", "table=8"),
                                            ("grid", "table=2,row=2,col=2")])
def test_ids_outside_their_table_read_nothing_on_device(kind, mesh_spec):
  """Past the host's `check_ids` (e.g. `lookup` called directly), an id outside its table
  counts as absent (-1): it must not read or update a row of the table stacked after it,
  nor count in its mean bag's id count (row 3 of fc: the mean of row 4 alone)."""
  mesh = (make_mesh({"data": 1}, jax.devices()[:1]) if mesh_spec == "single"
          else make_mesh(parse_mesh_spec(mesh_spec, 8)))
  coll = EmbeddingCollection.create(TABLES, FEATURES,
                                    uniform_plan(kind, TABLES, mesh.shape["table"]), mesh,
                                    optimizers.SGD(0.1))

  @jax.jit
  def step(state, ids, weights, gout):
    ctx = coll.lookup(state, ids, weights)
    pooled, vjp = jax.vjp(lambda r: coll.pool(r, ctx), ctx.rows)
    return pooled, coll.apply_gradients(state, ctx, vjp(gout)[0], jnp.int32(0))

  ids, weights, gout = make_inputs(0)
  ids["fc"][3] = [4, 5]
  bad = {k: v.copy() for k, v in ids.items()}
  bad["fa"][0] = [37, 40, 2**31 - 1]   # table a has 37 rows; c (11) is stacked after it
  bad["fc"][1] = [11, -5]
  bad["fc"][3, 1] = 11
  bad["fb"][2] = 50
  clean = {k: np.where(bad[k] == ids[k], ids[k], -1).astype(np.int32) for k in ids}
  outs = [step(coll.init(jax.random.key(0)), x, weights, gout) for x in (bad, clean)]
  np.testing.assert_array_equal(np.asarray(outs[0][0]), np.asarray(outs[1][0]))
  for a, b in zip(coll.unstack_tables(outs[0][1])[0].values(),
                  coll.unstack_tables(outs[1][1])[0].values()):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
