"""Plan search, TorchRec's planner shape: enumerate -> estimate -> propose -> partition.

  enumerate  per table, the kinds the mesh allows (`cost_model.allowed_kinds`)
  estimate   per (table, kind): memory and cost terms (`cost_model.estimate`), priced in
             seconds with the calibration coefficients
  propose    greedy: tables in decreasing (memory share + cost share) order each take the
             (kind, table slice) that least raises the estimated step time, keeping room
             for the tables still to place; run free and once preferring each kind (a
             stack's collectives pay off only when its tables move together); the two
             best starts then get local search: single-table moves and swaps of table-wise
             tables off the busiest slice, while the step time drops
  partition  devices on one `table` slice carry the same load, so the state is per slice:
             seconds and bytes; step time = busiest slice + launches + const

The objective is (step time, mean slice time): the second breaks ties toward less total
work. Every accepted state fits the memory budget on every slice.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from jaxrec.embedding.specs import FeatureSpec, TableSpec, validate
from jaxrec.errors import ConfigError
from jaxrec.planner import cost_model as cm
from jaxrec.planner.calibration import DEFAULT, Calibration
from jaxrec.planner.result import PlanResult, SliceReport, TableReport, format_bytes, format_time
from jaxrec.sharding.plan import KIND_AXES, Plan, TablePlacement

_REL_TOL = 1e-9
DEFAULT_MEMORY_PER_DEVICE = 16 * 2**30  # bytes, when the caller gives no budget


@dataclasses.dataclass(frozen=True)
class _Candidate:
  est: cm.Estimate
  sliced: bool  # lives on one `table` slice
  hold_s: float  # seconds per step on each holder
  all_s: float  # seconds per step on every device
  mem: int  # bytes on each holder
  stack: tuple  # (dim, dtype, kind): tables sharing it share its collectives
  launches: int  # collectives its stack launches per step


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
  if a[0] < b[0] * (1 - _REL_TOL) - 1e-15:
    return True
  return abs(a[0] - b[0]) <= b[0] * _REL_TOL + 1e-15 and a[1] < b[1] * (1 - _REL_TOL) - 1e-15


def _max_without_each(x: np.ndarray) -> np.ndarray:
  """out[i] = max(x[j] for j != i) (-inf for a single element)."""
  if len(x) == 1:
    return np.full(1, -np.inf)
  i = int(np.argmax(x))
  out = np.full(len(x), x[i])
  out[i] = np.max(np.delete(x, i))
  return out


class _State:
  """An assignment of tables to (kind, slice) with per-slice seconds and bytes."""

  def __init__(self, loads: Sequence[cm.TableLoad], cands: Mapping[str, Mapping[str, _Candidate]],
               mesh: Mapping[str, int], coef: np.ndarray, budget: int):
    self.loads = {l.name: l for l in loads}
    self.cands = cands
    self.mesh = mesh
    self.nt = mesh["table"]
    self.coef = dict(zip(cm.COST_TERMS, coef))
    self.budget = budget
    self.time = np.zeros(self.nt)
    self.mem = np.zeros(self.nt)
    self.stacks = collections.Counter()
    self.launches = 0
    self.choice: dict[str, tuple[str, int]] = {}

  def place(self, name: str, kind: str, s: int, sign: int = 1):
    c = self.cands[name][kind]
    where = s if c.sliced else slice(None)
    self.time[where] += sign * c.hold_s
    self.mem[where] += sign * c.mem
    self.time += sign * c.all_s
    self.mem += sign * c.est.ids_memory
    if (self.stacks[c.stack] == 0) if sign > 0 else (self.stacks[c.stack] == 1):
      self.launches += sign * c.launches
    self.stacks[c.stack] += sign
    if sign > 0:
      self.choice[name] = (kind, s)
    else:
      del self.choice[name]

  def _fixed_s(self, launches: int) -> float:
    return launches * self.coef["launches"] + self.coef["const"]

  def objective(self) -> tuple[float, float]:
    """(step time = busiest slice + launches + const, mean slice time)."""
    return float(self.time.max()) + self._fixed_s(self.launches), float(self.time.mean())

  def fits(self) -> bool:
    return float(self.mem.max()) <= self.budget

  def evaluate(self, name: str, reserve: float = 0.0):
    """[(objective, kind, slice)] for each option of the unplaced table `name` that fits
    with `reserve` bytes to spare on every slice."""
    out = []
    for kind, c in self.cands[name].items():
      fixed = self._fixed_s(self.launches + (c.launches if not self.stacks[c.stack] else 0))
      t = self.time + c.all_s
      m = self.mem + c.est.ids_memory
      room = self.budget - reserve
      if c.sliced:  # option s adds the holder cost to slice s only
        step = np.maximum(_max_without_each(t), t + c.hold_s) + fixed
        peak = np.maximum(_max_without_each(m), m + c.mem)
        mean = (float(t.sum()) + c.hold_s) / self.nt
        out += [((float(step[s]), mean), kind, s) for s in range(self.nt) if peak[s] <= room]
      elif float(m.max()) + c.mem <= room:
        out.append(((float(t.max()) + c.hold_s + fixed, float(t.mean()) + c.hold_s), kind, 0))
    return out


def _best(options):
  best = None
  for opt in options:
    if best is None or _better(opt[0], best[0]):
      best = opt
  return best


def _prepare(tables, features, mesh_shape, memory_per_device_bytes, optimizer_state_factor,
             batch_size, calibration, table_stats):
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
  cal = calibration or DEFAULT
  return (mesh, loads, cm.optimizer_state(optimizer_state_factor), cal,
          int(memory_per_device_bytes))


def _candidate(load, kind, mesh, batch_size, opt, coef) -> _Candidate:
  est = cm.estimate(load, kind, mesh, batch_size, opt)
  return _Candidate(est, "table" in KIND_AXES[kind] and mesh["table"] > 1,
                    float(est.holder_terms @ coef), float(est.all_terms @ coef),
                    est.holder_memory, (load.dim, load.dtype, kind),
                    cm.stack_launches(kind, mesh))


def _describe(load: cm.TableLoad) -> str:
  return (f"'{load.name}' ({load.rows:,} x {load.dim} {load.dtype} = "
          f"{format_bytes(load.table_bytes)})")


def _slice_devices(mesh: Mapping[str, int], s: int) -> tuple[int, ...]:
  n = math.prod(mesh.values())
  inner = mesh["row"] * mesh["col"]
  return tuple(d for d in range(n) if (d // inner) % mesh["table"] == s)


def _overflow_error(state: _State, what: str) -> ConfigError:
  s = int(np.argmax(state.mem))
  on = []
  for name, (kind, ts) in state.choice.items():
    c = state.cands[name][kind]
    if not c.sliced or ts == s:
      on.append((c.mem, name, kind))
  on.sort(reverse=True)
  largest = "; ".join(f"{_describe(state.loads[n])} as {k}: {format_bytes(m)}/device"
                      for m, n, k in on[:3])
  devs = ",".join(map(str, _slice_devices(state.mesh, s)[:8]))
  return ConfigError(
      f"{what} does not fit: devices {devs} (table slice {s}) need "
      f"{format_bytes(state.mem[s])} > budget {format_bytes(state.budget)} per device on mesh "
      f"{cm.mesh_str(state.mesh)}; largest there: {largest or 'id buffers only'}")


def _min_memory(cands: Mapping[str, _Candidate], nt: int) -> tuple[float, float]:
  """(smallest bytes on a holder, smallest average bytes per slice) over the kinds."""
  holder = min(c.mem + c.est.ids_memory for c in cands.values())
  avg = min(c.mem / (nt if c.sliced else 1) + c.est.ids_memory
            for c in cands.values())
  return holder, avg


def _greedy(state: _State, order: list[str], prefer: str | None = None) -> bool:
  """Places `order` one by one, each where it least raises the objective (only at kind
  `prefer` when that fits), keeping room for the tables still to place when possible;
  False if some table found no room."""
  avg = {n: _min_memory(state.cands[n], state.nt)[1] for n in order}
  reserve = float(sum(avg.values()))
  for name in order:
    reserve -= avg[name]
    best = None
    for r in (reserve, 0.0):
      options = state.evaluate(name, r)
      best = _best(o for o in options if o[1] == prefer) or _best(options)
      if best:
        break
    if best is None:
      return False
    state.place(name, best[1], best[2])
  return True


def _pack_smallest(state: _State, order: list[str]) -> None:
  """Fallback: every table at its smallest kind, largest first onto the emptiest slice."""
  for name in sorted(order, key=lambda n: -_min_memory(state.cands[n], state.nt)[0]):
    kind = min(state.cands[name], key=lambda k: state.cands[name][k].mem)
    s = int(np.argmin(state.mem)) if state.cands[name][kind].sliced else 0
    state.place(name, kind, s)


def _improve(state: _State, order: list[str], max_passes: int = 8) -> None:
  """Local search: best single-table move, then swaps off the busiest slice."""
  for _ in range(max_passes):
    improved = False
    for name in order:
      cur = state.choice[name]
      base = state.objective()
      state.place(name, *cur, -1)
      best = _best(state.evaluate(name))
      if best is not None and (best[1], best[2]) != cur and _better(best[0], base):
        state.place(name, best[1], best[2])
        improved = True
      else:
        state.place(name, *cur)
    if state.nt > 1:
      improved |= _swap(state)
    if not improved:
      return


def _swap(state: _State) -> bool:
  """Best swap of the slices of a table-wise table on the busiest slice and another's.
  Only those two slices change (launches and mean time do not)."""
  hot = int(np.argmax(state.time))
  sliced = [(n, state.cands[n][k], s) for n, (k, s) in state.choice.items()
            if state.cands[n][k].sliced]
  mine = [(n, c) for n, c, s in sliced if s == hot]
  other = [(n, c, s) for n, c, s in sliced if s != hot]
  if not mine or not other:
    return False
  where = np.array([s for _, _, s in other])
  hold = np.array([c.hold_s for _, c, _ in other])
  mem = np.array([c.mem for _, c, _ in other], dtype=float)
  t_rest, m_rest = state.time.copy(), state.mem.copy()
  t_rest[hot] = m_rest[hot] = -np.inf
  t_rest, m_rest = _max_without_each(t_rest)[where], _max_without_each(m_rest)[where]
  best = (float(state.time.max()), None)
  for a, ca in mine:
    step = np.maximum.reduce([t_rest, state.time[hot] - ca.hold_s + hold,
                              state.time[where] - hold + ca.hold_s])
    peak = np.maximum.reduce([m_rest, state.mem[hot] - ca.mem + mem,
                              state.mem[where] - mem + ca.mem])
    step[peak > state.budget] = np.inf
    i = int(np.argmin(step))
    if step[i] < best[0] * (1 - _REL_TOL) - 1e-15:
      best = (float(step[i]), (a, other[i][0]))
  if best[1] is None:
    return False
  a, b = best[1]
  (ka, sa), (kb, sb) = state.choice[a], state.choice[b]
  for n in (a, b):
    state.place(n, *state.choice[n], -1)
  state.place(a, ka, sb)
  state.place(b, kb, sa)
  return True


def _delta(alt: tuple[float, float], base: tuple[float, float]) -> str:
  if alt[0] - base[0] > base[0] * 1e-6:
    return f"+{format_time(alt[0] - base[0])}/step"
  return f"+{format_time(max(alt[1] - base[1], 0.0))} device time"


def _reason(state: _State, name: str) -> str:
  """Why `name` sits where it does, from its alternatives in the final plan."""
  kind, s = state.choice[name]
  load, cands = state.loads[name], state.cands[name]
  base = state.objective()
  state.place(name, kind, s, -1)
  options = state.evaluate(name)
  state.place(name, kind, s)
  alts = {k: None for k in cands if k != kind}  # kind -> objective at its best slice
  for k in alts:
    alts[k] = (_best(o for o in options if o[1] == k) or (None,))[0]
  fitting = sorted(((o, k) for k, o in alts.items() if o is not None), key=lambda x: x[0])
  nxt = f"{fitting[0][1]} {_delta(fitting[0][0], base)}" if fitting else None
  small = cands[kind].mem <= 0.01 * state.budget
  if kind == "dp":
    if not nxt:
      return "replicated: the mesh offers no split this table can use"
    return f"{'small table ' if small else ''}replicated: cheaper than {nxt}"
  parts = []
  if "dp" in alts and alts["dp"] is None:
    need = cands["dp"].mem
    parts.append(f"replicated would need {format_bytes(need)}/device"
                 + (" > budget" if need > state.budget else ", no room beside the others"))
  parts.append(f"fastest that fits (next: {nxt})" if nxt else "only kind that fits")
  if cands[kind].sliced:
    parts.append(f"slice {s} balances load")
  _, _, c = cm.split_sizes(kind, state.mesh)
  if c > 1:
    parts.append(f"dim {load.dim} split over col={c}")
  others = state.stacks[(load.dim, load.dtype, kind)] - 1
  if others:
    parts.append(f"shares the collectives of its stack with {others} other table(s)")
  return "; ".join(parts)


def _result(state: _State, cal: Calibration, batch_size: int, mode: str,
            reasons: Mapping[str, str], order: Sequence[str], notes=()) -> PlanResult:
  mesh, nt = state.mesh, state.nt
  k_terms = len(cm.COST_TERMS)
  slice_terms = np.zeros((nt, k_terms))
  tables, placements = [], {}
  for name in order:
    kind, s = state.choice[name]
    c, load = state.cands[name][kind], state.loads[name]
    where = s if c.sliced else slice(None)
    slice_terms[where] += c.est.holder_terms
    slice_terms += c.est.all_terms
    uses_table = "table" in KIND_AXES[kind]
    placements[name] = TablePlacement(kind, s if uses_table else 0)
    tables.append(TableReport(
        name, load.rows, load.dim, load.dtype, kind, s if uses_table else None, c.est.holders,
        c.est.shard_rows, c.est.shard_cols, dict(c.est.memory, ids=c.est.ids_memory),
        c.hold_s + c.all_s, dict(zip(cm.COST_TERMS, (c.est.holder_terms + c.est.all_terms)
                                      .tolist())), reasons.get(name, "")))
  slice_terms[:, cm.COST_TERMS.index("launches")] = state.launches
  slice_terms[:, cm.COST_TERMS.index("const")] = 1.0
  coef = cal.vector()
  slices = tuple(SliceReport(s, _slice_devices(mesh, s), int(state.mem[s]),
                             float(slice_terms[s] @ coef),
                             dict(zip(cm.COST_TERMS, slice_terms[s].tolist())))
                 for s in range(nt))
  notes = list(notes)
  if coef[cm.COST_TERMS.index("const")] == 0:
    notes.append("dense layers are not modeled (const = 0 until fitted from a profile)")
  return PlanResult(Plan(placements), dict(mesh), state.budget, int(batch_size), cal,
                    tuple(tables), slices, max(s.time_s for s in slices), mode, tuple(notes))


def _unused_axis_notes(state: _State) -> list[str]:
  notes = []
  for axis in ("table", "row", "col"):
    if state.mesh[axis] > 1 and not any(axis in KIND_AXES[k] for k, _ in state.choice.values()):
      notes.append(f"mesh axis {axis}={state.mesh[axis]} holds only replicas: no table is "
                   "split over it (cheaper or impossible)")
  return notes


def propose_plan(tables: Sequence[TableSpec], features: Sequence[FeatureSpec],
                 mesh_shape: Mapping[str, int], memory_per_device_bytes: int | None,
                 optimizer_state_factor=0.0,
                 batch_size: int = 512, calibration: Calibration | None = None, *,
                 table_stats: Mapping[str, cm.TableStats] | None = None,
                 kinds: Sequence[str] | None = None) -> PlanResult:
  """Searches the plan with the lowest estimated step time that fits every device.

  Args:
    tables, features: the embedding specs.
    mesh_shape: axis -> size over `('data', 'table', 'row', 'col')` (absent axes = 1).
    memory_per_device_bytes: budget for tables, optimizer state and lookup buffers
      (None: `DEFAULT_MEMORY_PER_DEVICE`).
    optimizer_state_factor: state size: a factor of the table (0 SGD, 1 Adagrad, 2 Adam),
      a name in `cost_model.OPTIMIZER_STATES` (e.g. 'rowwise_adagrad'), or the sparse
      optimizer object itself (`jaxrec.embedding.optimizers.SGD()`, ...).
    batch_size: global batch, split over all devices.
    calibration: cost coefficients; None = `calibration.DEFAULT`.
    table_stats: optional pooling factors and id distributions by table name.
    kinds: restrict the search to these kinds (default: all).

  Raises:
    ConfigError: a table fits no placement within the budget, or the tables together do not.
  """
  mesh, loads, opt, cal, memory_per_device_bytes = _prepare(
      tables, features, mesh_shape, memory_per_device_bytes, optimizer_state_factor,
      batch_size, calibration, table_stats)
  coef = cal.vector()
  cands = {}
  for load in loads:
    ks = [k for k in cm.allowed_kinds(load, mesh) if kinds is None or k in kinds]
    if not ks:
      raise ConfigError(f"table {_describe(load)}: none of the kinds {list(kinds or [])} can "
                        f"split it on mesh {cm.mesh_str(mesh)}")
    cands[load.name] = {k: _candidate(load, k, mesh, batch_size, opt, coef) for k in ks}
  ids_all = sum(next(iter(c.values())).est.ids_memory for c in cands.values())
  for load in loads:
    smallest = min(cands[load.name].values(), key=lambda c: c.mem)
    if smallest.mem + ids_all > memory_per_device_bytes:
      raise ConfigError(
          f"table {_describe(load)} fits no placement within the memory budget of "
          f"{format_bytes(memory_per_device_bytes)}/device on mesh {cm.mesh_str(mesh)}: "
          f"smallest is {smallest.est.kind} at {format_bytes(smallest.mem)}/device"
          f" (+ {format_bytes(ids_all)} id buffers); add devices on row/col or memory")

  nt = mesh["table"]
  budget = int(memory_per_device_bytes)
  min_mem = {n: _min_memory(c, nt)[0] for n, c in cands.items()}
  min_time = {n: min(c.hold_s / (nt if c.sliced else 1) + c.all_s for c in cs.values())
              for n, cs in cands.items()}
  total_time = sum(min_time.values()) or 1.0
  order = sorted(cands, key=lambda n: (-(min_mem[n] / budget + min_time[n] / total_time), n))
  # Starts: free greedy, and greedy preferring each kind (a whole stack may only pay off
  # together: a lone table of a new kind pays its stack's collective launches alone). The
  # two best starts are improved by local search.
  starts = []
  for prefer in (None,) + tuple(k for k in KIND_AXES if any(k in c for c in cands.values())):
    state = _State(loads, cands, mesh, coef, budget)
    if _greedy(state, order, prefer):
      starts.append(state)
  if not starts:
    state = _State(loads, cands, mesh, coef, budget)
    _pack_smallest(state, order)
    if not state.fits():
      raise _overflow_error(state, f"the {len(loads)} tables together (even each at its "
                            "smallest placement)")
    starts.append(state)
  starts.sort(key=lambda st: st.objective())
  best = None
  for state in starts[:2]:
    _improve(state, order)
    if best is None or _better(state.objective(), best.objective()):
      best = state
  state = best
  reasons = {n: _reason(state, n) for n in order}
  return _result(state, cal, batch_size, "auto", reasons, [l.name for l in loads],
                 _unused_axis_notes(state))


def estimate_plan(plan: Plan, tables: Sequence[TableSpec], features: Sequence[FeatureSpec],
                  mesh_shape: Mapping[str, int], memory_per_device_bytes: int | None,
                  optimizer_state_factor=0.0,
                  batch_size: int = 512, calibration: Calibration | None = None, *,
                  table_stats: Mapping[str, cm.TableStats] | None = None,
                  check: bool = True, mode: str = "forced") -> PlanResult:
  """Estimates a given plan (e.g. `--plan=rw`, or the plan a profiled job ran).

  Raises:
    ConfigError: the plan misses or names unknown tables, a kind cannot split a table on
      this mesh, a table slice is out of range, or (if `check`) a device is over budget.
  """
  mesh, loads, opt, cal, memory_per_device_bytes = _prepare(
      tables, features, mesh_shape, memory_per_device_bytes, optimizer_state_factor,
      batch_size, calibration, table_stats)
  names = {l.name for l in loads}
  unknown = sorted(set(plan.placements) - names)
  if unknown:
    raise ConfigError(f"plan names unknown tables {unknown} (tables: {sorted(names)})")
  coef = cal.vector()
  cands, state_choice = {}, {}
  for load in loads:
    p = plan[load.name]
    problem = cm.kind_problem(load, p.kind, mesh)
    if problem:
      raise ConfigError(f"{problem} (mesh {cm.mesh_str(mesh)})")
    if "table" in p.axes and not 0 <= p.table_slice < mesh["table"]:
      raise ConfigError(f"table '{load.name}': table_slice {p.table_slice} is outside mesh "
                        f"axis table={mesh['table']}")
    cands[load.name] = {p.kind: _candidate(load, p.kind, mesh, batch_size, opt, coef)}
    state_choice[load.name] = (p.kind, p.table_slice if cands[load.name][p.kind].sliced else 0)
  state = _State(loads, cands, mesh, coef, int(memory_per_device_bytes))
  for name, (kind, s) in state_choice.items():
    state.place(name, kind, s)
  if check and not state.fits():
    raise _overflow_error(state, f"plan ({mode})")
  reasons = {n: mode for n in names}
  return _result(state, cal, batch_size, mode, reasons, [l.name for l in loads])


def check_plan_fits(plan: Plan, tables: Sequence[TableSpec], mesh_shape: Mapping[str, int],
                    memory_per_device_bytes: int,
                    optimizer_state_factor: float | str | cm.OptimizerState = 0.0, *,
                    features: Sequence[FeatureSpec] | None = None, batch_size: int = 0,
                    table_stats: Mapping[str, cm.TableStats] | None = None) -> list[int]:
  """Bytes per device (index row-major over mesh axes) of a forced plan; raises ConfigError
  naming the over-budget devices and their largest tables if it does not fit.

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
