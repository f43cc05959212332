"""Pricing kind assignments stack by stack, each part cached by its content.

The search (`planner.search`) prices thousands of kind assignments, each one table's or one
stack's kind away from the last. Packing every table, rebuilding every stack layout
(`embedding.layout.build_layouts`) and pricing the whole plan (`cost_model.plan_cost`) for
each was linear in the tables: 1,000 tables of mixed dims took ~155 s and ~2 GB. Here an
assignment is priced from parts that depend on few tables, each cached by what it depends
on, so that a move reprices only the stacks it touches:

  pack     per stack, in `pack` order, its tables' `table` slices: from its tables and the
           per-slice loads the stacks before it left (`held`, `spread`), which it passes
           on (a move changes those loads only for the stacks packed after it)
  stacks   per (kind, dim, dtype, optimizer group) group, the stacks `build_layouts`
           makes of its tables alone (the collection builds and merges stacks within such
           a group only; the optimizer group is 0 but for tables of a per-table optimizer
           of another family than the default's, `optimizers.TableOptimizers.group`:
           tables that differ only in `lr` are one group), as the shapes the cost model
           reads (`stack_sums`: numpy sums over the group's tables, not layouts built
           table by table, which at 3,000 tables was most of `--mesh=auto`'s time), each
           stack's own cost (`cost_model.stack_cost`), what it shares
           (`cost_model.stack_share`) and problems (`layout.stack_problems`, of the
           group's layouts built only where a shape may have one)
  combine  what stacks share (`cost_model.combine_costs`), over the few stacks

The parts are put together over the same stacks in the same order as `plan_cost` over
`build_layouts`, so the price is the from-scratch one to the last bit (tests/planner/
test_pricing.py checks it), and the search chooses what it chose when it priced from scratch.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Sequence

import numpy as np

from jaxrec.planner import cost_model as cm
from jaxrec.planner.stack_sums import StackSums
from jaxrec.sharding.plan import KIND_AXES, Plan, TablePlacement

# Tables the entries of each cache may hold together (least recently used dropped first;
# a group's shapes hold a name per table, where its layouts took ~150 bytes a table): a
# step of the search reuses the parts of the plan it moves from, which every price of the
# step uses; older parts are rarely met again.
CACHE_TABLES = 250_000


class _Lru(collections.OrderedDict):
  """A cache of entries of at most `CACHE_TABLES` tables together (and of at least one)."""

  def __init__(self):
    super().__init__()
    self.tables = 0

  def get_or(self, key, make, tables: int):
    """The value of `key`, made by `make()` on a miss (an entry of `tables` tables)."""
    if key in self:
      self.move_to_end(key)
      return self[key][0]
    value = make()
    self[key] = (value, tables)
    self.tables += tables
    while self.tables > CACHE_TABLES and len(self) > 1:
      self.tables -= self.popitem(last=False)[1][1]
    return value


@dataclasses.dataclass(frozen=True)
class Priced:
  """An assignment's stacks and cost, as `build_layouts` and `plan_cost` would give them.

  Attributes:
    shapes: the collection's stacks' `StackShape`s (`stack_shape.of_layout`), in
      `build_layouts` order.
    cost: `plan_cost` of the stacks' layouts.
    problem: `layout.stack_error` of those: why the collection would refuse them, or None.
  """

  shapes: tuple
  cost: cm.PlanCost
  problem: str | None


class Pricer:
  """Prices kind assignments (one kind per table, in `loads` order: `tables` order) for one
  search. `opt`: the sparse optimizer (`cost_model.plan_cost`'s), one per table too."""

  def __init__(self, tables, features, loads: Sequence[cm.TableLoad], mesh, batch_size,
               opt, kernel, dedup):
    from jaxrec.embedding import layout, optimizers  # pylint: disable=import-outside-toplevel
    self.tables, self.features, self.loads = tuple(tables), tuple(features), tuple(loads)
    self.mesh, self.batch_size, self.opt = mesh, batch_size, opt
    self.kernel, self.dedup = kernel, dedup
    self.names = [l.name for l in loads]
    self.bucket = [layout.bag_bucket(l.max_len) for l in loads]
    self.grouping = opt if cm.is_per_table(opt) else None   # what splits stacks
    group = [optimizers.group(self.grouping, n) for n in self.names]
    index = {n: i for i, n in enumerate(self.names)}
    self.reading: list[list[int]] = [[] for _ in loads]   # features of each table
    for j, f in enumerate(self.features):
      self.reading[index[f.table]].append(j)
    # stack keys as numbers: kind code * len(_static) + index of (dim, dtype, group, bucket)
    self._kind_code = {k: i for i, k in enumerate(KIND_AXES)}
    static = [(l.dim, l.dtype, g, b) for l, g, b in zip(loads, group, self.bucket)]
    self._static = list(dict.fromkeys(static))
    index = {k: i for i, k in enumerate(self._static)}
    self._static_code = np.array([index[k] for k in static], np.int64)
    self.sums = StackSums(tables, features, self.reading, mesh)
    self._placements: dict[tuple[str, int], TablePlacement] = {}
    self._packed, self._groups = _Lru(), _Lru()

  def stacks(self, kinds: Sequence[str]) -> dict[tuple, list[int]]:
    """Table indices by the stack `kinds` put them in: (kind, dim, dtype, optimizer group,
    bag bucket), the collection's stacking key (`embedding.layout.build_layouts`, which may
    then merge buckets of a kind split over `table`; costs are always taken on its layouts). In
    order of each stack's first table. (Grouped by numpy: in Python, this loop over the
    tables took more time than the rest of pricing.)"""
    code = np.fromiter(map(self._kind_code.__getitem__, kinds), np.int64, len(kinds))
    code = code * len(self._static) + self._static_code
    order = np.argsort(code, kind="stable")
    starts = np.flatnonzero(np.diff(code[order], prepend=-1))
    groups = np.split(order, starts[1:])
    out = {}
    for g in sorted(groups, key=lambda g: g[0]):   # by first table
      members = g.tolist()
      out[(kinds[members[0]], *self._static[self._static_code[members[0]]])] = members
    return out

  def pack(self, stacks: dict[tuple, list[int]]) -> dict[tuple, tuple[tuple[int, ...], ...]]:
    """Per stack of `stacks`, (its tables, their `table` slices), by the rule of the
    `planner.search` docstring; each stack's slices cached by its tables and the loads the
    stacks packed before it left."""
    nt = self.mesh["table"]
    held = (0,) * nt   # rows over all stacks: ties go to the emptiest slice
    longer: dict[tuple, tuple[int, ...]] = {}   # (kind, dim, dtype, group) -> multi-hot
    out = {}
    # Longest bags first (a stable sort: then in order of each stack's first table): a
    # multi-hot stack's tables go first to slices holding no other multi-hot feature of
    # their (kind, dim, dtype, group), so that the collection can merge those stacks into one
    # whose devices pay the longest bag once (`layout._merge_buckets`).
    for key, members in sorted(stacks.items(), key=lambda kv: -kv[0][4]):
      members = tuple(members)
      if not ("table" in KIND_AXES[key[0]] and nt > 1):
        out[key] = (members, (0,) * len(members))
        continue
      spread = longer.get(key[:4], (0,) * nt) if key[4] > 1 else (0,) * nt
      state = (members, key[4], held, spread)
      slices, held, spread = self._packed.get_or((key, state),
                                                 lambda: self._pack_stack(*state), len(members))
      if key[4] > 1:
        longer[key[:4]] = spread
      out[key] = (members, slices)
    return out

  def _pack_stack(self, members: tuple[int, ...], bag: int, held: tuple[int, ...],
                  spread: tuple[int, ...]):
    """One stack split over `table`: its tables' slices (in `members` order), and `held`
    and `spread` after it. Fewest features first, then fewest rows; multi-hot tables first
    to slices holding no other multi-hot feature of their (kind, dim, dtype, group)."""
    nt, loads = len(held), self.loads
    held, spread = list(held), list(spread)
    feats, rows = [0] * nt, [0] * nt
    total = sum(max(1, loads[i].num_features) for i in members)
    cap = max(math.ceil(total / nt), max(loads[i].num_features for i in members))
    slice_of = {}
    for i in sorted(members, key=lambda i: (-loads[i].num_features, -loads[i].rows,
                                            self.names[i])):
      f = loads[i].num_features
      room = [s for s in range(nt) if feats[s] + f <= cap] or list(range(nt))
      s = min(room, key=lambda s: (spread[s], rows[s], feats[s], held[s], s))
      spread[s] += f if bag > 1 else 0
      feats[s] += f
      rows[s] += loads[i].rows
      held[s] += loads[i].rows
      slice_of[i] = s
    return tuple(slice_of[i] for i in members), tuple(held), tuple(spread)

  def placement(self, kind: str, table_slice: int) -> TablePlacement:
    """A shared `TablePlacement` (frozen; validated once)."""
    p = self._placements.get((kind, table_slice))
    if p is None:
      p = self._placements[(kind, table_slice)] = TablePlacement(kind, table_slice)
    return p

  def plan(self, packed) -> Plan:
    """The `Plan` of `pack`'s output, tables in `loads` order."""
    placements = [None] * len(self.names)
    for key, (members, slices) in packed.items():
      for i, s in zip(members, slices):
        placements[i] = self.placement(key[0], s)
    return Plan(dict(zip(self.names, placements)))

  def price(self, kinds: Sequence[str]) -> tuple[dict, Priced]:
    """`pack`'s output for `kinds`, and its price."""
    from jaxrec.embedding import layout  # pylint: disable=import-outside-toplevel
    packed = self.pack(self.stacks(kinds))
    groups: dict[tuple, list] = {}
    for key, part in packed.items():
      groups.setdefault(key[:4], []).append((key[4], *part))
    shapes, costs, shares, problems = [], [], [], []
    for group in sorted(groups):   # `build_layouts`' order: (kind, dim, dtype, group, bag)
      content = (group, tuple(sorted(groups[group])))
      part = self._groups.get_or(content, lambda: self._price_group(*content),
                                 sum(len(b[1]) for b in content[1]))
      for shape, c, sh, p in part:
        shapes.append(shape)
        costs.append(c)
        shares.append(sh)
        problems.append(p)
    cost = cm.combine_costs(shapes, costs, self.batch_size, shares)
    return packed, Priced(tuple(shapes), cost, layout.first_problem(problems))

  def _price_group(self, group: tuple, buckets: tuple) -> tuple:
    """The stacks of one (kind, dim, dtype, optimizer group) `group` whose bag `buckets`
    hold (bag, tables, their slices): per stack (shape, own cost, `StackShare`, problems),
    in `build_layouts` order. The shapes are summed over the tables (`group_shapes`), not
    built as layouts: that was linear in the group's tables in Python, 28 ms for 1,000.
    Only a group whose shapes may hold a problem (`StackSums.flagged`) is built, for
    `layout.stack_problems`' words."""
    from jaxrec.embedding import layout  # pylint: disable=import-outside-toplevel
    members = [i for _, ms, _ in buckets for i in ms]
    slices = [s for _, _, ss in buckets for s in ss]
    shapes = self.sums.group_shapes(group, members, slices)
    problems = [(None, None, None)] * len(shapes)
    if any(self.sums.flagged(shape) for shape in shapes):
      built = {l.name: l for l in self._build_group(group, dict(zip(members, slices)))}
      problems = [layout.stack_problems(built[shape.name]) for shape in shapes]
    out = []
    for shape, p in zip(shapes, problems):
      own = cm.stack_cost(shape, self.features, self.batch_size, self.opt, self.kernel,
                          self.dedup)
      out.append((shape, own, cm.stack_share(shape, own), p))
    return tuple(out)

  def _build_group(self, group: tuple, slice_of: dict[int, int]) -> tuple:
    """`build_layouts` of one group's tables (`slice_of`: table -> its `table` slice), each
    stack's features as indices into all features."""
    from jaxrec.embedding import layout  # pylint: disable=import-outside-toplevel
    members = sorted(slice_of)
    feats = sorted(j for i in members for j in self.reading[i])
    plan = Plan({self.names[i]: self.placement(group[0], slice_of[i]) for i in members})
    built = layout.build_layouts([self.tables[i] for i in members],
                                 [self.features[j] for j in feats], plan, self.mesh,
                                 self.grouping)
    return tuple(dataclasses.replace(l, features=tuple(feats[j] for j in l.features))
                 for l in built)
