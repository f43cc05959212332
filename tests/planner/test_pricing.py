"""Pricing by cached parts (`planner.pricing`) against pricing from scratch: every price the
search takes must be the one `build_layouts` and `plan_cost` give, or it would choose other
plans than it did."""

import math
import random

import numpy as np
import pytest

from jaxrec.embedding import layout, optimizers, stack_shape
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError
from jaxrec.planner import cost_model as cm
from jaxrec.planner import pricing, propose_plan, search
from jaxrec.sharding.plan import KIND_AXES, Plan, TablePlacement


def mixed_case():
  """41 tables of dims 4/8/16 and bags of 1, 3, 8 and 20 (buckets that merge), two tables
  read twice, and one no feature reads (a plan leaving it alone in its stack is refused)."""
  tables = [TableSpec(f"t{i}", 50 + 37 * i % 400, (4, 8, 16)[i % 3]) for i in range(40)]
  tables.append(TableSpec("unread", 300, 8))
  bags = {5: 3, 11: 8, 17: 20, 23: 3, 29: 8}
  features = [FeatureSpec(f"f{i}", f"t{i}", bags.get(i, 1)) for i in range(40)]
  features += [FeatureSpec("g3", "t3", 4), FeatureSpec("g10", "t10")]
  return tables, features


def reference_pack(space, kinds) -> Plan:
  """The search's packing rule as it ran before `pricing` (`search` module docstring), over
  all tables at once."""
  nt, loads, names = space.mesh["table"], space.loads, space.names
  stacks = {}
  for i, (load, kind) in enumerate(zip(loads, kinds)):   # optimizer group: 0 but per table
    key = (kind, load.dim, load.dtype, optimizers.group(space.opt, load.name),
           layout.bag_bucket(load.max_len))
    stacks.setdefault(key, []).append(i)
  placements, held, longer = {}, [0] * nt, {}
  for (kind, dim, dtype, group, bag), members in sorted(stacks.items(),
                                                        key=lambda kv: -kv[0][4]):
    if not ("table" in KIND_AXES[kind] and nt > 1):
      placements.update((names[i], TablePlacement(kind, 0)) for i in members)
      continue
    spread = (longer.setdefault((kind, dim, dtype, group), [0] * nt) if bag > 1
              else [0] * nt)
    feats, rows = [0] * nt, [0] * nt
    total = sum(max(1, loads[i].num_features) for i in members)
    cap = max(math.ceil(total / nt), max(loads[i].num_features for i in members))
    for i in sorted(members, key=lambda i: (-loads[i].num_features, -loads[i].rows, names[i])):
      f = loads[i].num_features
      room = [s for s in range(nt) if feats[s] + f <= cap] or list(range(nt))
      s = min(room, key=lambda s: (spread[s], rows[s], feats[s], held[s], s))
      spread[s] += f if bag > 1 else 0
      feats[s] += f
      rows[s] += loads[i].rows
      held[s] += loads[i].rows
      placements[names[i]] = TablePlacement(kind, s)
  return Plan({n: placements[n] for n in names})


def walk(space, steps: int, seed: int):
  """Kind assignments along a random walk of the search's moves (one table's kind, or a
  whole stack's), from every table at its first allowed kind but the unread one, at its
  last (alone in its stack: refused)."""
  allowed = [cm.allowed_kinds(l, space.mesh) for l in space.loads]
  kinds = tuple(ks[0] for ks in allowed[:-1]) + (allowed[-1][-1],)
  rng = random.Random(seed)
  everyone = range(len(kinds))
  moves = search._moves   # pylint: disable=protected-access
  for _ in range(steps):
    yield kinds
    kinds = rng.choice(list(moves(space, allowed, kinds, everyone)))


# Per-table optimizers: Adam and row-wise Adagrad on tables of every dim and bag (t7's
# equals the default: it stays in the default's stacks; t20's and t26's Adam differ in lr
# only: they share the Adams' stacks, each row at its table's rate; t9's Adam has another
# b1: a family, stacks of its own, though its state is the other Adams'; t13's SGD another
# lr: in the default's stacks).
MIXED = optimizers.per_table(optimizers.SGD(), {
    "t1": optimizers.Adam(), "t3": optimizers.RowWiseAdagrad(), "t5": optimizers.Adam(),
    "t7": optimizers.SGD(), "t11": optimizers.RowWiseAdagrad(), "t17": optimizers.Adam(),
    "t20": optimizers.Adam(lr=0.5), "t26": optimizers.Adam(lr=0.2),
    "t9": optimizers.Adam(b1=0.5), "t13": optimizers.SGD(0.5)})
CASES = [({"table": 4, "row": 2}, "sgd"), ({"data": 2, "table": 2, "row": 2}, "adagrad"),
         ({"table": 2, "row": 2, "col": 2}, "sgd"), ({"data": 2, "row": 4}, "adam"),
         ({"table": 4, "row": 2}, MIXED), ({"data": 2, "table": 2, "row": 2}, MIXED)]


@pytest.mark.parametrize("cached", [pricing.CACHE_TABLES, 1])
@pytest.mark.parametrize("mesh,opt", CASES)
def test_priced_by_parts_equals_from_scratch_along_moves(mesh, opt, cached, monkeypatch):
  """Each assignment of a walk: the same packing as the search's rule, the same stacks as
  `build_layouts` (with per-table optimizers: split by optimizer family, as the
  collection's, with the rates of the tables of a stack), and
  the same cost as `plan_cost` (to 1e-9, and memory exactly); with caches that keep one
  entry too (parts dropped and made again)."""
  monkeypatch.setattr(pricing, "CACHE_TABLES", cached)
  tables, features = mixed_case()
  prepare = search._prepare   # pylint: disable=protected-access
  space, _ = prepare(tables, features, mesh, None, opt, 512, None, None, None)
  refused, mixed_rates = 0, 0
  for kinds in walk(space, 60, seed=len(mesh)):
    packed, priced = space.pricer.price(kinds)
    plan = space.pricer.plan(packed)
    assert plan == reference_pack(space, kinds)
    layouts = cm.build_layouts(tables, features, plan, space.mesh, space.opt)
    assert priced.shapes == tuple(stack_shape.of_layout(l, features) for l in layouts)
    want = cm.plan_cost(layouts, features, 512, space.opt, space.kernel, space.dedup)
    got = priced.cost
    np.testing.assert_allclose(got.terms, want.terms, rtol=1e-9, atol=0)
    assert got.memory == want.memory
    assert [(s.name, s.tables, s.memory) for s in got.stacks] == [
        (s.name, s.tables, s.memory) for s in want.stacks]
    for g, w in zip(got.stacks, want.stacks):
      np.testing.assert_allclose(g.terms, w.terms, rtol=1e-9, atol=0)
    assert priced.problem == layout.stack_error(layouts)
    refused += priced.problem is not None
    mixed_rates += any(l.rates is not None for l in layouts)
    e, f = space.price(kinds), space.evaluate_plan(plan, kinds)
    assert (e.objective, e.time_s, e.memory, e.problem) == (
        f.objective, f.time_s, f.memory, f.problem)
  assert refused, "the walk starts from a refused plan (the unread table alone)"
  if opt is MIXED:   # stacks of each optimizer family were priced, the collection's names,
    assert {l.name[l.name.rfind("_o"):] for l in layouts if "_o" in l.name} == {
        "_o1", "_o2", "_o3"}
    assert mixed_rates   # and stacks of several rates (in the default's and Adam's family)
  else:
    assert not mixed_rates


# What the search proposed for `mixed_case` when it priced every plan from scratch (before
# `pricing`): (mesh, optimizer, budget) -> (step time, plan as kind + slice per table).
# Re-recorded when stacks of two dims in one axes group became two sets of collectives
# (`cost_model.combine_costs`): the search now keeps each dim to one kind, and two budgets
# were lowered so that the plans split tables rather than replicate them all.
EXPECTED = [
    (({'table': 4, 'row': 2}, 'sgd', 2_500_000), 0.00027473279999999997,
     "dp0 tw2 twrw3 dp0 tw2 twrw3 dp0 tw1 twrw1 dp0 tw2 twrw2 dp0 tw1 twrw1 dp0 tw0 twrw0 "
     "dp0 tw0 twrw0 dp0 tw3 twrw2 dp0 tw0 twrw2 dp0 tw1 twrw1 dp0 tw3 twrw3 dp0 tw3 twrw0 "
     "dp0 tw3 twrw2 dp0 tw2"),
    (({'data': 2, 'table': 2, 'row': 2}, 'adagrad', 2_000_000), 0.00033966196800000003,
     "tw1 twrw0 twrw0 dp0 twrw1 twrw0 tw0 twrw1 twrw0 tw0 twrw1 dp0 tw0 twrw1 twrw0 tw1 "
     "twrw0 tw0 tw1 twrw0 twrw0 tw1 twrw1 twrw1 tw0 twrw0 twrw1 tw0 twrw1 tw1 tw0 twrw0 "
     "twrw1 tw1 twrw1 twrw1 tw1 twrw0 twrw1 tw1 twrw0"),
    (({'table': 2, 'row': 2, 'col': 2}, 'sgd', 2_500_000), 0.00036309235200000003,
     "dp0 cw0 grid1 dp0 cw0 grid1 dp0 cw0 grid1 dp0 cw0 grid0 dp0 cw0 grid1 dp0 cw0 grid0 "
     "dp0 cw0 grid1 dp0 cw0 grid0 dp0 cw0 grid0 dp0 cw0 grid1 dp0 cw0 grid0 dp0 cw0 grid0 "
     "dp0 cw0 grid0 dp0 cw0"),
]


@pytest.mark.parametrize("args,step_time_s,plan", EXPECTED)
def test_search_proposes_the_recorded_plans(args, step_time_s, plan):
  tables, features = mixed_case()
  mesh, opt, budget = args
  res = propose_plan(tables, features, mesh, budget, opt, 512)
  assert res.step_time_s == step_time_s
  assert " ".join(f"{res.plan[t.name].kind}{res.plan[t.name].table_slice}"
                  for t in tables) == plan


def test_search_reports_the_same_closest_plan_over_budget():
  """From every start over budget: the closest plan and its error, as before `pricing`."""
  tables, features = mixed_case()
  with pytest.raises(ConfigError) as e:
    propose_plan(tables, features, {"table": 4, "row": 2}, 1_500_000, "adam", 512)
  assert str(e.value) == (
      "the 41 tables together (the closest plan the search found) does not fit: every device "
      "needs 1.8 MiB > budget 1.4 MiB on mesh data=1,table=4,row=2,col=1 (tables 79.9 KiB, "
      "optimizer 159.8 KiB, buffers 1.6 MiB); largest: 't29' (323 x 16 float32 = 20.2 KiB) "
      "as tw: 60.6 KiB/device; 't17' (279 x 16 float32 = 17.4 KiB) as dp: 52.3 KiB/device; "
      "'t5' (235 x 16 float32 = 14.7 KiB) as tw: 44.1 KiB/device")


# The grid mesh's search from scratch takes ~20 s, per-table optimizers' ~10 s (each
# assignment's price is checked by the walk above): in the slow target.
@pytest.mark.parametrize("args", [EXPECTED[0][0], EXPECTED[1][0],
                                  pytest.param(({"table": 4, "row": 2}, MIXED, 2_500_000),
                                               marks=pytest.mark.slow),
                                  pytest.param(EXPECTED[2][0], marks=pytest.mark.slow)])
def test_search_by_parts_proposes_what_pricing_from_scratch_does(args, monkeypatch):
  """The whole search with every plan priced by `build_layouts` + `plan_cost` (as before
  `pricing`) against the search by cached parts: the same plan, estimate and report."""
  tables, features = mixed_case()
  mesh, opt, budget = args
  by_parts = propose_plan(tables, features, mesh, budget, opt, 512)
  monkeypatch.setattr(search._Space, "price",
                      lambda self, kinds: self.evaluate_plan(self.pack(kinds), kinds))
  from_scratch = propose_plan(tables, features, mesh, budget, opt, 512)
  assert by_parts.plan == from_scratch.plan
  assert by_parts.step_time_s == from_scratch.step_time_s
  assert by_parts.report() == from_scratch.report()


def random_case(rng: random.Random):
  """12-40 tables of random rows, dims and dtypes, each read by 0-3 features of random bags
  (some weighted; an unread table may have no read table of its kind, dim and dtype: a
  refused plan) and, in one case of two, two tables of 1.2e9 rows (two on one slice of a
  stack: over `MAX_SLICE_ROWS`, refused)."""
  n = rng.randint(12, 40)
  tables = [TableSpec(f"t{i}", rng.randint(1, 3000), rng.choice((4, 8, 16)),
                      rng.choice(("float32", "float32", "bfloat16"))) for i in range(n)]
  if rng.random() < 0.5:
    tables += [TableSpec(f"huge{i}", 1_200_000_000, 4) for i in range(2)]
  features = []
  for t in tables:
    for j in range(rng.choice((0, 1, 1, 1, 1, 1, 1, 1, 2, 3))):
      features.append(FeatureSpec(f"{t.name}_f{j}", t.name, rng.choice((1, 1, 1, 2, 4, 5, 20)),
                                  weighted=rng.random() < 0.2))
  if not features:
    features.append(FeatureSpec("only", tables[0].name))
  return tables, features


RANDOM_MESHES = [{"table": 4, "row": 2}, {"data": 2, "table": 2, "row": 2},
                 {"table": 2, "row": 2, "col": 2}, {"table": 8}, {"data": 2, "row": 4}]


@pytest.mark.parametrize("seed", range(8))
def test_summed_stacks_equal_built_layouts_on_random_configs(seed):
  """Random configs, meshes and optimizers, along random walks of the search's moves: each
  assignment's stack shapes (`stack_sums`, summed over the tables) are those of
  `build_layouts`, its cost is `plan_cost`'s bit for bit (the same arithmetic over the same
  numbers) and its problem `stack_error`'s; priced twice (the second from the caches), the
  same."""
  rng = random.Random(seed)
  tables, features = random_case(rng)
  mesh, opt = RANDOM_MESHES[seed % len(RANDOM_MESHES)], rng.choice(("sgd", "adagrad", MIXED))
  if opt is MIXED:   # its entries name t1..t26: those of this case
    opt = optimizers.per_table(optimizers.SGD(), {
        n: o for n, o in MIXED.overrides if n in {t.name for t in tables}})
  prepare = search._prepare   # pylint: disable=protected-access
  space, _ = prepare(tables, features, mesh, None, opt, 512, None, None, None)
  allowed = [cm.allowed_kinds(l, space.mesh) for l in space.loads]
  moves = search._moves   # pylint: disable=protected-access
  kinds, seen = tuple(rng.choice(ks) for ks in allowed), []
  for _ in range(40):
    seen.append(kinds)
    kinds = rng.choice(list(moves(space, allowed, kinds, range(len(kinds)))))
  for kinds in seen + seen[::-1]:
    packed, priced = space.pricer.price(kinds)
    plan = space.pricer.plan(packed)
    layouts = cm.build_layouts(tables, features, plan, space.mesh, space.opt)
    assert priced.shapes == tuple(stack_shape.of_layout(l, features) for l in layouts)
    want = cm.plan_cost(layouts, features, 512, space.opt, space.kernel, space.dedup)
    got = priced.cost
    assert got.terms.tolist() == want.terms.tolist()
    assert [(s.name, s.tables, s.memory, s.terms.tolist()) for s in got.stacks] == [
        (s.name, s.tables, s.memory, s.terms.tolist()) for s in want.stacks]
    assert got.memory == want.memory
    assert priced.problem == layout.stack_error(layouts)
  assert len(set(seen)) > 20
