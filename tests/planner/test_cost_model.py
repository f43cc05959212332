"""Stack cost and memory arithmetic, checked against hand-computed numbers and against the
collection the plan builds."""

import jax
import numpy as np
import pytest

from jaxrec.embedding import optimizers
from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError
from jaxrec.planner import cost_model as cm
from jaxrec.sharding import mesh as mesh_lib
from jaxrec.sharding.plan import Plan, TablePlacement, uniform_plan

MESH16 = {"data": 2, "table": 2, "row": 2, "col": 2}


def load(rows=1000, dim=16, max_len=2, stats=None):
  t = TableSpec("t", rows, dim)
  return cm.table_loads([t], [FeatureSpec("f", "t", max_len)], stats)[0]


def cost(tables, features, placements, mesh, batch, opt, kernel="xla"):
  plan = Plan({n: TablePlacement(*p) for n, p in placements.items()})
  layouts = cm.build_layouts(tables, features, plan, cm.normalize_mesh(mesh))
  return cm.plan_cost(layouts, features, batch, cm.optimizer_state(opt), kernel)


def terms(x):
  return dict(zip(cm.COST_TERMS, np.asarray(x).tolist()))


def test_tw_stacks_pad_to_the_widest_slice():
  # mesh data=2, table=4: N=8; B=64, b=8. One-hot a, b, c (a, b on slice 0) and a bag of 4
  # (d, slice 1), SGD: no dedup, n = the group's slots = slots / rep, u = slots.
  tables = [TableSpec(n, r, 16) for n, r in (("a", 100), ("b", 50), ("c", 30), ("d", 10))]
  features = [FeatureSpec("fa", "a"), FeatureSpec("fb", "b"), FeatureSpec("fc", "c"),
              FeatureSpec("fd", "d", 4)]
  pc = cost(tables, features, {"a": ("tw", 0), "b": ("tw", 0), "c": ("tw", 2), "d": ("tw", 1)},
            {"data": 2, "table": 4}, 64, "sgd")
  one, four = pc.stacks
  assert (one.name, one.features, one.width, one.bag) == ("tw_d16_float32_L1", 3, 2, 1)
  assert (four.width, four.bag, one.local_rows, four.local_rows) == (1, 4, 150, 10)
  assert not one.dedup and one.buffer_rows == 64 * 2 * 1 / 2  # slots / rep, slots = B*W*L
  assert one.replicas == 2  # the data axis
  t = terms(one.terms)
  assert t["stacks"] == 1 and t["sort_bytes"] == 0
  assert t["gather_bytes"] == 64 * 16 * 4
  # 2*b*G*W*L*dl*4, pooled as a reshape (no dedup): stream_bytes, not pool_bytes
  assert t["stream_bytes"] == 2 * 8 * 4 * 2 * 1 * 16 * 4 and t["pool_bytes"] == 0
  assert t["update_bytes"] == 2 * 128 * 16 * 4
  assert t["all_reduce_bytes"] == 0   # no dedup: slot gradients all-gathered over data
  # its slots (one id column's worth) ride with their gradients
  assert t["all_gather_bytes"] == (2 - 1) / 2 * 128 * (16 + 1) * 4 and t["collectives"] == 1
  # One axes group (table): one all_to_all forward and one backward for both stacks, of the
  # pooled sums [T*b, W1 + W4, d].
  group = terms(pc.group_terms[("table",)])
  assert group["collectives"] == 2
  assert group["all_to_all_bytes"] == 2 * (4 * 8 * (2 + 1) * 16 * 4) * 3 / 4
  total = terms(pc.terms)
  # + the ids all-gather (over `table` only: without dedup the data replicas' ids come
  # with the slot gradients) + one gradient all-gather over data for both stacks
  assert terms(four.terms)["collectives"] == 0
  assert total["collectives"] == 1 + 2 + 1
  assert total["all_gather_bytes"] == (64 * (3 * 1 + 1 * 4) * 4 * 3 / 8
                                       + (128 + 64 * 4) * 17 * 4 / 2)
  assert total["const"] == 1 and total["stacks"] == 2
  assert one.memory["table"] == 150 * 16 * 4  # every device stores the widest slice
  assert pc.memory["ids"] == 64 * 7 * 4 * 4 / 8


def test_dp_replicates_the_global_batch_update():
  # dp on 8 devices: every device updates the rows of the whole batch; without dedup (SGD)
  # it reads only its own examples' slots and all-gathers their gradients; with dedup
  # (Adagrad) it reads and all-reduces at most rows + 1 (the sentinel).
  tables = [TableSpec("t", 100, 8)]
  features = [FeatureSpec("f", "t", 4)]
  sgd = cost(tables, features, {"t": ("dp",)}, {"data": 8}, 256, "sgd").stacks[0]
  assert (sgd.width, sgd.buffer_rows, sgd.dedup, sgd.replicas) == (1, 32 * 4, False, 8)
  t = terms(sgd.terms)
  assert t["stream_bytes"] == 2 * 32 * 4 * 8 * 4  # only this device's b = 32 examples
  assert t["update_bytes"] == 2 * 1024 * 8 * 4 and t["gather_bytes"] == 128 * 8 * 4
  assert t["all_reduce_bytes"] == 0 and t["all_gather_bytes"] == 7 / 8 * 1024 * (8 + 1) * 4
  pc = cost(tables, features, {"t": ("dp",)}, {"data": 8}, 256, "sgd")
  # no ids all-gather: the slots travel with their gradients (one collective per step)
  assert terms(pc.global_terms)["collectives"] == 0 and pc.memory["ids"] == 32 * 4 * 4
  assert terms(pc.terms)["collectives"] == 1
  ada_pc = cost(tables, features, {"t": ("dp",)}, {"data": 8}, 256, "adagrad")
  ada = ada_pc.stacks[0]
  assert ada.dedup and ada.buffer_rows == 101
  assert terms(ada_pc.global_terms)["collectives"] == 1 and ada_pc.memory["ids"] == 256 * 4 * 4
  t = terms(ada.terms)
  assert t["sort_bytes"] == 1024 * 4
  assert t["pool_bytes"] == 2 * 32 * 4 * 8 * 4 and t["stream_bytes"] == 0  # via the index
  assert t["update_bytes"] == 2 * 101 * 8 * (4 + 4)
  assert t["all_reduce_bytes"] == 2 * 7 / 8 * 101 * 8 * 4
  assert ada.memory["optimizer"] == 100 * 8 * 4


def test_row_and_col_groups():
  tables = [TableSpec("t", 1000, 8)]
  features = [FeatureSpec("f", "t")]
  pc = cost(tables, features, {"t": ("rw",)}, {"row": 4}, 16, "sgd")
  x = 1 * 4 * 1 * 4 * 1 * 8 * 4.0  # T*R*C*b*W*dl*4
  g = terms(pc.group_terms[("row",)])
  assert g["reduce_scatter_bytes"] == x * 3 / 4 and g["all_gather_bytes"] == x * 3 / 4
  assert g["collectives"] == 2 and g["all_to_all_bytes"] == 0
  assert pc.stacks[0].local_rows == 250 and pc.stacks[0].replicas == 1
  pc = cost(tables, features, {"t": ("cw",)}, {"col": 4}, 16, "sgd")
  g = terms(pc.group_terms[("col",)])
  assert g["all_to_all_bytes"] == 2 * (4 * 4 * 1 * 2 * 4) * 3 / 4
  assert pc.stacks[0].local_cols == 2


def test_int8_rows_carry_scale_and_bias():
  tables = [TableSpec("t", 100, 16, "int8")]
  pc = cost(tables, [FeatureSpec("f", "t")], {"t": ("dp",)}, {"data": 2}, 8, "sgd")
  assert pc.stacks[0].dedup  # SGD skips dedup on float32 tables only
  assert pc.stacks[0].memory["table"] == 100 * (16 + 8)


@pytest.mark.parametrize("optimizer", [optimizers.SGD(), optimizers.Adagrad()])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kernel", ["xla", "pallas"])
def test_dedup_rule_matches_the_collection(optimizer, dtype, kernel):
  tables = [TableSpec("t", 100, 16, dtype)]
  features = [FeatureSpec("f", "t")]
  mesh = mesh_lib.make_mesh({"data": 8}, jax.devices()[:8])
  col = EmbeddingCollection.create(tables, features, Plan({"t": TablePlacement("dp")}), mesh,
                                   optimizer, kernel=kernel, interpret=True)
  assert cm.dedups(cm.optimizer_state(optimizer), dtype, kernel) == col.dedup(col.layouts[0])


def test_each_stack_is_priced_with_its_own_tables_optimizer():
  """Per-table optimizers (`optimizers.per_table`): the collection stacks the Adam table
  apart (`_o1`), with its 2x state and dedup, and the SGD tables without state or dedup
  (`linear`); the planner prices those stacks, each as if every table had its optimizer."""
  tables = [TableSpec(n, r, 16) for n, r in (("a", 100), ("b", 200), ("c", 300))]
  features = [FeatureSpec(f"f{t.name}", t.name, 4) for t in tables]
  opt = optimizers.per_table(optimizers.SGD(), {"b": optimizers.Adam()})
  plan = uniform_plan("dp", tables, 1)
  col = EmbeddingCollection.create(tables, features, plan,
                                   mesh_lib.make_mesh({"data": 8}, jax.devices()[:8]), opt)
  layouts = cm.build_layouts(tables, features, plan, {"data": 8}, opt)
  assert layouts == col.layouts
  pc = cm.plan_cost(layouts, features, 64, opt)
  sgd, adam = pc.stacks
  assert (sgd.name, sgd.tables, adam.name, adam.tables) == (
      "dp_d16_float32_L4", ("a", "c"), "dp_d16_float32_L4_o1", ("b",))
  assert [s.dedup for s in pc.stacks] == [col.dedup(l) for l in col.layouts] == [False, True]
  assert sgd.memory["optimizer"] == 0 and adam.memory["optimizer"] == 2 * 200 * 16 * 4
  for got, l, alone in ((sgd, layouts[0], "sgd"), (adam, layouts[1], "adam")):
    want = cm.plan_cost([l], features, 64, alone).stacks[0]
    assert got.memory == want.memory
    np.testing.assert_array_equal(got.terms, want.terms)
  a, b, _ = cm.table_loads(tables, features)
  assert cm.table_memory(a, "dp", {"data": 8}, opt) == {"table": 100 * 64, "optimizer": 0}
  assert cm.table_memory(b, "dp", {"data": 8}, opt) == {"table": 200 * 64,
                                                        "optimizer": 2 * 200 * 64}
  assert cm.state_of(opt, "c") == cm.optimizer_state("sgd")
  with pytest.raises(TypeError, match=r"use state_of\(optimizer, table\)"):
    cm.optimizer_state(opt)


def test_optimizer_state():
  assert cm.optimizer_state("sgd") == cm.OptimizerState(0, 0, linear=True)
  assert cm.optimizer_state(0.0).linear and not cm.optimizer_state(1.0).linear
  assert cm.optimizer_state("Adam") == cm.OptimizerState(2, 0)
  assert cm.optimizer_state(1.5) == cm.OptimizerState(1.5, 0)
  assert cm.optimizer_state(optimizers.RowWiseAdagrad()) == cm.OptimizerState(0, 1)
  assert cm.optimizer_state(optimizers.SGD()) == cm.OptimizerState(0, 0, linear=True)
  with pytest.raises(ConfigError, match="unknown optimizer"):
    cm.optimizer_state("lion")


def test_allowed_kinds_and_table_memory():
  assert cm.allowed_kinds(load(dim=16), {"col": 3}) == ["dp"]
  assert cm.allowed_kinds(load(dim=18), {"col": 3}) == ["dp", "cw"]
  assert set(cm.allowed_kinds(load(), MESH16)) == set(cm.KINDS)
  # grid on table=1 is the only row x column split (it was dropped with the kinds whose
  # size-1 axes make them another kind: budgets only it meets were refused)
  assert cm.allowed_kinds(load(), {"row": 2, "col": 4}) == ["dp", "rw", "cw", "grid"]
  assert cm.allowed_kinds(load(), {"table": 2, "col": 4}) == ["dp", "tw", "cw", "twcw"]
  # fewer rows than the row axis: row splits too (empty shards), as forced plans train them
  assert cm.allowed_kinds(load(rows=3), {"table": 2, "row": 4}) == ["dp", "tw", "rw", "twrw"]
  mem = cm.table_memory(load(rows=1001), "grid", MESH16, cm.optimizer_state("adagrad"))
  assert mem == {"table": 501 * 8 * 4, "optimizer": 501 * 8 * 4}
  # a dim col does not divide is stored padded: 16 over col=3 holds 6 columns a device
  mem = cm.table_memory(load(rows=1000), "cw", {"col": 3}, cm.optimizer_state("adagrad"))
  assert mem == {"table": 1000 * 6 * 4, "optimizer": 1000 * 6 * 4}


def test_a_forced_plan_with_padded_columns_is_priced_padded():
  """`--plan=cw` on col=8 with dim 12: the search never proposes it (`allowed_kinds`), but
  a forced plan is estimated with the 16 stored columns (2 a device), not refused."""
  from jaxrec import planner   # pylint: disable=import-outside-toplevel
  tables, features = [TableSpec("t", 1000, 12)], [FeatureSpec("f", "t", 2)]
  res = planner.estimate_plan(uniform_plan("cw", tables, 1), tables, features, {"col": 8},
                              2**30, optimizers.Adagrad(), 64)
  (t,) = res.tables
  assert (t.dim, t.shard_cols) == (12, 2)
  assert t.memory == {"table": 1000 * 2 * 4, "optimizer": 1000 * 2 * 4}
  assert res.stacks[0].memory["table"] == 1000 * 2 * 4


def test_bad_inputs():
  with pytest.raises(ConfigError, match="unknown axes"):
    cm.normalize_mesh({"model": 2})
  with pytest.raises(ConfigError, match="pooling factor"):
    load(max_len=2, stats={"t": cm.TableStats(pooling_factor=3.0)})
  with pytest.raises(ConfigError, match="unknown tables"):
    load(stats={"nope": cm.TableStats()})


@pytest.mark.parametrize("stats, message", [
    (cm.TableStats(zipf_alpha=-1.0), r"table 't': zipf alpha -1.0 must be a finite number >= 0"),
    (cm.TableStats(zipf_alpha=float("nan")), r"table 't': zipf alpha nan must be"),
    (cm.TableStats(zipf_alpha="1.1"), r"table 't': zipf alpha '1.1' must be"),
    (cm.TableStats(pooling_factor=float("nan")),
     r"table 't': pooling factor nan must be a number in \[0, 2\]"),
    (cm.TableStats(pooling_factor="2"), r"table 't': pooling factor '2' must be"),
    (cm.TableStats(pooling_factor=True), r"table 't': pooling factor True must be"),
    ({"pooling_factor": 1.0}, r"table 't': stats must be a TableStats"),
])
def test_table_stats_are_checked_wherever_they_come_from(stats, message):
  """Only `--tables` checked them: a TableStats built in code (a config, a profile) with a
  negative or NaN zipf alpha, or a NaN or string pooling factor, was planned with."""
  with pytest.raises(ConfigError, match=message):
    load(stats={"t": stats})
  assert load(stats={"t": cm.TableStats(1.5, 0.0)}).pooling_factor == 1.5


@pytest.mark.parametrize("dedup", [True, False, "auto"])
def test_the_planner_prices_the_dedup_gin_binds(dedup):
  """`EmbeddingOptions.dedup = True` (SGD on float32) made the collection dedup while the
  planner priced and reported the stacks without it ('(no dedup)', its buffers and time):
  the plan printed at start-up did not describe what the step ran."""
  import gin   # pylint: disable=import-outside-toplevel
  from jaxrec import planner   # pylint: disable=import-outside-toplevel
  gin.bind_parameter("EmbeddingOptions.dedup", dedup)
  tables, features = [TableSpec("t", 100, 16)], [FeatureSpec("f", "t", 2)]
  plan = Plan({"t": TablePlacement("dp")})
  col = EmbeddingCollection.create(tables, features, plan,
                                   mesh_lib.make_mesh({"data": 8}, jax.devices()[:8]),
                                   optimizers.SGD())
  res = planner.estimate_plan(plan, tables, features, {"data": 8}, 2**30, optimizers.SGD(), 64)
  assert res.stacks[0].dedup == col.dedup(col.layouts[0]) == (dedup is True)
  want = cost(tables, features, {"t": ("dp",)}, {"data": 8}, 64, "sgd").memory_bytes
  assert (sum(res.memory.values()) == want) == (dedup is not True)   # auto: no dedup here


def test_dedup_false_the_collection_refuses_is_refused_by_the_planner():
  import gin   # pylint: disable=import-outside-toplevel
  from jaxrec import planner   # pylint: disable=import-outside-toplevel
  gin.bind_parameter("EmbeddingOptions.dedup", False)
  tables, features = [TableSpec("t", 100, 16)], [FeatureSpec("f", "t")]
  with pytest.raises(ConfigError, match=r"EmbeddingOptions.dedup=False needs SGD, float32 "
                     r"tables and the xla kernel; table 't' has Adagrad, float32, kernel xla "
                     r"\(leave it 'auto'\)$"):
    planner.propose_plan(tables, features, {"data": 8}, 2**30, optimizers.Adagrad(), 64)
  gin.bind_parameter("EmbeddingOptions.kernel", "pallas")   # it said 'kernel xla' here too
  with pytest.raises(ConfigError, match=r"table 't' has SGD, bfloat16, kernel pallas "):
    planner.propose_plan([TableSpec("t", 100, 16, "bfloat16")], features, {"data": 8}, 2**30,
                         optimizers.SGD(), 64)


def test_optimizer_state_factor_must_be_finite_and_non_negative():
  """'1e-3' and '-1' were unknown optimizers ('-' read as '_'), inf an OverflowError later."""
  assert cm.optimizer_state("1e-3").per_element == 0.001
  for spec in ("-1", "inf", "nan", float("inf"), -1.0):
    with pytest.raises(ConfigError, match="finite number >= 0"):
      cm.optimizer_state(spec)


def test_dedup_false_refused_names_the_table_whose_dtype_refuses_it():
  """SGD, float32 tables but one bfloat16: the error said only 'here: SGD, bfloat16, kernel
  xla', not which of the tables (the same for the collection: a stack name, not a table)."""
  import gin   # pylint: disable=import-outside-toplevel
  from jaxrec import planner   # pylint: disable=import-outside-toplevel
  gin.bind_parameter("EmbeddingOptions.dedup", False)
  tables = [TableSpec("t0", 100, 16), TableSpec("small", 50, 16, "bfloat16")]
  features = [FeatureSpec("f0", "t0"), FeatureSpec("f1", "small")]
  with pytest.raises(ConfigError, match=r"^EmbeddingOptions.dedup=False needs SGD, float32 "
                     r"tables and the xla kernel; table 'small' has SGD, bfloat16"):
    planner.propose_plan(tables, features, {"data": 8}, 2**30, optimizers.SGD(), 64)
  mesh = mesh_lib.make_mesh({"data": 8}, jax.devices()[:8])
  with pytest.raises(ConfigError, match=r"stack 'dp_d16_bfloat16_L1' \(tables small\) has SGD"):
    EmbeddingCollection.create(tables, features, uniform_plan("dp", tables, 1), mesh,
                               optimizers.SGD(), dedup=False)


def test_buffers_count_the_unique_rows_optimizer_state():
  """The update reads and writes the unique rows' optimizer state: an Adam plan's compiled
  step held ~8% more than the memory the plan claimed (and so past a budget it 'fit')."""
  tables, features = [TableSpec("t", 1000, 16)], [FeatureSpec("f", "t", 4)]
  by_opt = {opt: cost(tables, features, {"t": ("rw",)}, {"row": 2}, 64, opt).stacks[0]
            for opt in ("adagrad", "adam", "rowwise_adagrad")}
  n, dl = by_opt["adam"].buffer_rows, 16
  assert all(s.dedup and s.buffer_rows == n for s in by_opt.values())
  buffers = {k: s.memory["buffers"] for k, s in by_opt.items()}
  assert buffers["adam"] - buffers["adagrad"] == 8 * n * dl
  assert buffers["adagrad"] - buffers["rowwise_adagrad"] == 8 * n * (dl - 1)


def test_stacks_of_two_dims_in_one_axes_group_are_priced_as_two_sets_of_collectives():
  """`local_ops.pool_all` sends stacks of different dims home separately: the model prices
  one all_to_all pair per dim, each of its own width, as many as the compiled pool has."""
  tables = [TableSpec("a", 37, 4), TableSpec("b", 50, 64), TableSpec("c", 11, 4)]
  features = [FeatureSpec("fa", "a"), FeatureSpec("fb", "b"), FeatureSpec("fc", "c")]
  mesh = {"data": 4, "table": 2}
  pc = cost(tables, features, {"a": ("tw", 0), "b": ("tw", 1), "c": ("tw", 0)}, mesh, 64,
            "sgd")
  group = terms(pc.group_terms[("table",)])
  assert group["collectives"] == 2 * 2
  # [T*b, W, dl] per dim: dim 4 (a, c on slice 0: W = 2), dim 64 (b: W = 1); b = 64/8
  assert group["all_to_all_bytes"] == 2 * (2 * 8 * (2 * 4 + 1 * 64) * 4) * 1 / 2
  coll = EmbeddingCollection.create(tables, features, uniform_plan("tw", tables, 2),
                                    mesh_lib.make_mesh(mesh), optimizers.SGD(0.1))
  state = coll.init(jax.random.key(0))
  ids = {f.name: np.zeros((64, 1), np.int32) for f in features}
  hlo = jax.jit(lambda s, i: coll.pool(coll.lookup(s, i).rows, coll.lookup(s, i))).lower(
      state, ids).compile().as_text()
  assert hlo.count(" all-to-all(") == group["collectives"] / 2   # forward only
