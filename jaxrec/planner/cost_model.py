"""Memory and step cost of a plan as the embedding collection runs it: readable arithmetic.

The collection (`jaxrec.embedding`) groups tables into *stacks* (same kind, dim, dtype,
sparse optimizer and bag-size bucket, buckets merged where a stack split over `table` gets
cheaper; `layout.build_layouts`), and every device runs every stack on buffers of
static size: a stack split over `table` is padded to its widest slice, so all its devices
do the same work whether their slice holds many tables or none. The cost model therefore
prices stacks, not tables, and every device carries the same load.

Notation. Mesh sizes `nd, nt, nr, nc` over axes (data, table, row, col), `N` devices;
global batch `B`, `b = B/N` examples per device. For a stack of kind `k`:

  T, R, C   nt, nr, nc if `k` splits over that axis, else 1;  G = T*R*C
  F         features reading the stack's tables
  W         features looked up per device: the most on one `table` slice (F if `k` does
            not use `table`); slices with fewer are padded to W
  L         bag size every stack feature is padded to (its longest `max_len`)
  slots     B*W*L: ids each device handles (every device's examples, its features)
  rows_d    rows of the local shard: the widest slice's rows / R (padded)
  dl, e     local dim d/C; stored bytes per element (int8: 1, plus 8 bytes per row)
  dedup     the collection dedups ids unless the optimizer is SGD on float32 tables with
            the XLA kernel, or as `EmbeddingOptions.dedup` forces (`EmbeddingCollection.dedup`)
  n         rows of the lookup buffer: min(slots, rows_d + 1) with dedup, else the group's
            slots/rep (each replica reads and pools only its own examples' slots)
  u         rows the update writes: n with dedup, else slots (every replica scatter-adds
            the slot deltas of the whole replica group)
  rep       replicas of each shard: N/G; s, s_row: optimizer state (`OptimizerState`) of
            the stack's optimizer (one per table: `optimizers.TableOptimizers`, `state_of`)

Cost terms (`COST_TERMS`), per device per step (the same on every device):

  const                 1: dense layers, input, dispatch; set by profile fits
  collectives           collectives launched: 1 ids all-gather (none when no stack needs
                        another device's ids in stage 1, `layout.ids_gather_axes`); 2
                        (forward + backward) per split axis of each *axes group* (stacks
                        of one dim split over the same axes send their pooled sums in one
                        set, `local_ops.pool_all`; a group of mixed dims, one set per
                        dim). The stage-3 psums of stacks with replicas are independent
                        of each other and of the dense gradients' all-reduce, which XLA
                        combines into one: they add bytes, not
                        launches; without dedup, stacks of the same replica axes and
                        group shape all-gather their slots and slot deltas together,
                        one launch per replica axis for all of them (counted on the first
                        such stack)
  stacks                stacks: per-stack operations on every device (select, gather, pool,
                        scatter, update, one stage-3 program each)
  sort_bytes            slots*4 per dedup stack: `unique` sorts the int32 ids
  gather_bytes          n*dl*e (+ 8n for int8): the buffer read from the local shard
  pool_bytes            with dedup: 2*b*G*W*L*dl*4, rows pooled for the group's examples
                        through the inverse index (a gather, forward) and their gradients
                        scatter-added into the buffer (backward), f32
  stream_bytes          without dedup, the same bytes pooled as a reshape and a sum over the
                        bag (the buffer holds the slots in order), whose backward is a
                        broadcast: streaming passes, no gather or scatter
  update_bytes          2*u*(dl*(e + 4s) + 4 s_row): the optimizer reads and writes the u
                        rows and their f32 state (scatter-add of u = slots rows without
                        dedup)
  all_gather_bytes      B*S*4*(M-1)/N: the ids all-gather over the M devices along
                        `ids_gather_axes`, S = sum over features of their max_len (twice
                        if weighted: ids travel unpadded, see `collection.Packing`);
                        + X*(R-1)/R per axes group split over `row` (backward of its
                        psum_scatter); + (rep-1)/rep*slots*(dl+1)*4 per stack with
                        replicas and without dedup (its slots and their gradients
                        all-gathered over the replicas)
  reduce_scatter_bytes  X*(R-1)/R per axes group split over `row`, X = T*R*C*b*Wg*dl*4
                        the group's partial sums (Wg = sum of its stacks' W)
  all_to_all_bytes      2*X/R*(T-1)/T over `table` + 2*X/R*(C-1)/C over `col` per group
  all_reduce_bytes      2*(rep-1)/rep*n*dl*4 per dedup stack with replicas: its buffer
                        gradients psum-ed before the (replicated) update

Collective bytes are bytes moved per device by a ring algorithm (what `calibration` times).
Memory per device: per stack, table `rows_d*dl*e` (int8 +8 per row), optimizer state
`rows_d*(dl*4s + 4 s_row)`, buffers `8*b*G*W*dl` (pooled sums and gradients) plus
`8*n*(dl*s + s_row)` (the unique rows' optimizer state read and updated: an Adam plan's
compiled step held 8% over a budget the plan claimed to fit without it), plus with dedup
`4*u + 12*slots + 8*n*dl` (unique ids; selected ids, inverse index, weights; f32 rows and
gradients) and, on the XLA kernel with bags, `6*b*G*W*L*dl` (each slot's row gathered for
pooling, and its gradient); without dedup `8*slots + 4*n*dl`, and with replicas
`8*slots*(dl+1)` (the all-gathered block and its copy); see `_buffer_bytes`. Plus the
gathered ids `B*S*4*M/N`.

Pooling factors and id distributions (`TableStats`) do not change these numbers: every
buffer has a static size, so absent (-1) and repeated ids cost as much as present ones.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from jaxrec.embedding import optimizers as sparse_optimizers
from jaxrec.embedding import specs, stack_shape
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError, in_order, some
from jaxrec.sharding.plan import KIND_AXES, KINDS, MESH_AXES, Plan, placed_as

COST_TERMS = ("const", "collectives", "stacks", "sort_bytes", "gather_bytes", "pool_bytes",
              "stream_bytes", "update_bytes", "all_gather_bytes", "reduce_scatter_bytes",
              "all_to_all_bytes", "all_reduce_bytes")
_I = {name: i for i, name in enumerate(COST_TERMS)}


@dataclasses.dataclass(frozen=True)
class OptimizerState:
  """Optimizer state size.

  Attributes:
    per_element: float32 state values per table element (Adagrad 1, Adam 2).
    per_row: float32 state values per row (row-wise Adagrad 1).
    linear: the update is linear in the gradient (SGD): the collection may then skip
      dedup on float32 tables (see `dedups`).
  """

  per_element: float = 0.0
  per_row: float = 0.0
  linear: bool = False
  name: str = dataclasses.field(default="", compare=False)   # for messages; "" for a factor


OPTIMIZER_STATES = {
    "sgd": OptimizerState(0.0, 0.0, linear=True, name="SGD"),
    "adagrad": OptimizerState(1.0, 0.0, name="Adagrad"),
    "rowwise_adagrad": OptimizerState(0.0, 1.0, name="RowwiseAdagrad"),
    "adam": OptimizerState(2.0, 0.0, name="Adam"),
    "ftrl": OptimizerState(2.0, 0.0, name="FTRL"),
}


def optimizer_state(spec) -> OptimizerState:
  """`spec`: a factor of the table size (0 = SGD, 1 = Adagrad, 2 = Adam), an optimizer name
  from `OPTIMIZER_STATES`, an `OptimizerState`, or a sparse optimizer of
  `jaxrec.embedding.optimizers` (its `state_layout()` is counted). One per table
  (`optimizers.TableOptimizers`) has no single state: `state_of` gives each table's."""
  if isinstance(spec, OptimizerState):
    return spec
  if isinstance(spec, sparse_optimizers.TableOptimizers):
    raise TypeError("optimizer_state: per-table optimizers have one state per table; "
                    "use state_of(optimizer, table)")
  if hasattr(spec, "state_layout"):
    per = [p for p, _ in spec.state_layout().values()]
    return OptimizerState(float(per.count("element")), float(per.count("row")),
                          type(spec).__name__ == "SGD", type(spec).__name__)
  factor, shown = spec, spec
  if isinstance(spec, str):
    key = optimizer_key(spec)
    if key in OPTIMIZER_STATES:
      return OPTIMIZER_STATES[key]
    try:
      factor, shown = float(spec.strip()), f"'{spec}'"   # not `key`: '-' became '_' there
    except ValueError:
      raise ConfigError(f"unknown optimizer '{spec}' (known: {', '.join(OPTIMIZER_STATES)}, "
                        "or a factor of the table size >= 0)") from None
  if not (math.isfinite(factor) and factor >= 0):   # inf overflowed later, nan passed `< 0`
    raise ConfigError(f"a factor of the table size must be a finite number >= 0 (0: sgd, 1: "
                      f"adagrad, 2: adam), got {shown}")
  return OptimizerState(float(factor), 0.0, float(factor) == 0)


def state_of(optimizer, table: str) -> OptimizerState:
  """Table `table`'s optimizer state: of `optimizer` (any `optimizer_state` spec), or where
  it is one per table (`optimizers.TableOptimizers`, whose entries may be any such spec) of
  the table's entry."""
  return optimizer_state(sparse_optimizers.of(optimizer, table))


def is_per_table(optimizer) -> bool:
  """Whether `optimizer` gives tables different optimizers (`optimizers.TableOptimizers`):
  its tables then stack by optimizer family (`layout.build_layouts`)."""
  return isinstance(optimizer, sparse_optimizers.TableOptimizers)


def check_optimizers(optimizer, tables: Sequence[str]) -> None:
  """`ConfigError` for a per-table `optimizer` naming a table not in `tables`, or an entry
  `optimizer_state` cannot size (naming its table); one optimizer: `optimizer_state`'s."""
  if not is_per_table(optimizer):
    optimizer_state(optimizer)
    return
  sparse_optimizers.check_tables(optimizer, list(tables))
  try:
    optimizer_state(optimizer.default)
  except ConfigError as e:
    raise ConfigError(f"the default sparse optimizer: {e}") from None
  for name, opt in optimizer.overrides:
    try:
      optimizer_state(opt)
    except ConfigError as e:
      raise ConfigError(f"table '{name}': its sparse optimizer: {e}") from None


def optimizer_key(name: str) -> str:
  """An optimizer name as `OPTIMIZER_STATES` spells it (`Rowwise-Adagrad` -> `rowwise_adagrad`)."""
  return name.strip().lower().replace("-", "_")


def dedups(opt: OptimizerState, dtype: str, kernel: str = "xla", option="auto",
           table: str = "") -> bool:
  """Whether the collection dedups a stack's ids (`EmbeddingCollection.dedup`): as
  `EmbeddingOptions.dedup` (`option`) forces, or for `auto` always, except where
  `specs.dedup_optional` allows skipping it (SGD on float32 tables with the XLA kernel:
  duplicates then add up in the update's scatter and the sort is saved). ConfigError for
  `False` where it is not allowed (the collection refuses it, `table` named): `specs.dedups`."""
  name = opt.name or ("SGD" if opt.linear else "an optimizer with state")
  return specs.dedups(option, opt.linear, dtype, kernel,
                      f"{table or 'here:'} {name}, {dtype}, kernel {kernel}")


@dataclasses.dataclass(frozen=True)
class TableStats:
  """What is known about a table's traffic beyond its specs (checked, not reported; the
  step cost does not depend on it, see module docstring).

  Attributes:
    pooling_factor: mean present ids per example, summed over the features reading the
      table; `None` = sum of their `max_len` (every bag full).
    zipf_alpha: ids follow a Zipf law with this exponent over the rows; `None` = uniform.
  """

  pooling_factor: float | None = None
  zipf_alpha: float | None = None

  def check(self, table: str, max_pooling: float) -> float:
    """The pooling factor (`max_pooling`, the sum of the features' `max_len`, when None);
    `ConfigError` naming `table` unless it is a number in [0, max_pooling] and
    `zipf_alpha` a finite number >= 0 (or None)."""
    pf, alpha = self.pooling_factor, self.zipf_alpha
    if pf is not None and not (_is_number(pf) and 0 <= pf <= max_pooling + 1e-9):
      raise ConfigError(f"table '{table}': pooling factor {pf!r} must be a number in "
                        f"[0, {max_pooling}] (sum of max_len of its features)")
    if alpha is not None and not (_is_number(alpha) and alpha >= 0):
      raise ConfigError(f"table '{table}': zipf alpha {alpha!r} must be a finite number >= 0 "
                        "(0: uniform)")
    return float(max_pooling if pf is None else pf)


def _is_number(x) -> bool:
  """A finite int or float (not a bool, a string or NaN)."""
  return (isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
          and math.isfinite(x))


@dataclasses.dataclass(frozen=True)
class TableLoad:
  """One table as the planner sees it."""

  name: str
  rows: int
  dim: int
  dtype: str
  dtype_bytes: int
  num_features: int  # features reading it
  max_len: int  # longest bag of those features (picks the stack's bucket)
  pooling_factor: float

  @property
  def table_bytes(self) -> int:
    return self.rows * self.dim * self.dtype_bytes + (8 * self.rows if self.dtype == "int8"
                                                      else 0)


def table_loads(tables: Sequence[TableSpec], features: Sequence[FeatureSpec],
                stats: Mapping[str, TableStats] | None = None) -> list[TableLoad]:
  """Joins tables, the features reading them and optional `stats` by table name."""
  stats = dict(stats or {})
  known = {t.name for t in tables}
  unknown = in_order(set(stats) - known)
  if unknown:
    raise ConfigError(f"table stats name unknown tables {unknown} (tables: "
                      f"[{some(in_order(known))}])")
  reading: dict[str, list[FeatureSpec]] = {}   # (one pass: per table, it was quadratic)
  for f in features:
    reading.setdefault(f.table, []).append(f)
  loads = []
  for t in tables:
    feats = reading.get(t.name, [])
    length = sum(int(f.max_len) for f in feats)
    s = stats.get(t.name, TableStats())
    if not isinstance(s, TableStats):
      raise ConfigError(f"table '{t.name}': stats must be a TableStats, got {s!r}")
    pf = s.check(t.name, length)
    loads.append(TableLoad(t.name, int(t.rows), int(t.dim), t.dtype, np.dtype(t.dtype).itemsize,
                           len(feats), max([int(f.max_len) for f in feats], default=1), pf))
  return loads


def normalize_mesh(mesh_shape: Mapping[str, int]) -> dict[str, int]:
  """All four axes of `MESH_AXES` (absent ones = 1), checked positive integers."""
  unknown = sorted(set(mesh_shape) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"mesh: unknown axes {unknown} (axes: {', '.join(MESH_AXES)})")
  mesh = {}
  for a in MESH_AXES:
    v = mesh_shape.get(a, 1)
    if int(v) != v or int(v) < 1:
      raise ConfigError(f"mesh: axis '{a}' must be a positive integer, got {v}")
    mesh[a] = int(v)
  return mesh


def mesh_str(mesh: Mapping[str, int]) -> str:
  return ",".join(f"{a}={mesh.get(a, 1)}" for a in MESH_AXES)


def split_sizes(kind: str, mesh: Mapping[str, int]) -> tuple[int, int, int]:
  """(T, R, C): the sizes of `table`, `row`, `col` if `kind` splits over them, else 1."""
  axes = KIND_AXES[kind]
  return tuple(mesh.get(a, 1) if a in axes else 1 for a in ("table", "row", "col"))


def local_dim(load: TableLoad, kind: str, mesh: Mapping[str, int]) -> int:
  """Columns of the table on each holding device: its dim over the `col` split, rounded up
  (a dim `col` does not divide is stored padded, `embedding.layout`)."""
  _, _, c = split_sizes(kind, mesh)
  return -(-load.dim // c)


def allowed_kinds(load: TableLoad, mesh: Mapping[str, int]) -> list[str]:
  """Kinds worth enumerating: no other kind splits over exactly the axes of size > 1 this
  one splits over (a size-1 split is then the same placement as that kind; `grid` on
  `table=1` is the only row x column split, and was left out: budgets only it meets were
  refused) and columns divide evenly (the search never proposes column padding; a forced or
  given plan may pad). A row split of a table with fewer rows than the `row` axis is allowed
  (some shards are empty, as in a forced plan): it was left out, and a 10-row table kept
  apart in a stack of its own made `skewed_synthetic` on table=16,row=16 188 us where
  forced twrw is 157 (now 140)."""
  out = []
  for kind in KINDS:
    _, _, c = split_sizes(kind, mesh)
    if not distinct_kind(kind, mesh) or load.dim % c:
      continue
    out.append(kind)
  return out


def distinct_kind(kind: str, mesh: Mapping[str, int]) -> bool:
  """Whether no other kind is the same placement on `mesh` (`sharding.plan.placed_as`:
  `twrw` on `table=1` is `rw`)."""
  return placed_as(kind, mesh) is None


def build_layouts(tables: Sequence[TableSpec], features: Sequence[FeatureSpec], plan: Plan,
                  mesh: Mapping[str, int], optimizer=None):
  """The collection's stacks for `plan` (`embedding.layout.build_layouts`). A per-table
  `optimizer` (`is_per_table`) splits stacks by optimizer family as the collection does,
  and each stack carries its entry; one optimizer for every table changes no stack and is
  left out of the layouts (`StackLayout.optimizer` None: the planner prices it apart)."""
  from jaxrec.embedding import layout  # pylint: disable=import-outside-toplevel
  return layout.build_layouts(tables, features, plan, mesh,
                              optimizer if is_per_table(optimizer) else None)


@dataclasses.dataclass(frozen=True)
class StackCost:
  """One stack's share of a device's step (see module docstring).

  Attributes:
    name: the collection's stack name, e.g. `tw_d16_float32_L1`.
    tables: its tables, in stack order.
    features, width, bag: F, W, L.
    local_rows, local_cols: shard shape on each device (padded).
    buffer_rows: n; dedup: whether ids are deduplicated; replicas: rep.
    terms: float64 `[len(COST_TERMS)]` of the stack itself (its axes group's collectives
      are in `PlanCost.group_terms`).
    memory: bytes on each device: `table`, `optimizer`, `buffers`.
    id_columns: ids per example its features send in the ids all-gather (the sum of
      their `max_len`, twice if weighted).
  """

  name: str
  kind: str
  axes: tuple[str, ...]
  tables: tuple[str, ...]
  features: int
  width: int
  bag: int
  local_rows: int
  local_cols: int
  buffer_rows: int
  dedup: bool
  replicas: int
  terms: np.ndarray
  memory: Mapping[str, int]
  id_columns: int = 0


@dataclasses.dataclass(frozen=True)
class PlanCost:
  """A plan's cost terms and memory on each device (every device alike).

  Attributes:
    stacks: per stack.
    group_terms: axes -> terms of the collectives that axes group's stacks share (one set
      per dim among them).
    global_terms: the ids all-gather and `const`.
    terms: the sum: float64 `[len(COST_TERMS)]`.
    ids_bytes: gathered ids held by every device.
  """

  stacks: tuple[StackCost, ...]
  group_terms: Mapping[tuple[str, ...], np.ndarray]
  global_terms: np.ndarray
  terms: np.ndarray
  ids_bytes: int

  @property
  def memory(self) -> dict[str, int]:
    out = {"table": 0, "optimizer": 0, "buffers": 0}
    for s in self.stacks:
      for k, v in s.memory.items():
        out[k] += v
    out["ids"] = self.ids_bytes
    return out

  @property
  def memory_bytes(self) -> int:
    return int(sum(self.memory.values()))


def _buffer_bytes(dedup: bool, kernel: str, n: float, u: float, slots: float, rep: int,
                  dl: int, pooled: float, big_l: int, opt: OptimizerState,
                  forward: bool = False) -> float:
  """Bytes of one stack's step buffers on a device: the `pooled` bags `[b*g*w, dl]` f32 and
  their gradient, the unique rows' optimizer state the update reads and writes, and:
  - with dedup, `u` unique ids, the `slots` ids' sort keys and index, the `n` gathered
    rows `[n, dl]` and their gradient, and (XLA, bags `L > 1`) every slot's row gathered
    through the inverse index for pooling, `[pooled*L, dl]`, with its gradient, counted
    at 6 bytes an element: 2.5-5.9 needed in 9 measured plans (bags of 20, every kind;
    without it a step held up to 4x its plan);
  - without dedup, the slots' ids and local index and one copy of their rows (the
    gradient is pooled's; the two counted refused plans that held 0.4-0.5 of the plan);
    replicated, also the all-gathered `[slots, dl+1]` int32 block and its sliced copy
    (one counted: a dp step held 1.35x its plan).
  Measured against the compiled step (`memory_analysis`) on 8 host CPU devices.
  `forward`: the eval step's lookup alone (no gradients, no optimizer state, nothing
  all-gathered over replicas): each of the above without its gradient."""
  if forward:
    if not dedup:   # (the slots' rows are not held: XLA pools them as it gathers)
      return 4 * pooled * dl + 8 * slots
    gathered = pooled * big_l if kernel == "xla" and big_l > 1 else 0
    return 4 * pooled * dl + 4 * n * dl + 3 * gathered * dl + 4 * u + 12 * slots
  state = 8 * n * (dl * opt.per_element + opt.per_row)
  common = 8 * pooled * dl + state
  if dedup:
    gathered = pooled * big_l if kernel == "xla" and big_l > 1 else 0   # one-hot: the
    return common + 4 * u + 12 * slots + 8 * n * dl + 6 * gathered * dl  # pooled itself
  return common + 8 * slots + 4 * n * dl + (8 * slots * (dl + 1) if rep > 1 else 0)


def plan_cost(layouts, features: Sequence[FeatureSpec], batch_size: int, opt,
              kernel: str = "xla", option="auto", forward: bool = False) -> PlanCost:
  """Cost terms and memory per device of the stacks `layouts` (`build_layouts`) reading
  `features`, for a global `batch_size`, sparse optimizer `opt` (an `optimizer_state` spec,
  or one per table: each stack priced with its tables' own, `state_of`), the collection's `kernel`
  (`xla` or `pallas`) and `EmbeddingOptions.dedup` (`option`; with `kernel` it decides
  each stack's dedup, see `dedups`). `forward`: the buffers of the eval step's lookup
  (see `_buffer_bytes`), not the training step's."""
  stacks = [stack_cost(l, features, batch_size, opt, kernel, option, forward) for l in layouts]
  return combine_costs(layouts, stacks, batch_size)


def stack_cost(l, features: Sequence[FeatureSpec], batch_size: int, opt,
               kernel: str = "xla", option="auto", forward: bool = False) -> StackCost:
  """One stack's own terms and memory (`plan_cost`'s arguments), which depend on that
  stack alone: what stacks share (their axes group's collectives, the slot all-gather
  launch counted on the first stack of its key, the ids all-gather) is added by
  `combine_costs`. (The planner's search caches it per stack, `planner.pricing`.) `opt`:
  its optimizer, the entry of its tables where `opt` is per table (a stack holds the
  tables of one optimizer family, whose state and dedup are alike, `layout.build_layouts`).
  `l`: a `StackLayout`, or its `stack_shape.StackShape` (all the cost reads of it: the
  search prices shapes it sums from its tables, `planner.pricing`)."""
  if not isinstance(l, stack_shape.StackShape):
    l = stack_shape.of_layout(l, features)
  opt = state_of(opt, l.tables[0])
  n_dev = math.prod(dict(l.sizes).values())
  big_b = float(batch_size)
  b = big_b / n_dev
  t, r, c = (l.size(a) for a in ("table", "row", "col"))
  g = t * r * c
  f, w, big_l, id_cols = l.features, l.width, l.max_len, l.id_columns
  e = np.dtype(l.dtype).itemsize
  row_extra = 8 if l.dtype == "int8" else 0  # int8: f32 scale and bias per row
  dl = l.local_dim
  slots = big_b * w * big_l
  dedup = dedups(opt, l.dtype, kernel, option)
  rep = n_dev // g
  n = min(slots, l.local_rows + 1) if dedup else slots / rep
  u = n if dedup else slots
  x = np.zeros(len(COST_TERMS))
  x[_I["stacks"]] = 1
  x[_I["sort_bytes"]] = slots * 4 if dedup else 0.0
  x[_I["gather_bytes"]] = n * (dl * e + row_extra)
  x[_I["pool_bytes" if dedup else "stream_bytes"]] = 2 * b * g * w * big_l * dl * 4
  x[_I["update_bytes"]] = 2 * u * (dl * (e + 4 * opt.per_element) + 4 * opt.per_row
                                   + row_extra)
  if rep > 1 and dedup:
    x[_I["all_reduce_bytes"]] = 2 * (rep - 1) / rep * n * dl * 4
  elif rep > 1:
    x[_I["all_gather_bytes"]] = (rep - 1) / rep * slots * (dl + 1) * 4
  memory = {
      "table": int(l.local_rows * (dl * e + row_extra)),
      "optimizer": int(math.ceil(l.local_rows * 4 * (dl * opt.per_element + opt.per_row))),
      "buffers": int(math.ceil(_buffer_bytes(dedup, kernel, n, u, slots, rep, dl,
                                             b * g * w, big_l, opt, forward))),
  }
  return StackCost(l.name, l.kind, tuple(l.axes), l.tables, f, w,
                   big_l, int(l.local_rows), int(dl), int(n), dedup, rep, x, memory, id_cols)


@dataclasses.dataclass(frozen=True)
class StackShare:
  """What `combine_costs` reads of one stack beside its own cost (`stack_share`; the
  planner's search caches it with the stack, `planner.pricing`).

  Attributes:
    axes, split, local_dim, dim: its axes group, (T, R, C), local dim and dim (stacks of
      one dim in one axes group share the pooled collectives: `local_ops.pool_all`).
    gather_key: its `slot_gather_key` where it all-gathers its slots over replicas (no
      dedup, replicas), else None.
    launching: its cost with that all-gather's launches counted on it (the first stack of
      its key carries them).
  """

  axes: tuple[str, ...]
  split: tuple[int, int, int]
  local_dim: int
  dim: int
  gather_key: tuple | None
  launching: StackCost


def stack_share(l, s: StackCost) -> StackShare:
  """`StackShare` of layout `l` whose own cost is `s`."""
  key, launching = None, s
  if s.replicas > 1 and not s.dedup:   # `EmbeddingCollection._gather_slots`
    key = l.slot_gather_key
    x = s.terms.copy()   # (`s`'s terms stay as `stack_cost` made them)
    x[_I["collectives"]] = len(l.split_replica_axes)
    launching = dataclasses.replace(s, terms=x)
  return StackShare(tuple(l.axes), tuple(l.size(a) for a in ("table", "row", "col")),
                    l.local_dim, l.dim, key, launching)


def combine_costs(layouts, stacks: Sequence[StackCost], batch_size: int,
                  shares: Sequence[StackShare] | None = None) -> PlanCost:
  """The plan's cost from its stacks' own (`stack_cost` of each of `layouts`, in order):
  adds the slot all-gather launches (without dedup, one per replica axis for all stacks of
  a `slot_gather_key`, counted on the first: `EmbeddingCollection._gather_slots`), the
  collectives each axes group shares, and the ids all-gather. `shares`: each stack's
  `stack_share`, if the caller has them."""
  if shares is None:
    shares = [stack_share(l, s) for l, s in zip(layouts, stacks)]
  sizes = dict(layouts[0].sizes) if layouts else {a: 1 for a in MESH_AXES}
  n_dev = math.prod(sizes.values())
  big_b = float(batch_size)
  b = big_b / n_dev
  out, groups, id_cols, gathering = [], {}, 0, set()
  for s, sh in zip(stacks, shares):
    id_cols += s.id_columns
    if sh.gather_key is not None and sh.gather_key not in gathering:
      gathering.add(sh.gather_key)
      s = sh.launching
    out.append(s)
    groups.setdefault((sh.axes, sh.dim), []).append((sh, s.width))
  group_terms = {}
  for (axes, _), members in groups.items():   # per dim: summed into the axes' terms
    sh0 = members[0][0]
    t, r, c = sh0.split
    x_bytes = t * r * c * b * sum(w for _, w in members) * sh0.local_dim * 4.0
    x = np.zeros(len(COST_TERMS))
    x[_I["collectives"]] = 2 * sum(s > 1 for s in (t, r, c))
    x[_I["reduce_scatter_bytes"]] = x_bytes * (r - 1) / r
    x[_I["all_gather_bytes"]] = x_bytes * (r - 1) / r
    x[_I["all_to_all_bytes"]] = 2 * x_bytes / r * ((t - 1) / t + (c - 1) / c)
    group_terms[axes] = group_terms.get(axes, 0) + x
  from jaxrec.embedding import layout  # pylint: disable=import-outside-toplevel
  m = layout.ids_gather_devices(layouts, [s.dedup for s in out])
  glob = np.zeros(len(COST_TERMS))
  glob[_I["const"]] = 1
  if m > 1:
    glob[_I["collectives"]] = 1
    glob[_I["all_gather_bytes"]] = big_b * id_cols * 4 * (m - 1) / n_dev
  total = glob + sum(s.terms for s in out) + sum(group_terms.values())
  return PlanCost(tuple(out), group_terms, glob, total, int(big_b * id_cols * 4 * m / n_dev))


def table_memory(load: TableLoad, kind: str, mesh: Mapping[str, int], opt) -> dict[str, int]:
  """Bytes of the table's own shard (`table`) and its optimizer state (`optimizer`: of `opt`,
  or of its entry for the table where `opt` is per table) on each holding device; stack
  padding and buffers are not counted."""
  opt = state_of(opt, load.name)
  _, r, _ = split_sizes(kind, mesh)
  rows, dl = -(-load.rows // r), local_dim(load, kind, mesh)
  extra = 8 if load.dtype == "int8" else 0
  return {"table": int(rows * (dl * load.dtype_bytes + extra)),
          "optimizer": int(math.ceil(rows * 4 * (dl * opt.per_element + opt.per_row)))}
