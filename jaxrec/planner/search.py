"""Plan search, TorchRec's planner shape: enumerate -> partition -> estimate -> propose.

  enumerate  per table, the kinds the mesh allows (`cost_model.allowed_kinds`)
  partition  given a kind per table, the tables of each stack split over `table` are dealt
             to slices (`pack`): fewest features first (W: every device of the stack pays
             for the widest slice), then fewest rows (every device stores the widest slice);
             multi-hot stacks first, longest bag first, each table preferring slices with
             no other multi-hot feature (so the collection can merge those stacks)
  estimate   the stacks the collection would build (`embedding.layout.build_layouts`),
             priced by `cost_model.plan_cost` and the calibration coefficients; during the
             search by parts, each cached, so that a move reprices only the stacks it
             touches, and each stack's shape summed over its tables, not built
             (`pricing`, `stack_sums`: the same numbers)
  propose    local search over the kinds, from several starts (every table at one kind,
             for each kind; every table at its smallest placement): the best change of one
             table's kind (of the `SINGLE_MOVES` largest tables), or of a whole stack's,
             while the objective drops

The objective is (bytes over the memory budget, step time, bytes per device): a start that
does not fit walks into the budget first. Step time is the same on every device (stacks
pad to their widest slice), so balance shows up as W and padded rows, not as a busiest
device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

from jaxrec import signals
from jaxrec.embedding.specs import FeatureSpec, TableSpec, validate
from jaxrec.errors import BudgetError, ConfigError
from jaxrec.planner import cost_model as cm
from jaxrec.planner.calibration import DEFAULT, Calibration
from jaxrec.planner.pricing import Pricer
from jaxrec.planner.result import (PlanResult, SliceReport, StackReport, TableReport,
                                   format_bytes, format_over, format_time)
from jaxrec.sharding.plan import KIND_AXES, Plan

DEFAULT_MEMORY_PER_DEVICE = 16 * 2**30  # bytes, when the caller gives no budget
_REL_TOL = 1e-9
_MAX_STEPS = 200  # local-search moves per start (each strictly improves; a safety bound)
EXTRA_SEARCHES = 2   # searches from `_split_largest_starts` when no usual start fits
# Tables the search moves one at a time: the largest (bytes); the others move with their
# stacks. A move is priced by parts (`pricing`), but still re-sums the stacks of the
# (kind, dim, dtype) group it touches (`stack_sums`) and repacks a stack split over
# `table`, linear in that group's tables: moving each of N tables alone keeps a search step
# quadratic (before pricing by parts 800 tables took ~170 s, 2,000 did not finish in 10
# minutes). Changing it changes the plans the search reaches.
SINGLE_MOVES = 64


def default_dedup():
  """`EmbeddingOptions.dedup` as gin binds it (`auto`, True or False): what the collection
  will do, so the planner prices the same stacks (`cost_model.dedups`)."""
  from jaxrec.embedding.specs import EmbeddingOptions  # pylint: disable=import-outside-toplevel
  return EmbeddingOptions().dedup


def default_kernel() -> str:
  """The kernel the collection will use (`EmbeddingOptions.kernel` as gin binds it, `auto`
  resolved for jax's default backend): it decides whether SGD stacks dedup."""
  from jaxrec.embedding.specs import EmbeddingOptions  # pylint: disable=import-outside-toplevel
  kernel = EmbeddingOptions().kernel
  if kernel != "auto":
    return kernel
  from jaxrec.kernels import platform  # pylint: disable=import-outside-toplevel
  return platform.resolve_kernel(kernel)


@dataclasses.dataclass(frozen=True)
class _Eval:
  """A priced kind assignment. The search keeps thousands: `plan` and `cost` only where it
  needs them (`_Space.full`), the rest is a few numbers."""
  kinds: tuple[str, ...]
  time_s: float
  memory: int
  objective: tuple[float, float, float]
  problem: str | None = None  # why the collection would reject the plan
  plan: Plan | None = None
  cost: cm.PlanCost | None = None


class _Space:
  """Everything fixed during one search; evaluates (and caches) kind assignments."""

  def __init__(self, tables, features, loads, mesh, batch_size, opt, kernel, coef, budget,
               dedup="auto"):
    self.tables, self.features, self.loads = tuple(tables), tuple(features), list(loads)
    self.mesh, self.batch_size, self.opt, self.coef = mesh, int(batch_size), opt, coef
    self.budget = budget
    self.kernel, self.dedup = kernel, dedup
    self.names = [l.name for l in self.loads]
    self.pricer = Pricer(tables, features, self.loads, mesh, self.batch_size, opt, kernel,
                         dedup)
    self.cache: dict[tuple[str, ...], _Eval] = {}
    self.excluded: set[tuple[str, ...]] = set()

  def stacks(self, kinds: Sequence[str]) -> dict[tuple, list[int]]:
    """Table indices by stack key (`pricing.Pricer.stacks`)."""
    return self.pricer.stacks(kinds)

  def pack(self, kinds: Sequence[str]) -> Plan:
    """Slices for the tables of kinds split over `table` (see module docstring)."""
    return self.pricer.plan(self.pricer.pack(self.pricer.stacks(kinds)))

  def _eval(self, kinds, priced: cm.PlanCost, problem: str | None, **full) -> _Eval:
    """The objective of `kinds` costing `priced` (`full`: its plan and cost, to keep)."""
    time_s = float(priced.terms @ self.coef)
    mem = priced.memory_bytes
    objective = ((math.inf,) * 3 if problem else
                 (float(max(0, mem - self.budget)), time_s, float(mem)))
    return _Eval(kinds, time_s, mem, objective, problem, **full)

  def evaluate_plan(self, plan: Plan, kinds: tuple[str, ...] | None = None) -> _Eval:
    """`plan` priced from scratch: `build_layouts` and `plan_cost`, as the collection and
    `estimate_plan` see it."""
    layouts = cm.build_layouts(self.tables, self.features, plan, self.mesh, self.opt)
    cost = cm.plan_cost(layouts, self.features, self.batch_size, self.opt, self.kernel,
                        self.dedup)
    kinds = kinds or tuple(plan[n].kind for n in self.names)
    # The collection's own check (the planner imports jax already, through
    # `embedding.optimizers`).
    from jaxrec.embedding import layout  # pylint: disable=import-outside-toplevel
    return self._eval(kinds, cost, layout.stack_error(layouts), plan=plan, cost=cost)

  def price(self, kinds: tuple[str, ...]) -> _Eval:
    """`kinds` packed and priced by parts (`pricing`): the same numbers as `evaluate_plan`
    of the packed plan, without the plan and its cost."""
    _, priced = self.pricer.price(kinds)
    return self._eval(kinds, priced.cost, priced.problem)

  def evaluate(self, kinds: tuple[str, ...]) -> _Eval:
    if kinds not in self.cache:
      e = self.price(kinds)
      if kinds in self.excluded:
        e = dataclasses.replace(e, objective=(math.inf, math.inf, math.inf))
      self.cache[kinds] = e
    return self.cache[kinds]

  def full(self, e: _Eval) -> _Eval:
    """`e` with its plan and cost (priced from scratch), its objective kept."""
    if e.plan is not None:
      return e
    f = self.evaluate_plan(self.pack(e.kinds), e.kinds)
    return dataclasses.replace(f, objective=e.objective)


def _better(a: tuple, b: tuple) -> bool:
  """Lexicographic a < b, each entry up to a relative tolerance."""
  for x, y in zip(a, b):
    if x == y:
      continue
    tol = abs(y) * _REL_TOL + 1e-15 if math.isfinite(y) else 0.0
    if x < y - tol:
      return True
    if x > y + tol:
      return False
  return False


def _moves(space: _Space, allowed: Sequence[Sequence[str]], kinds: tuple[str, ...],
           single: Sequence[int]):
  """Neighbours: one table (of `single`) to another kind; all tables of one stack to
  another kind."""
  for i in single:
    for k in allowed[i]:
      if k != kinds[i]:
        yield kinds[:i] + (k,) + kinds[i + 1:]
  for (kind, *_), members in space.stacks(kinds).items():
    if len(members) < 2:
      continue
    for k in set().union(*(allowed[i] for i in members)) - {kind}:
      new = list(kinds)
      for i in members:
        if k in allowed[i]:
          new[i] = k
      yield tuple(new)


def _split_largest_starts(space: _Space, allowed, smallest: tuple[str, ...], seen: set):
  """More starts when none of the usual ones led within the budget: the `m` largest tables
  (m = 1, 2, 4, ...) at one kind that splits them, the others replicated (`dp`, else their
  smallest kind). Single moves cannot reach such plans from a uniform start, where e.g.
  the largest tables' stacks only merge once several move together (`skewed_synthetic` on
  table=4,row=2 at 80 MiB: 4 tables `twrw` and the rest `dp` fit at 74 MiB; the search said
  the closest plan needed 112)."""
  order = sorted(range(len(space.loads)), key=lambda i: (-space.loads[i].table_bytes,
                                                         space.names[i]))
  for k in dict.fromkeys(k for ks in allowed for k in ks if k != "dp"):
    m = 1
    while m < len(order):
      top = set(order[:m])
      start = tuple(k if i in top and k in allowed[i] else
                    "dp" if "dp" in allowed[i] else smallest[i] for i in range(len(order)))
      if start not in seen:
        seen.add(start)
        yield start
      m *= 2


def _single_movers(space: _Space) -> list[int]:
  """Indices of the tables the search moves one at a time (`SINGLE_MOVES` largest)."""
  order = sorted(range(len(space.loads)), key=lambda i: (-space.loads[i].table_bytes,
                                                         -space.loads[i].num_features,
                                                         space.names[i]))
  return sorted(order[:SINGLE_MOVES])


def _local_search(space: _Space, allowed, start: tuple[str, ...], single: Sequence[int]
                  ) -> _Eval:
  cur = space.evaluate(start)
  for _ in range(_MAX_STEPS):
    signals.check()   # SIGINT / SIGTERM deferred by scripts/plan.py
    best = cur
    for kinds in _moves(space, allowed, cur.kinds, single):
      e = space.evaluate(kinds)
      if _better(e.objective, best.objective):
        best = e
    if best is cur:
      break
    cur = best
  return cur


def _prepare(tables, features, mesh_shape, memory_per_device_bytes, optimizer_state_factor,
             batch_size, calibration, table_stats, kernel):
  validate(tables, features)
  mesh = cm.normalize_mesh(mesh_shape)
  n = math.prod(mesh.values())
  if int(batch_size) < 0 or (batch_size and int(batch_size) % n):
    raise ConfigError(f"global batch {batch_size} must be a multiple of the {n} devices of "
                      f"mesh {cm.mesh_str(mesh)} (batches are split over all devices)")
  if memory_per_device_bytes is None:
    memory_per_device_bytes = DEFAULT_MEMORY_PER_DEVICE
  if not memory_per_device_bytes > 0:
    raise ConfigError(f"memory per device must be positive, got {memory_per_device_bytes}")
  loads = cm.table_loads(tables, features, table_stats)
  # one optimizer: its state; one per table: kept whole, its entries group the stacks
  cm.check_optimizers(optimizer_state_factor, [t.name for t in tables])
  opt = (optimizer_state_factor if cm.is_per_table(optimizer_state_factor)
         else cm.optimizer_state(optimizer_state_factor))
  states = [cm.state_of(opt, t.name) for t in tables]
  configured = kernel if kernel is not None else default_kernel()   # the collection's
  if kernel is None:
    kernel = (configured if any(not cm.dedups(s, t.dtype, "xla")
                                for s, t in zip(states, tables)) else "xla")
  dedup = default_dedup()
  for s, t in zip(states, tables):   # the collection's refusal of dedup=False, before any
    # search, with the kernel the collection will have (the priced one said 'kernel xla'
    # for EmbeddingOptions.kernel='pallas'), naming the table (mixed dtypes: which one?)
    cm.dedups(s, t.dtype, configured, dedup, table=f"table '{t.name}' has")
  cal = calibration or DEFAULT
  return _Space(tables, features, loads, mesh, batch_size, opt, kernel, cal.vector(),
                int(memory_per_device_bytes), dedup), cal


def _own(space: _Space, load: cm.TableLoad, kind: str) -> int:
  return sum(cm.table_memory(load, kind, space.mesh, space.opt).values())


def _describe(load: cm.TableLoad) -> str:
  return (f"'{load.name}' ({load.rows:,} x {load.dim} {load.dtype} = "
          f"{format_bytes(load.table_bytes)})")


def _slice_devices(mesh: Mapping[str, int], s: int) -> tuple[int, ...]:
  n = math.prod(mesh.values())
  inner = mesh["row"] * mesh["col"]
  return tuple(d for d in range(n) if (d // inner) % mesh["table"] == s)


def _padded_hint(space: _Space, load) -> str:
  """For a table that fits nowhere the search looks: the column split with its dim padded
  that would fit (the search never proposes padding, so the error said only 'add
  devices' where `--plan=cw` fit)."""
  c = space.mesh.get("col", 1)
  if c == 1 or load.dim % c == 0:
    return ""
  fits = [(_own(space, load, k), k) for k in KIND_AXES
          if "col" in KIND_AXES[k] and cm.distinct_kind(k, space.mesh)]
  fits = [(m, k) for m, k in fits if m <= space.budget]
  if not fits:
    return ""
  m, k = min(fits)
  return (f"; or force --plan={k}: this table then takes {format_bytes(m)}/device, its dim "
          f"{load.dim} padded to {-(-load.dim // c) * c} (the search proposes no padding)")


def _overflow_error(space: _Space, e: _Eval, what: str) -> BudgetError:
  largest = sorted(((_own(space, l, e.plan[l.name].kind), l)
                    for l in space.loads), key=lambda x: -x[0])[:3]
  parts = "; ".join(f"{_describe(l)} as {e.plan[l.name].kind}: {format_bytes(m)}/device"
                    for m, l in largest)
  mem = e.cost.memory
  return BudgetError(
      f"{what} does not fit: every device needs {format_over(e.memory, space.budget)} on "
      f"mesh {cm.mesh_str(space.mesh)} (tables "
      f"{format_bytes(mem['table'])}, optimizer {format_bytes(mem['optimizer'])}, buffers "
      f"{format_bytes(mem['buffers'] + mem['ids'])}); largest: {parts}")


def _delta(alt: _Eval, base: _Eval, budget: int) -> str:
  if alt.problem:
    return ("not buildable (a stack no feature reads, or a table slice over 2**31 - 1 "
            "rows)")
  if alt.memory > budget:
    return f"over budget ({format_bytes(alt.memory)}/device)"
  if alt.time_s - base.time_s > base.time_s * 1e-6:
    return f"+{format_time(alt.time_s - base.time_s)}/step"
  return f"same step time, +{format_bytes(max(alt.memory - base.memory, 0))}/device"


def _reason(space: _Space, allowed, best: _Eval, i: int, single: bool = True) -> str:
  """Why table `i` has its kind, from its alternatives with the rest of the plan fixed
  (not `single`: a table the search moved only with its stack, whose alternatives are not
  estimated)."""
  kind = best.kinds[i]
  stack = next(s for s in best.cost.stacks if space.names[i] in s.tables)
  where = (f"stack {stack.name}: {stack.width} of its {stack.features} features per device, "
           f"bags of {stack.bag}")
  if len(stack.tables) > 1:
    where += f", shares the collectives of its stack with {len(stack.tables) - 1} table(s)"
  if not single:
    return (f"kind of its stack (of {len(space.loads)} tables the search moves only the "
            f"{SINGLE_MOVES} largest alone, the others with their stacks); {where}")
  alts = []
  for k in allowed[i]:
    if k != kind:
      alts.append((k, space.evaluate(best.kinds[:i] + (k,) + best.kinds[i + 1:])))
  alts.sort(key=lambda a: a[1].objective)
  nxt = f"{alts[0][0]} {_delta(alts[0][1], best, space.budget)}" if alts else None
  if kind == "dp":
    if not nxt:
      return f"replicated: the mesh offers no split this table can use; {where}"
    small = _own(space, space.loads[i], "dp") <= 0.01 * space.budget
    return f"{'small table ' if small else ''}replicated: cheaper than {nxt}; {where}"
  parts = []
  dp = dict(alts).get("dp")
  if dp is not None and dp.memory > space.budget:
    need = _own(space, space.loads[i], "dp")
    parts.append(f"replicated would need {format_bytes(need)}/device"
                 + (" > budget" if need > space.budget else ", no room beside the others"))
  parts.append(f"fastest that fits (next: {nxt})" if nxt else "only kind that fits")
  if "table" in KIND_AXES[kind] and space.mesh["table"] > 1:
    parts.append(f"slice {best.plan[space.names[i]].table_slice} balances its stack")
  _, _, c = cm.split_sizes(kind, space.mesh)
  if c > 1:
    parts.append(f"dim {space.loads[i].dim} split over col={c}")
  parts.append(where)
  return "; ".join(parts)


def _result(space: _Space, e: _Eval, cal: Calibration, mode: str, reasons: Mapping[str, str],
            notes=()) -> PlanResult:
  mesh, coef = space.mesh, space.coef
  stack_of = {t: s for s in e.cost.stacks for t in s.tables}
  per_device = e.cost.memory_bytes
  tables = []
  for load in space.loads:
    p = e.plan[load.name]
    s = stack_of[load.name]
    # The table's share of its stack's own cost, by its id slots (features x bag).
    share = max(1, load.num_features) / max(1, s.features)
    _, r, _ = cm.split_sizes(p.kind, mesh)
    uses_table = "table" in KIND_AXES[p.kind]
    mem = cm.table_memory(load, p.kind, mesh, space.opt)
    tables.append(TableReport(
        load.name, load.rows, load.dim, load.dtype, p.kind,
        p.table_slice if uses_table else None, math.prod(mesh.values()) // (
            mesh["table"] if uses_table else 1), -(-load.rows // r),
        cm.local_dim(load, p.kind, mesh),
        mem, float(share * (s.terms @ coef)),
        dict(zip(cm.COST_TERMS, (share * s.terms).tolist())), reasons.get(load.name, "")))
  terms = dict(zip(cm.COST_TERMS, e.cost.terms.tolist()))
  slices = []
  for sl in range(mesh["table"]):
    held = tuple(t.name for t in tables if t.table_slice == sl)
    own = sum(t.memory_per_device for t in tables if t.table_slice in (sl, None))
    slices.append(SliceReport(sl, _slice_devices(mesh, sl), per_device, e.time_s, terms,
                              held, int(own)))
  stacks = tuple(StackReport(s.name, s.kind, s.tables, s.features, s.width, s.bag,
                             s.local_rows, s.buffer_rows, s.dedup, s.replicas,
                             float(s.terms @ coef), dict(zip(cm.COST_TERMS, s.terms.tolist())),
                             dict(s.memory))
                 for s in e.cost.stacks)
  notes = list(notes) + _optimizer_notes(space)
  if coef[cm.COST_TERMS.index("const")] == 0:
    notes.append("dense layers are not modeled (const = 0 until fitted from a profile)")
  return PlanResult(e.plan, dict(mesh), space.budget, space.batch_size, cal, tuple(tables),
                    tuple(slices), e.time_s, mode, tuple(notes), stacks, dict(e.cost.memory))


def _optimizer_notes(space: _Space) -> list[str]:
  """With per-table optimizers: which tables have which optimizer family (the stacks of
  each family but the default's end `_o<group>`), and how many learning rates each
  family's stacks hold (tables that differ only in `lr` share stacks), so that the stack
  names and optimizer bytes read plainly."""
  opt = space.opt
  if not cm.is_per_table(opt):
    return []
  parts, rest = [], ""
  for g, o in enumerate(opt.families):
    names = [n for n in space.names if opt.group(n) == g]
    rates = len({getattr(opt.of(n), "lr", None) for n in names})
    shared = f", {rates} learning rates sharing its stacks" if rates > 1 else ""
    if g == 0:   # "the other" unless every table is of the default's family
      other = "the other " if len(names) < len(space.names) else "all "
      rest = f"{_optimizer_name(opt.default)} for {other}{len(names)} table(s){shared}"
    elif names:
      shown = ", ".join(names[:8]) + (f", ... ({len(names)})" if len(names) > 8 else "")
      parts.append(f"{_optimizer_name(o)} for {shown} (stacks ending _o{g}{shared})")
  return [f"sparse optimizers per table: {'; '.join(parts + [rest])}"]


def _optimizer_name(spec) -> str:
  """An optimizer as the notes name it: its class (`Adam`), else the spec as given."""
  return type(spec).__name__ if hasattr(spec, "state_layout") else str(spec)


def _unused_axis_notes(space: _Space, e: _Eval) -> list[str]:
  notes = []
  for axis in ("table", "row", "col"):
    if space.mesh[axis] > 1 and not any(axis in KIND_AXES[k] for k in e.kinds):
      notes.append(f"mesh axis {axis}={space.mesh[axis]} holds only replicas: no table is "
                   "split over it (cheaper or impossible)")
  return notes


def propose_plan(tables: Sequence[TableSpec], features: Sequence[FeatureSpec],
                 mesh_shape: Mapping[str, int], memory_per_device_bytes: int | None,
                 optimizer_state_factor=0.0,
                 batch_size: int = 512, calibration: Calibration | None = None, *,
                 table_stats: Mapping[str, cm.TableStats] | None = None,
                 kinds: Sequence[str] | None = None, kernel: str | None = None,
                 exclude: Sequence[Plan] = ()) -> PlanResult:
  """Searches the plan with the lowest estimated step time that fits every device.

  Args:
    tables, features: the embedding specs.
    mesh_shape: axis -> size over `('data', 'table', 'row', 'col')` (absent axes = 1).
    memory_per_device_bytes: budget for tables, optimizer state and lookup buffers
      (None: `DEFAULT_MEMORY_PER_DEVICE`).
    optimizer_state_factor: state size: a factor of the table (0 SGD, 1 Adagrad, 2 Adam),
      a name in `cost_model.OPTIMIZER_STATES` (e.g. 'rowwise_adagrad'), the sparse
      optimizer object itself (`jaxrec.embedding.optimizers.SGD()`, ...), or one per table
      (`optimizers.TableOptimizers`, e.g. `config.sparse_tx()`; its entries any of these):
      each table's stacks, state and dedup are its own optimizer's, and tables of
      different optimizer families never share a stack, as in the collection (tables that
      differ only in `lr` do).
    batch_size: global batch, split over all devices.
    calibration: cost coefficients; None = `calibration.DEFAULT`.
    table_stats: optional pooling factors and id distributions by table name (checked and
      reported; buffers are static, so they do not change the estimate).
    kinds: restrict the search to these kinds (default: all).
    kernel: the collection's kernel, `xla` or `pallas` (None: `default_kernel()`).
    exclude: plans not to propose, compared by the kind of every table (e.g. plans a job
      has already profiled, to explore); ConfigError if every fitting plan is excluded.

  Raises:
    BudgetError (a ConfigError): a table fits no placement within the budget, or the tables
      together do not. ConfigError: other faults.
  """
  space, cal = _prepare(tables, features, mesh_shape, memory_per_device_bytes,
                        optimizer_state_factor, batch_size, calibration, table_stats, kernel)
  mesh = space.mesh
  allowed = []
  for load in space.loads:
    ks = [k for k in cm.allowed_kinds(load, mesh) if kinds is None or k in kinds]
    if not ks:
      raise ConfigError(f"table {_describe(load)}: none of the kinds {list(kinds or [])} can "
                        f"split it on mesh {cm.mesh_str(mesh)}")
    allowed.append(ks)
  space.excluded = {tuple(p[n].kind if n in p.placements else "" for n in space.names)
                    for p in exclude}
  smallest = tuple(min(ks, key=lambda k: _own(space, l, k))
                   for l, ks in zip(space.loads, allowed))
  for load, k in zip(space.loads, smallest):
    alone = _own(space, load, k)
    if alone > space.budget:
      parts = cm.table_memory(load, k, mesh, space.opt)   # (the optimizer's share was unsaid)
      split = (f" (table {format_bytes(parts['table'])}, optimizer state "
               f"{format_bytes(parts['optimizer'])})" if parts["optimizer"] else "")
      raise BudgetError(
          f"table {_describe(load)} fits no placement within the memory budget of "
          f"{format_bytes(space.budget)}/device on mesh {cm.mesh_str(mesh)}: smallest is "
          f"{k} at {format_bytes(alone)}/device{split}; add devices on row/col or memory"
          f"{_padded_hint(space, load)}")
  starts = [smallest]
  for k in dict.fromkeys(k for ks in allowed for k in ks):
    starts.append(tuple(k if k in ks else s for ks, s in zip(allowed, smallest)))
  best, single = None, _single_movers(space)
  for start in dict.fromkeys(starts):
    e = _local_search(space, allowed, start, single)
    if best is None or _better(e.objective, best.objective):
      best = e
  if best.memory > space.budget:   # over budget from every start: the largest tables split
    priced = [space.evaluate(s) for s in _split_largest_starts(space, allowed, smallest,
                                                               set(starts))]
    # searched from the few that start nearest the budget only: from every one, a search
    # that fits nowhere took 10x as long (200 tables: 97 s, not 9.5)
    for start in sorted((e for e in priced if e.memory < best.memory),
                        key=lambda e: e.memory)[:EXTRA_SEARCHES]:
      e = _local_search(space, allowed, start.kinds, single)
      if _better(e.objective, best.objective):
        best = e
      if best.memory <= space.budget:
        break
  best = space.full(best)
  if best.problem:
    from jaxrec.embedding import layout  # pylint: disable=import-outside-toplevel
    if layout.SLICE_OVERFLOW in best.problem:   # another mesh may spread them: --mesh=auto
      raise BudgetError(best.problem + (        # went no further than data=N
          f" (mesh {cm.mesh_str(space.mesh)} has no table axis to spread them on)"
          if space.mesh.get("table", 1) == 1 else ""))
    raise ConfigError(best.problem)
  if best.objective[0] == math.inf:
    raise ConfigError(f"every plan the search reached is excluded ({len(space.excluded)} "
                      "kind assignment(s))")
  if best.memory > space.budget:   # the plan over budget by the least the search reached
    raise _overflow_error(space, best, f"the {len(space.loads)} tables together (the "
                          "closest plan the search found)")
  reasons = {space.names[i]: _reason(space, allowed, best, i, i in single)
             for i in range(len(allowed))}
  return _result(space, best, cal, "auto", reasons, _unused_axis_notes(space, best))


def estimate_plan(plan: Plan, tables: Sequence[TableSpec], features: Sequence[FeatureSpec],
                  mesh_shape: Mapping[str, int], memory_per_device_bytes: int | None,
                  optimizer_state_factor=0.0,
                  batch_size: int = 512, calibration: Calibration | None = None, *,
                  table_stats: Mapping[str, cm.TableStats] | None = None,
                  check: bool = True, mode: str = "forced",
                  kernel: str | None = None) -> PlanResult:
  """Estimates a given plan (e.g. `--plan=rw`, or the plan a profiled job ran).

  Raises:
    ConfigError: the plan misses or names unknown tables, a table slice is out of range, or
      (if `check`) a device is over budget. A dim the `col` split does not divide is priced
      padded (`cost_model.local_dim`).
  """
  space, cal = _prepare(tables, features, mesh_shape, memory_per_device_bytes,
                        optimizer_state_factor, batch_size, calibration, table_stats, kernel)
  names = set(space.names)
  plan.check_tables(space.names)
  for load in space.loads:
    p = plan[load.name]
    if "table" in p.axes and not 0 <= p.table_slice < space.mesh["table"]:
      raise ConfigError(f"table '{load.name}': table_slice {p.table_slice} is outside mesh "
                        f"axis table={space.mesh['table']}")
  e = space.evaluate_plan(Plan({n: plan[n] for n in space.names}))
  if e.problem:
    raise ConfigError(e.problem)
  if check and e.memory > space.budget:
    raise _overflow_error(space, e, f"plan ({mode})")
  return _result(space, e, cal, mode, {n: mode for n in names})


def check_plan_fits(plan: Plan, tables: Sequence[TableSpec], mesh_shape: Mapping[str, int],
                    memory_per_device_bytes: int,
                    optimizer_state_factor=0.0, *,
                    features: Sequence[FeatureSpec] | None = None, batch_size: int = 0,
                    table_stats: Mapping[str, cm.TableStats] | None = None) -> list[int]:
  """Bytes per device (index row-major over mesh axes) of a forced plan; raises ConfigError
  naming the largest tables if it does not fit.

  `features` default to one one-hot feature per table; `batch_size=0` counts tables and
  optimizer state only (no lookup buffers).
  """
  if features is None:
    features = [FeatureSpec(f"_{t.name}", t.name) for t in tables]
  res = estimate_plan(plan, tables, features, mesh_shape, memory_per_device_bytes,
                      optimizer_state_factor, batch_size, None, table_stats=table_stats)
  per_device = [0] * res.num_devices
  for s in res.slices:
    for d in s.devices:
      per_device[d] = s.memory_bytes
  return per_device
