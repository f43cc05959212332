"""Per-table sparse optimizers (`ExperimentConfig.table_optimizers`,
`optimizers.TableOptimizers`): each table trains with its own optimizer, on every plan;
tables whose optimizers differ only in `lr` share a stack, each row at its table's rate."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.embedding import local_ops, optimizers
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.embedding.layout import build_layouts
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError
from jaxrec.schedules import lr_schedule, rate_at
from jaxrec.sharding.mesh import make_mesh, parse_mesh_spec
from jaxrec.sharding.plan import uniform_plan
from tests.embedding.test_collection import FEATURES, LINEAR, TABLES, reference, run
from tests.embedding.test_collection_inputs import assert_runs_match

# `b` keeps the default; `a` and `c` have their own (and Adam's state differs from Adagrad's)
MIXED_OPT = optimizers.per_table(optimizers.SGD(0.1), {
    "a": optimizers.RowWiseAdagrad(0.1, 0.1), "c": optimizers.Adam(0.01)})
_SLOW = pytest.mark.slow   # one-axis plans and twcw in the slow target (~5 s each)
ISSUE_PLANS = [pytest.param("dp", "data=8", marks=_SLOW), ("tw", "table=8"),
               pytest.param("rw", "row=8", marks=_SLOW), pytest.param("cw", "col=8", marks=_SLOW),
               ("twrw", "data=2,table=2,row=2"),
               pytest.param("twcw", "data=2,table=2,col=2", marks=_SLOW),
               ("grid", "table=2,row=2,col=2")]


def _collection(opt, kind="dp", mesh_spec="data=8", tables=TABLES, **options):
  mesh = make_mesh(parse_mesh_spec(mesh_spec, 8))
  return EmbeddingCollection.create(tables, FEATURES, uniform_plan(kind, tables,
                                                                   mesh.shape["table"]),
                                    mesh, opt, **options)


def test_each_table_matches_the_dense_reference_of_its_own_optimizer():
  pooled, tables, opt_state = run("dp", "single", MIXED_OPT, steps=3)
  ref_pooled, ref_tables, ref_state = reference(MIXED_OPT, steps=3)
  for a, b in zip(pooled, ref_pooled):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for name in ref_tables:
    np.testing.assert_allclose(tables[name], ref_tables[name], rtol=1e-5, atol=1e-6)
    assert set(opt_state.get(name, {})) == set(ref_state[name]), name
    for k in ref_state[name]:
      np.testing.assert_allclose(np.asarray(opt_state[name][k]), ref_state[name][k],
                                 rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,mesh_spec", ISSUE_PLANS)
def test_sharded_matches_single_device(kind, mesh_spec):
  assert_runs_match(run(kind, mesh_spec, MIXED_OPT), run("dp", "single", MIXED_OPT))


def test_tables_of_different_optimizers_never_share_a_stack():
  coll = _collection(MIXED_OPT)
  stacks = {tuple(s.name for s in l.slots): (l.name, l.optimizer) for l in coll.layouts}
  assert stacks == {("a",): ("dp_d8_float32_L4_o1", optimizers.RowWiseAdagrad(0.1, 0.1)),
                    ("b",): ("dp_d8_float32_L1", optimizers.SGD(0.1)),
                    ("c",): ("dp_d8_float32_L4_o2", optimizers.Adam(0.01))}
  assert coll.optimizer_of("b") == optimizers.SGD(0.1)
  assert coll.optimizer_of("c") == optimizers.Adam(0.01)
  assert set(coll.shardings()["opt"]["dp_d8_float32_L4_o2"]) == {"m", "v"}


def test_an_override_equal_to_the_default_stacks_with_the_default():
  same = optimizers.per_table(optimizers.SGD(0.1), {"a": optimizers.SGD(0.1)})
  assert [l.name for l in _collection(same, "tw", "table=8").layouts] == \
      [l.name for l in _collection(optimizers.SGD(0.1), "tw", "table=8").layouts]


def test_no_overrides_is_the_plain_optimizer():
  assert optimizers.per_table(optimizers.SGD(), {}) == optimizers.SGD()
  assert optimizers.per_table(optimizers.SGD(), None) == optimizers.SGD()


@pytest.mark.parametrize("overrides,match", [
    ({"zz": optimizers.SGD()}, r"names unknown tables \['zz'\] \(tables: a, b, c\)"),
    ({"a": optimizers.Adagrad}, r"\['a'\] must be a sparse optimizer.*write @Adagrad\(\) "
                                r"with parentheses"),
    ({"a": "adagrad"}, r"\['a'\] must be a sparse optimizer"),
    ({1: optimizers.SGD()}, r"key 1 is not a table name"),
    ([("a", optimizers.SGD())], r"must be a dict"),
])
def test_bad_overrides_are_named(overrides, match):
  with pytest.raises(ConfigError, match=match):
    _collection(optimizers.per_table(optimizers.SGD(), overrides))


def test_pallas_fuses_the_update_of_each_stack_its_optimizer_allows(caplog):
  """The fused update kernel takes SGD and row-wise Adagrad (stacks b, a) but not Adam
  (stack c, updated on XLA after the kernel's pooling): 2 + 2 + 1 kernel calls."""
  from tests.embedding import test_collection_kernels as kernels_test  # pylint: disable=import-outside-toplevel
  coll = kernels_test.make_collection("twrw", "data=2,table=2,row=2", MIXED_OPT,
                                      kernel="pallas", interpret=True)
  assert [l.name for l in coll.layouts if type(l.optimizer).__name__ == "Adam"] == [
      "twrw_d8_float32_L4_o2"]
  assert "stacks ['twrw_d8_float32_L4_o2'] update on XLA" in caplog.text
  out = kernels_test.run(coll)
  assert out["jaxpr"].count("pallas_call") == 5
  kernels_test.assert_matches_reference(out, MIXED_OPT, atol_pooled=1e-6, atol_tables=1e-6)


# Tables that differ only in `lr` (`optimizers.family`): `a` and `c` (bags of 3 and 2) share
# the L4 stack, each row stepped at its own table's rate, `b` (L1) is alone at the default's;
# `c`'s rate is scheduled (0.3, 0.2, 0.1: a step taking another table's or step's rate
# differs from the reference) where the optimizer allows one (not FTRL: constant rates).
def _rates(cls, default, a, c, **hparams):
  return optimizers.per_table(cls(default, **hparams), {"a": cls(a, **hparams),
                                                        "c": cls(c, **hparams)})


ADAM_LINEAR = lr_schedule("linear", init_value=0.03, end_value=0.0, transition_steps=3)
RATES = {
    "SGD": _rates(optimizers.SGD, 0.1, 0.05, LINEAR),
    "Adagrad": _rates(optimizers.Adagrad, 0.1, 0.05, LINEAR, initial_accumulator=0.1),
    "RowWiseAdagrad": _rates(optimizers.RowWiseAdagrad, 0.1, 0.05, LINEAR,
                             initial_accumulator=0.1),
    "Adam": _rates(optimizers.Adam, 0.01, 0.003, ADAM_LINEAR),
    "FTRL": _rates(optimizers.FTRL, 0.1, 0.3, 0.03, l1=0.01, l2=0.01),
}
RATE_CASES = [(name, {}) for name in RATES] + [("SGD", {"dedup": True})]


def _assert_matches_reference(out, ref):
  for a, b in zip(out[0], ref[0]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for name in ref[1]:
    np.testing.assert_allclose(out[1][name], ref[1][name], rtol=1e-5, atol=1e-6, err_msg=name)
    for k in ref[2][name]:
      np.testing.assert_allclose(np.asarray(out[2][name][k]), ref[2][name][k], rtol=1e-5,
                                 atol=1e-6, err_msg=f"{name}/{k}")


@pytest.mark.parametrize("name,options", RATE_CASES,
                         ids=[n + ("-dedup" if o else "") for n, o in RATE_CASES])
def test_tables_differing_in_lr_share_a_stack_and_match_their_own_rule(name, options):
  """Three steps of each optimizer against the dense reference of each table's own rule
  (SGD: without dedup, each slot's delta at its table's rate, and with it)."""
  opt = RATES[name]
  coll = _collection(opt, **options)
  assert {tuple(s.name for s in l.slots): (l.name, l.rates) for l in coll.layouts} == {
      ("a", "c"): ("dp_d8_float32_L4", (opt.of("a").lr, opt.of("c").lr)),
      ("b",): ("dp_d8_float32_L1", None)}   # one rate: the scalar update
  assert coll.dedup(coll.layouts[1]) == (name != "SGD" or bool(options))
  _assert_matches_reference(run("dp", "single", opt, steps=3, **options),
                            reference(opt, steps=3))


# 8 devices against one: tables on other `table` slices (tw), local rows offset by the
# `row` shard and SGD's slots gathered over replicas (twrw), split columns (grid).
RATE_PLANS = [("tw", "table=8", "SGD"), ("twrw", "data=2,table=2,row=2", "SGD"),
              ("twrw", "data=2,table=2,row=2", "RowWiseAdagrad"),
              ("grid", "table=2,row=2,col=2", "Adam"),
              pytest.param("rw", "data=2,row=4", "FTRL", marks=_SLOW),
              pytest.param("grid", "table=2,row=2,col=2", "Adagrad", marks=_SLOW)]


@pytest.mark.parametrize("kind,mesh_spec,name", RATE_PLANS)
def test_tables_differing_in_lr_sharded_match_single_device(kind, mesh_spec, name):
  opt = RATES[name]
  assert any(l.rates for l in _collection(opt, kind, mesh_spec).layouts)
  assert_runs_match(run(kind, mesh_spec, opt, steps=3), run("dp", "single", opt, steps=3))


def test_26_tables_of_26_rates_are_one_stack_of_26_families_26():
  tables = [TableSpec(f"t{i}", 100 + i, 16) for i in range(26)]
  features = [FeatureSpec(f"f{i}", f"t{i}") for i in range(26)]
  plan = uniform_plan("dp", tables, 1)
  rates = [0.1 + 0.01 * i for i in range(26)]
  lrs = optimizers.per_table(optimizers.RowWiseAdagrad(rates[0]), {
      f"t{i}": optimizers.RowWiseAdagrad(rates[i]) for i in range(1, 26)})
  (stack,) = build_layouts(tables, features, plan, {"data": 1}, lrs)
  assert stack.name == "dp_d16_float32_L1" and len(stack.slots) == 26
  assert stack.optimizer == optimizers.RowWiseAdagrad(rates[0]) and stack.rates == tuple(rates)
  assert len(lrs.distinct) == 26 and lrs.families == (optimizers.RowWiseAdagrad(rates[0]),)
  eps = optimizers.per_table(optimizers.RowWiseAdagrad(), {   # another hyperparameter
      f"t{i}": optimizers.RowWiseAdagrad(eps=1e-8 * (1 + i)) for i in range(1, 26)})
  layouts = build_layouts(tables, features, plan, {"data": 1}, eps)
  assert [l.name for l in layouts] == ["dp_d16_float32_L1"] + [
      f"dp_d16_float32_L1_o{g}" for g in range(1, 26)]
  assert all(l.rates is None for l in layouts)
  one = build_layouts(tables, features, plan, {"data": 1}, optimizers.RowWiseAdagrad(0.1))
  assert one[0].rates is None   # one optimizer: the scalar update, as before


def test_families_and_groups():
  """A family is the class and every hyperparameter but `lr`: group 0 is the default's."""
  opt = optimizers.per_table(optimizers.SGD(0.1), {
      "a": optimizers.SGD(0.5), "b": optimizers.Adagrad(0.1), "c": optimizers.Adagrad(0.2),
      "d": optimizers.Adagrad(0.1, eps=1e-6), "e": optimizers.SGD(LINEAR)})
  assert [opt.group(t) for t in "abcdez"] == [0, 1, 1, 2, 0, 0]
  assert opt.families == (optimizers.SGD(0.1), optimizers.Adagrad(0.1),
                          optimizers.Adagrad(0.1, eps=1e-6))
  assert optimizers.family(optimizers.Adam(0.1)) == optimizers.family(optimizers.Adam(LINEAR))
  assert optimizers.family(optimizers.Adam(b1=0.5)) != optimizers.family(optimizers.Adam())
  assert optimizers.family("adam") == "adam"   # the planner's names: their own family
  assert optimizers.slot_rates(opt, ["a", "z"]) == (0.5, 0.1)
  assert optimizers.slot_rates(opt, ["b", "b"]) is None
  with pytest.raises(ConfigError, match="FTRL.lr must be a number"):   # still refused
    optimizers.FTRL(LINEAR)


def test_pallas_fuses_the_update_of_a_stack_of_several_rates(caplog):
  """The fused update kernel takes each row's rate (`lr_rows`), a scheduled one too: no
  stack falls back to XLA; 2 kernel calls (pooling, update). On table=2 the buckets merge:
  all three tables, three rates, in one stack."""
  from tests.embedding import test_collection_kernels as kernels_test  # pylint: disable=import-outside-toplevel
  opt = RATES["RowWiseAdagrad"]
  coll = kernels_test.make_collection("twrw", "data=2,table=2,row=2", opt, kernel="pallas",
                                      interpret=True)
  assert [l.rates for l in coll.layouts] == [(0.05, 0.1, LINEAR)]
  assert "update on XLA" not in caplog.text
  out = kernels_test.run(coll)
  assert out["jaxpr"].count("pallas_call") == 2
  kernels_test.assert_matches_reference(out, opt, atol_pooled=1e-6, atol_tables=1e-6)


@pytest.mark.parametrize("num_tables", [5, 70])   # compared with every start; searched
def test_row_rates_find_each_rows_table(num_tables):
  """`local_ops.row_rates` of every row of a one-device stack (and past its end) at steps 0
  and 2: the rate of the table holding it (tables of 3 + i rows, scheduled every 4th)."""
  tables = [TableSpec(f"t{i}", 3 + i, 8) for i in range(num_tables)]
  features = [FeatureSpec(f"f{i}", f"t{i}") for i in range(num_tables)]
  lrs = {f"t{i}": optimizers.SGD(LINEAR if i % 4 == 3 else 0.01 * (i + 1))
         for i in range(num_tables)}
  opt = optimizers.per_table(optimizers.SGD(0.5), lrs)
  (l,) = build_layouts(tables, features, uniform_plan("dp", tables, 1), {"data": 1}, opt)
  owner = np.repeat(np.arange(num_tables), [3 + i for i in range(num_tables)])
  rows = np.arange(l.local_rows + 2, dtype=np.int32)   # the last table's for rows past it
  owner = np.concatenate([owner, [num_tables - 1] * (len(rows) - len(owner))])
  for step in (0, 2):
    want = [float(np.asarray(rate_at(lrs[f"t{t}"].lr, step))) for t in owner]
    np.testing.assert_allclose(local_ops.row_rates(l, jnp.asarray(rows), jnp.int32(step)),
                               want, rtol=1e-6)


@pytest.mark.parametrize("l1,l2", [(0.0, 0.0), (0.01, 0.01)])
def test_ftrl_starts_each_row_from_its_value(l1, l2):
  """FTRL's z started at 0 (as TensorFlow's does): a row's first update set it to 0 plus
  one gradient step, wiping its initial values, or a table imported from TorchRec (mean |w|
  0.011 → 0.000 after one step at lr 0.01). Now a zero gradient keeps the row, a small one
  moves it a little, and the second update goes on from the first's state."""
  opt = optimizers.FTRL(0.01, l1=l1, l2=l2)
  rng = np.random.default_rng(0)
  rows = jnp.asarray(rng.normal(0, 0.05, (6, 4)), jnp.float32)
  state = {k: jnp.full(rows.shape, init, jnp.float32)
           for k, (_, init) in opt.state_layout().items()}
  kept, after = opt.update(rows, jnp.zeros_like(rows), state, jnp.int32(0), None)
  np.testing.assert_allclose(kept, rows, rtol=1e-5, atol=1e-7)
  grads = jnp.asarray(rng.normal(0, 1e-3, rows.shape), jnp.float32)
  moved, after = opt.update(rows, grads, state, jnp.int32(0), None)
  assert 0 < float(jnp.abs(moved - rows).max()) < 1e-3
  # the second update is not a first one: its state is the first's
  again, _ = opt.update(moved, jnp.zeros_like(rows), after, jnp.int32(1), None)
  np.testing.assert_allclose(again, moved, rtol=1e-5, atol=1e-7)


def test_one_key_per_table_among_many_tables():
  """10,000 tables each named by its own key (keys were looked up in a list, and
  `check_tables` built a set of the tables per key: 5 s of start-up at 10,000): each table
  gets its own entry, a pattern key still expands beside them, and an unknown key is still
  named."""
  opts = optimizers
  tables = [f"t{i}" for i in range(10_000)] + ["big0", "big1"]
  overrides = {t: opts.SGD(lr=0.1 + (i % 3) * 0.01) for i, t in enumerate(tables[:10_000])}
  overrides["big*"] = opts.Adam(lr=0.01)
  opt = opts.per_table(opts.SGD(lr=1.0), overrides, tables=tables)
  assert opt.of("t5") == opts.SGD(lr=0.1 + 2 * 0.01) and opt.of("big1") == opts.Adam(lr=0.01)
  opts.check_tables(opt, tables)
  with pytest.raises(ConfigError, match=r"names unknown tables \['big1'\]"):
    opts.check_tables(opt, tables[:-1])
