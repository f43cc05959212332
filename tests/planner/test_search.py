"""Plan search: sensible choices, budgets respected, balance, clear errors."""

import dataclasses
import json

import pytest

from jaxrec.embedding import optimizers
from jaxrec.embedding.specs import FeatureSpec, TableSpec, uniform_tables
from jaxrec.errors import ConfigError
from jaxrec.planner import check_plan_fits, estimate_plan, propose_plan
from jaxrec.planner.cost_model import TableStats
from jaxrec.sharding.plan import KIND_AXES, Plan, TablePlacement, uniform_plan

GiB = 2**30
MESH = {"data": 2, "table": 2, "row": 2, "col": 1}


def specs(*tables):
  """(name, rows, dim[, max_len]) -> tables, features (one feature per table)."""
  ts = [TableSpec(t[0], t[1], t[2]) for t in tables]
  fs = [FeatureSpec(f"f_{t[0]}", t[0], t[3] if len(t) > 3 else 1) for t in tables]
  return ts, fs


def test_tiny_tables_are_replicated():
  tables, features = uniform_tables(26, 1000, 16)
  res = propose_plan(tables, features, MESH, 16 * GiB, 0.0, 512)
  assert {p.kind for p in res.plan.placements.values()} == {"dp"}
  assert all("replicated" in t.reason for t in res.tables)
  assert res.step_time_s > 0


def test_huge_table_is_sharded_and_all_fit():
  tables, features = specs(("huge", 40_000_000, 128), ("small", 1000, 16))
  budget = 16 * GiB  # huge is 19 GiB: it cannot be replicated
  res = propose_plan(tables, features, {"data": 2, "table": 2, "row": 2, "col": 2}, budget,
                     "adagrad", 1024)
  assert set(KIND_AXES[res.plan["huge"].kind]) & {"row", "col"}
  # The small table adds no collectives: replicated, or riding along huge's axes group.
  assert res.plan["small"].kind in ("dp", res.plan["huge"].kind)
  assert all(s.memory_bytes <= budget for s in res.slices)
  per_device = check_plan_fits(res.plan, tables, res.mesh_shape, budget, "adagrad",
                               features=features, batch_size=1024)
  assert len(per_device) == 16 and max(per_device) <= budget
  huge = next(t for t in res.tables if t.name == "huge")
  assert "replicated would need" in huge.reason


def test_table_wise_balances_features_per_slice():
  # dp does not fit (8 x 0.3 budget); tw does. Every device of a stack pays for its widest
  # slice, so each stack (bag-size bucket) spreads its features: 2 per slice for the
  # one-hot stack, 1 per slice for the others.
  rows = int(0.3 * GiB / (64 * 4))
  tables, features = specs(*[(f"t{i}", rows, 64, l) for i, l in
                             enumerate([1, 1, 2, 2, 4, 4, 8, 8])])
  res = propose_plan(tables, features, {"table": 4}, GiB, 0.0, 4096)
  assert {p.kind for p in res.plan.placements.values()} == {"tw"}
  per_slice = [sum(1 for p in res.plan.placements.values() if p.table_slice == s)
               for s in range(4)]
  assert per_slice == [2, 2, 2, 2]
  assert {st.name: st.width for st in res.stacks} == {
      "tw_d64_float32_L1": 1, "tw_d64_float32_L4": 1, "tw_d64_float32_L16": 1}
  assert len({s.time_s for s in res.slices}) == 1  # padded: every slice alike
  assert all(s.memory_bytes <= GiB for s in res.slices)
  # The big bags (8) go to different slices.
  assert res.plan["t6"].table_slice != res.plan["t7"].table_slice


def test_multi_hot_tables_spread_so_their_stacks_merge():
  """Bags of 4, 8 and 20 on three different slices: the collection merges their stacks into
  one of W = 1, L = 20 (20 slots per example on every device, not 4 + 8 + 20)."""
  tables, features = specs(*[(f"o{i}", r, 16) for i, r in enumerate((1000, 900, 800, 700))],
                           ("m4", 50, 16, 4), ("m8", 40, 16, 8), ("m20", 30, 16, 20))
  mesh = {"table": 4}
  res = propose_plan(tables, features, mesh, GiB, 0.0, 256, kinds=["tw"])
  assert len({res.plan[t].table_slice for t in ("m4", "m8", "m20")}) == 3
  assert {st.name: (st.width, st.bag) for st in res.stacks} == {
      "tw_d16_float32_L1": (1, 1), "tw_d16_float32_L32": (1, 20)}


def test_crowded_slices_cost_every_device():
  """Stacks pad every slice to the widest: 8 one-hot tables on one slice make every device
  look up 8 features, and cost 8x the pooling of the spread plan (which the search finds)."""
  tables, features = specs(*[(f"t{i}", 100_000, 16) for i in range(8)])
  mesh = {"table": 8}
  crowded = Plan({t.name: TablePlacement("tw", 0) for t in tables})
  spread = Plan({t.name: TablePlacement("tw", i) for i, t in enumerate(tables)})
  a = estimate_plan(crowded, tables, features, mesh, GiB, 0.0, 1024)
  b = estimate_plan(spread, tables, features, mesh, GiB, 0.0, 1024)
  assert a.stacks[0].width == 8 and b.stacks[0].width == 1
  assert a.critical_terms["pool_bytes"] == 8 * b.critical_terms["pool_bytes"]
  assert a.slices[5].memory_bytes == a.slices[0].memory_bytes  # slice 5 holds nothing
  assert a.step_time_s > b.step_time_s
  res = propose_plan(tables, features, mesh, GiB, 0.0, 1024, kinds=["tw"])
  assert res.step_time_s == pytest.approx(b.step_time_s)


def test_exclude_explores_other_kinds():
  tables, features = uniform_tables(6, [10**6, 10**5, 10**4, 1000, 100, 10], 32)
  best = propose_plan(tables, features, MESH, GiB, 0.0, 1024)
  other = propose_plan(tables, features, MESH, GiB, 0.0, 1024, exclude=[best.plan])
  kinds = lambda r: [r.plan[t.name].kind for t in tables]
  assert kinds(other) != kinds(best) and other.step_time_s >= best.step_time_s


def test_large_divisible_dim_uses_columns():
  tables, features = specs(("wide", 2_000_000, 1024, 4))
  res = propose_plan(tables, features, {"data": 1, "col": 4}, 4 * GiB, 0.0, 1024)
  assert res.plan["wide"].kind == "cw"
  assert "dim 1024 split over col=4" in res.tables[0].reason


def test_report_and_json():
  tables, features = specs(("a", 10_000_000, 64), ("b", 100, 16, 3))
  res = propose_plan(tables, features, MESH, 2 * GiB, optimizers.RowWiseAdagrad(), 256,
                     table_stats={"b": TableStats(pooling_factor=2.0, zipf_alpha=1.1)})
  text = res.report()
  for needle in ("table", "kind", "mem/device", "why", "estimated step time", "0,1,4,5",
                 "stack", "per device", "bag"):
    assert needle in text
  obj = json.loads(res.dumps())
  assert Plan.from_json(obj["plan"]) == res.plan
  assert {t["name"] for t in obj["tables"]} == {"a", "b"}
  assert len(obj["slices"]) == 2 and obj["estimated_step_time_s"] > 0


def test_report_of_many_tables_lists_the_largest_and_counts_the_rest():
  """A run's start-up log listed every table: 3,000 tables were 3,040 lines on every
  start, its warnings lost among them."""
  tables, features = uniform_tables(60, 1000, 16)
  tables = [dataclasses.replace(t, rows=1000 + 100 * i) for i, t in enumerate(tables)]
  res = propose_plan(tables, features, MESH, None, 0.0, 512)
  res = dataclasses.replace(res, notes=tuple(f"n{i}" for i in range(12)))
  text = res.report(max_tables=10)
  listed = [t.name for t in res.tables if f"\n{t.name} " in text]
  assert listed == [f"t{i}" for i in range(50, 60)], listed   # the largest, in plan order
  assert "... and 50 more tables, each using at most " in text
  assert text.count("note: n") == 10 and "note: ... and 2 more notes (in W/plan.json)" in text
  full = res.report()   # without a limit: every table and note
  assert all(f"\n{t.name} " in full for t in res.tables) and full.count("note: n") == 12


def test_default_budget_and_kinds_filter():
  tables, features = uniform_tables(4, 100_000, 16)
  res = propose_plan(tables, features, MESH, None, 0.0, 512, kinds=["tw"])
  assert res.memory_per_device_bytes == 16 * GiB
  assert {p.kind for p in res.plan.placements.values()} == {"tw"}


def test_table_that_fits_nowhere():
  tables, features = specs(("monster", 10**9, 128), ("ok", 10, 16))
  with pytest.raises(ConfigError) as e:
    propose_plan(tables, features, MESH, 16 * GiB, 0.0, 512)
  msg = str(e.value)
  assert "'monster'" in msg and "476.8 GiB" in msg and "16.0 GiB" in msg


def test_tables_together_do_not_fit():
  tables, features = specs(*[(f"t{i}", 5_000_000, 128) for i in range(8)])  # 2.4 GiB each
  with pytest.raises(ConfigError, match="together"):
    propose_plan(tables, features, {"table": 2, "row": 2}, 3 * GiB, 0.0, 512)


def test_forced_plan_that_does_not_fit():
  tables, features = specs(("big", 20_000_000, 128), ("small", 10, 16))  # 9.5 GiB
  plan = uniform_plan("dp", tables, 2)
  with pytest.raises(ConfigError) as e:
    check_plan_fits(plan, tables, MESH, 8 * GiB)
  msg = str(e.value)
  assert "'big'" in msg and "9.5 GiB" in msg and "budget 8.0 GiB" in msg
  assert len(check_plan_fits(uniform_plan("twrw", tables, 2), tables, MESH, 8 * GiB)) == 8


def test_forced_plan_mesh_mismatch():
  tables, features = specs(("t", 100, 16))
  # a dim col does not divide is priced padded, not refused (test_cost_model)
  (t,) = estimate_plan(uniform_plan("cw", tables, 1), tables, features, {"col": 3}, GiB,
                       0.0, 96).tables
  assert (t.dim, t.shard_cols) == (16, 6)
  with pytest.raises(ConfigError, match="outside mesh axis table=2"):
    estimate_plan(Plan({"t": TablePlacement("tw", 5)}), tables, features, {"table": 2}, GiB)
  with pytest.raises(ConfigError, match="no placement for table"):
    estimate_plan(Plan({}), tables, features, {"table": 2}, GiB)
  with pytest.raises(ConfigError, match="multiple of the 8 devices"):
    propose_plan(tables, features, MESH, GiB, 0.0, 500)


def test_forced_estimate_matches_auto_when_same_plan():
  tables, features = uniform_tables(6, [10**6, 10**5, 10**4, 1000, 100, 10], 32)
  auto = propose_plan(tables, features, MESH, GiB, 0.0, 1024)
  forced = estimate_plan(auto.plan, tables, features, MESH, GiB, 0.0, 1024)
  assert forced.step_time_s == pytest.approx(auto.step_time_s)
  assert [s.memory_bytes for s in forced.slices] == [s.memory_bytes for s in auto.slices]
  assert forced.mode == "forced"


def test_search_matches_brute_force_on_a_small_case():
  tables, features = specs(("a", 3_000_000, 32, 2), ("b", 800_000, 32, 4), ("c", 20_000, 32, 1))
  mesh, budget, batch = {"data": 1, "table": 2, "row": 2, "col": 1}, 512 * 2**20, 8192
  options = [TablePlacement("dp"), TablePlacement("rw")] + [
      TablePlacement(k, s) for k in ("tw", "twrw") for s in (0, 1)]
  best = float("inf")
  for pa in options:
    for pb in options:
      for pc in options:
        p = Plan({"a": pa, "b": pb, "c": pc})
        try:
          best = min(best, estimate_plan(p, tables, features, mesh, budget, 0.0, batch)
                     .step_time_s)
        except ConfigError:  # over budget
          pass
  res = propose_plan(tables, features, mesh, budget, 0.0, batch)
  assert res.step_time_s <= best * (1 + 1e-9)


def test_unread_table_shares_a_stack_or_is_a_clear_error():
  """A table no feature reads joins the shortest bag bucket of a read table of its kind,
  dim and dtype ('b' unread, 'a' multi-hot: one stack on every kind, not only on those
  that merge buckets); with no such read table it is a clear error."""
  from jaxrec.embedding import layout
  tables = [TableSpec("a", 10, 8), TableSpec("b", 2_000_000, 8)]
  features = [FeatureSpec("fa", "a", 4)]
  for mesh in ({"table": 2, "row": 2}, {"row": 4}):
    res = propose_plan(tables, features, mesh, 40 * 2**20, 0.0, 64)
    assert all(l.features for l in layout.build_layouts(tables, features, res.plan, mesh))
  for kind in ("dp", "rw", "cw", "twrw"):
    layouts = layout.build_layouts(tables, features, uniform_plan(kind, tables, 2),
                                   {"table": 2, "row": 2, "col": 2})
    assert [[s.name for s in l.slots] for l in layouts] == [["a", "b"]], kind
  wide = tables + [TableSpec("c", 100, 16)]   # no read table of dim 16
  with pytest.raises(ConfigError, match=r"tables \['c'\] \(rw, dim 16, float32\) are read "
                     "by no feature"):
    estimate_plan(uniform_plan("rw", wide, 2), wide, features, {"table": 2, "row": 2}, GiB,
                  0.0, 64)

def test_a_plan_that_misses_several_tables_names_them_all():
  """A plan file of another config named only the first table it missed."""
  from jaxrec.embedding.layout import build_layouts  # pylint: disable=import-outside-toplevel
  tables, features = uniform_tables(12, [100] * 12, 16)
  part = Plan({"t0": TablePlacement("dp"), "t1": TablePlacement("dp")})
  for fn in (lambda p: estimate_plan(p, tables, features, {"table": 2}, GiB),
             lambda p: build_layouts(tables, features, p, {"table": 2})):
    with pytest.raises(ConfigError) as e:
      fn(Plan({**part.placements, "t3": TablePlacement("dp")}))
    want = "plan has no placement for 9 tables: ['t2', 't4', 't5', 't6', 't7', 't8', 't9', "
    assert str(e.value) == want + "'t10', +1 more]", str(e.value)
    with pytest.raises(ConfigError, match=r"^plan has no placement for 10 tables: \['t2', "):
      fn(part)
  few = Plan({n: TablePlacement("dp") for n in ["t0", "x"] + [f"t{i}" for i in range(3, 12)]})
  with pytest.raises(ConfigError) as e:
    estimate_plan(few, tables, features, {"table": 2}, GiB)
  assert str(e.value) == ("plan names unknown tables ['x'] (tables: ['t0', 't1', 't2', 't3', "
                          "'t4', 't5', 't6', 't7', +4 more]); it has no placement for 2 "
                          "tables: ['t1', 't2']"), str(e.value)


def test_over_budget_by_less_than_the_rounding_shows_two_different_sizes():
  """A budget a few bytes short read `needs 4.0 MiB > budget 4.0 MiB` (found with
  `--memory_per_device=4MiB` on dlrm_synthetic): the sizes must differ as printed."""
  tables, features = specs(("a", 60_000, 16), ("b", 5_000, 16))
  plan = uniform_plan("dp", tables, 1)
  need = check_plan_fits(plan, tables, MESH, 16 * GiB, features=features, batch_size=512)[0]
  with pytest.raises(ConfigError) as e:
    check_plan_fits(plan, tables, MESH, need - 100, features=features, batch_size=512)
  shown = str(e.value).split("every device needs ", 1)[1].split(" on mesh", 1)[0]
  stated, budget = shown.split(" > budget ")
  assert stated != budget, shown
  assert shown == f"{need:,} B > budget {need - 100:,} B"


def test_no_plan_fits_reports_the_closest_plan_not_the_starting_point():
  """The error gave the memory of the search's start (every table `rw`: 6.9 MiB/device on
  dlrm_synthetic's tables over table=4,row=2) as what 'every device needs', though a
  budget of 4.5 MiB takes an all-`twrw` plan (4.3 MiB then; 3.9 since SGD's no-dedup
  buffers are counted once)."""
  from jaxrec import launch  # pylint: disable=import-outside-toplevel
  from jaxrec.train.config import ExperimentConfig  # pylint: disable=import-outside-toplevel
  launch.parse_gin(["configs/dlrm_synthetic.gin"], [])
  config = ExperimentConfig()
  tables, features = config.tables, config.features
  mesh = {"table": 4, "row": 2}
  fits = propose_plan(tables, features, mesh, int(4.5 * 2**20), 0.0, 512)
  with pytest.raises(ConfigError, match=r"closest plan the search found\) does not fit: "
                     r"every device needs ([\d.]+) MiB") as e:
    propose_plan(tables, features, mesh, int(3.5 * 2**20), 0.0, 512)
  needed = float(str(e.value).split("every device needs ")[1].split(" MiB")[0])
  # (printed to one decimal; the start it named was 6.9 MiB)
  assert (needed - 0.05) * 2**20 <= sum(fits.memory.values()), (needed, dict(fits.memory))


def test_only_the_largest_tables_move_alone(monkeypatch):
  """Moving each of N tables alone made every search step quadratic (800 tables: ~170 s);
  past `SINGLE_MOVES` the smaller tables move with their stacks, and say so."""
  from jaxrec.planner import search  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(search, "SINGLE_MOVES", 1)
  tables, features = specs(("huge", 40_000_000, 128), ("a", 100, 16), ("b", 200, 16))
  res = propose_plan(tables, features, {"data": 2, "table": 2, "row": 2, "col": 2}, 16 * GiB,
                     "adagrad", 1024)
  reasons = {t.name: t.reason for t in res.tables}
  assert "replicated would need" in reasons["huge"]
  for small in ("a", "b"):
    assert reasons[small].startswith("kind of its stack (of 3 tables the search moves only "
                                      "the 1 largest alone, the others with their stacks); "
                                      "stack "), reasons[small]
  assert set(KIND_AXES[res.plan["huge"].kind]) & {"row", "col"}


def test_a_plan_splitting_only_the_largest_tables_is_found_when_it_alone_fits():
  """`skewed_synthetic` on table=4,row=2 at 80 MiB: every usual start led to plans of 112
  MiB ('does not fit'), while 4 tables `twrw` and the rest `dp` fit at ~74 MiB."""
  MiB = 2**20
  rows = [2000000, 1500000, 1000000, 100000, 50000, 20000, 10000, 5000, 10, 20, 25, 30, 50,
          60, 80, 100, 150, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
  lens = [1, 4, 1, 20, 1, 8, 1, 1, 1, 1, 4, 1, 1, 1, 1, 10] + [1] * 10
  tables, features = uniform_tables(26, rows, 16, max_len=lens)
  mesh = {"data": 1, "table": 4, "row": 2, "col": 1}
  result = propose_plan(tables, features, mesh, 80 * MiB, batch_size=1024)
  assert sum(result.memory.values()) <= 80 * MiB
  check_plan_fits(result.plan, tables, mesh, 80 * MiB, features=features, batch_size=1024)


def test_a_table_only_a_padded_column_split_fits_names_that_plan():
  """The search proposes no column padding: with dim 12 on `col=8` the error said only
  'smallest is dp ...; add devices', where `--plan=cw` (dim padded to 16) fit."""
  tables = [TableSpec("a", 100_000, 12), TableSpec("b", 5, 12)]
  features = [FeatureSpec(f"f_{t.name}", t.name) for t in tables]
  with pytest.raises(ConfigError, match=r"smallest is dp at 4.6 MiB/device; add devices on "
                     r"row/col or memory; or force --plan=cw: this table then takes 781.2 "
                     r"KiB/device, its dim 12 padded to 16 \(the search proposes no padding\)"):
    propose_plan(tables, features, {"col": 8}, 2**20, "sgd", 512)
  plan = uniform_plan("cw", tables, 1)   # which indeed fits
  assert max(check_plan_fits(plan, tables, {"col": 8}, 2**20, "sgd", features=features,
                             batch_size=512)) <= 2**20
  # on row x col with table=1, grid is such a split too (and the smaller one)
  tables = [TableSpec("a", 1_000_000, 6), TableSpec("b", 5, 6)]
  with pytest.raises(ConfigError, match=r"or force --plan=grid: this table then takes 3.8 "
                     r"MiB/device, its dim 6 padded to 8"):
    propose_plan(tables, features, {"row": 2, "col": 4}, 5 * 2**20, "sgd", 512)
  # with optimizer state, its share is said: "smallest is rw at 146.5 MiB" read as the
  # 97.7 MiB table's alone
  with pytest.raises(ConfigError, match=r"smallest is dp at 9.2 MiB/device \(table 4.6 MiB, "
                     r"optimizer state 4.6 MiB\); add devices"):
    propose_plan([TableSpec("a", 100_000, 12)], features[:1], {"data": 1}, 2**20,
                 optimizers.Adagrad(), 512)


def test_each_table_is_priced_with_its_own_optimizer():
  """Per-table optimizers (`optimizers.per_table`): the Adam table's report and the plan's
  memory count its 2x state, the SGD tables none (one optimizer's state for every table
  was a TypeError); its stack is apart (`_o1`), as the collection builds it."""
  ts, fs = specs(("big", 4000, 16), ("adam", 3000, 16), ("small", 100, 16))
  opt = optimizers.per_table(optimizers.SGD(), {"adam": optimizers.Adam()})
  res = propose_plan(ts, fs, MESH, GiB, opt, 64)
  for t in res.tables:
    assert t.memory == {"table": t.shard_rows * t.shard_cols * 4,
                        "optimizer": 2 * t.shard_rows * t.shard_cols * 4 if t.name == "adam"
                        else 0}, t.name
  (adam,) = [s for s in res.stacks if "adam" in s.tables]
  assert adam.name.endswith("_o1") and adam.tables == ("adam",)
  assert res.memory["optimizer"] == adam.memory["optimizer"] == 2 * adam.local_rows * 16 * 4
  assert ("sparse optimizers per table: Adam for adam (stacks ending _o1); SGD for the other "
          "2 table(s)") in res.notes
  forced = estimate_plan(res.plan, ts, fs, MESH, GiB, opt, 64)
  assert forced.memory == res.memory and forced.step_time_s == res.step_time_s


def test_tables_differing_in_lr_share_a_stack_and_the_note_says_so():
  """Tables whose optimizers differ only in `lr` (one family) share stacks, priced once:
  the note counts each family's rates; the Adam family's stack holds both Adam tables."""
  ts, fs = specs(("big", 4000, 16), ("adam", 3000, 16), ("adam2", 3000, 16),
                 ("small", 100, 16))
  opt = optimizers.per_table(optimizers.SGD(), {"adam": optimizers.Adam(),
                                                "adam2": optimizers.Adam(0.5),
                                                "small": optimizers.SGD(0.5)})
  res = propose_plan(ts, fs, MESH, GiB, opt, 64)
  assert sorted(t for s in res.stacks if s.name.endswith("_o1") for t in s.tables) == [
      "adam", "adam2"]
  assert not any(s.name.endswith("_o2") for s in res.stacks)
  assert ("sparse optimizers per table: Adam for adam, adam2 (stacks ending _o1, 2 learning "
          "rates sharing its stacks); SGD for the other 2 table(s), 2 learning rates sharing "
          "its stacks") in res.notes
  # rates only: every table is of the default's family, in its stacks
  rates = optimizers.per_table(optimizers.SGD(), {"small": optimizers.SGD(0.5)})
  assert ("sparse optimizers per table: SGD for all 4 table(s), 2 learning rates sharing its "
          "stacks") in propose_plan(ts, fs, MESH, GiB, rates, 64).notes


def test_per_table_optimizers_naming_no_table_or_an_unknown_optimizer_are_refused():
  ts, fs = specs(("a", 100, 16), ("b", 100, 16))
  with pytest.raises(ConfigError, match=r"^ExperimentConfig.table_optimizers names unknown "
                     r"tables \['nope'\] \(tables: a, b\)"):
    propose_plan(ts, fs, MESH, GiB, optimizers.per_table(
        optimizers.SGD(), {"nope": optimizers.Adam()}), 64)
  with pytest.raises(ConfigError, match=r"^table 'b': its sparse optimizer: unknown "
                     r"optimizer 'lion'"):
    propose_plan(ts, fs, MESH, GiB, optimizers.TableOptimizers("sgd", (("b", "lion"),)), 64)


def test_tiny_tables_may_be_row_split_so_auto_beats_a_forced_kind():
  """Tables with fewer rows than the `row` axis could take no row split in the search:
  kept apart in stacks of their own, the auto plan cost more than forced `twrw` (a
  walkthrough: 188 vs 157 us on table=16,row=16). Empty shards train, as forced plans do."""
  tables = [TableSpec(f"t{i}", r, 16) for i, r in
            enumerate([100_000, 50_000, 20_000, 10_000, 5_000, 2_000, 3, 2])]
  features = [FeatureSpec(f"f{i}", t.name) for i, t in enumerate(tables)]
  mesh = {"table": 2, "row": 4}
  auto = propose_plan(tables, features, mesh, 3 * 2**20, 0.0, 512)
  forced = estimate_plan(uniform_plan("twrw", tables, 2), tables, features, mesh, 3 * 2**20,
                         0.0, 512)
  assert auto.step_time_s <= forced.step_time_s * (1 + 1e-9), (auto.step_time_s,
                                                                forced.step_time_s)
  assert {auto.plan[t].kind for t in ("t6", "t7")} <= {"twrw", "rw"}, auto.plan
