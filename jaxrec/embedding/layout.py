"""Stacked-table layout: how a plan's tables become a few big arrays on the mesh.

Tables with the same (dim, dtype, placement kind, sparse optimizer family, bag-size bucket)
form one *stack* (a table whose optimizer is of another family than the default's,
`optimizers.TableOptimizers`, is stacked with the tables of that family only: its stack's
name ends `_o<group>`; tables of a family that differ only in `lr` share stacks, whose
update takes each row's rate from its table, `StackLayout.rates`); for
kinds split over `table`, buckets merge where that lowers every device's id slots
(`_merge_buckets`). Per `table` slice `t`
(only for kinds that use the `table` axis; otherwise there is one slice) the slice's tables
are concatenated row-wise and padded to `slice_rows` rows, a multiple of the `row` axis
size; the slices are concatenated in order. The stacked array is
`[nt * slice_rows, padded_dim]`, rows split over the used (`table`, `row`) axes and columns
over `col`:

    stack rows: | slice 0: t_a rows | t_b rows | pad | slice 1: t_c rows | pad | ...

Column padding: a stack split over `col` whose dim is not a multiple of the `col` size
stores `padded_dim` (dim rounded up to that multiple) columns; the extra ones are zeros that
no lookup returns (stage 2 cuts the pooled activations back to `dim`), so their gradient is
zero and no optimizer changes them. Whole-row reductions (row-wise Adagrad's mean, int8
ranges) count the real columns only (`local_ops.column_mask`); `stack`/`unstack` add and
cut them, so per-table arrays and checkpoints always hold `[rows, dim]`.

The layout is pure static data (hashable), so it can be closed over by jitted functions.
Tables are initialised per table (plan-independent, so every plan starts from the same
values) and stacked; checkpoints store per-table arrays (`unstack`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrec.embedding import optimizers, stack_shape, table_init
from jaxrec.embedding.specs import FeatureSpec, TableSpec
from jaxrec.errors import ConfigError, some
from jaxrec.kernels import quant
from jaxrec.sharding.plan import KIND_AXES, MESH_AXES, Plan


@dataclasses.dataclass(frozen=True)
class TableSlot:
  """Where one table sits inside its stack."""
  name: str
  rows: int
  table_slice: int   # index along the `table` axis (0 when the stack does not use it)
  row_offset: int    # first row inside the slice


@dataclasses.dataclass(frozen=True)
class StackLayout(stack_shape.Sharded):
  """One stack: static description of its array and of the features that read it (its
  split's properties, `size`, `local_rows`, `local_dim`, `lookup_axes`, ..., are
  `stack_shape.Sharded`'s).

  Attributes:
    name: stack name, e.g. `rw_d16_float32_L1`.
    kind: placement kind shared by its tables.
    axes: model axes splitting it (subset of table/row/col, in mesh order).
    sizes: mesh axis sizes, all four axes.
    dim, dtype: shared by its tables (`dim` is the tables' real dim; the stored array may
      have more columns, `padded_dim`).
    slots: its tables.
    slice_rows: padded rows per `table` slice (multiple of the used `row` size).
    features: indices (into the collection's feature list) of features reading it.
    feature_tables: per stack feature, index into `slots`.
    max_len: bag size every stack feature is padded to.
    slot_features: `[nt_used][per_slice]` stack-feature indices handled by each slice,
      padded with -1 to the same length.
    optimizer: the sparse optimizer of its tables (its first table's where they differ in
      `lr` only; None where the layouts were built without one, e.g. by the planner for a
      plan's shape only).
    rates: per slot, its table's `lr` (a number or `Schedule`) where the tables' rates
      differ (the update then takes a rate per row, `local_ops.row_rates`); None where
      they share `optimizer.lr` (the scalar update).
  """

  name: str
  kind: str
  axes: tuple[str, ...]
  sizes: tuple[tuple[str, int], ...]
  dim: int
  dtype: str
  slots: tuple[TableSlot, ...]
  slice_rows: int
  features: tuple[int, ...]
  feature_tables: tuple[int, ...]
  max_len: int
  slot_features: tuple[tuple[int, ...], ...]
  optimizer: Any = None
  rates: tuple | None = None

  @property
  def shape(self) -> tuple[int, int]:
    return (self.num_slices * self.slice_rows, self.padded_dim)

  def real_columns(self, start: int, stop: int) -> tuple[int, int]:
    """Columns `[start, stop)` of the stored array clipped to the real ones `[0, dim)`
    (empty, `start >= stop`, for a block of padding only)."""
    return min(start, self.dim), min(stop, self.dim)

  @property
  def row_axes(self) -> tuple[str, ...]:
    return tuple(a for a in ("table", "row") if a in self.axes)

  def spec(self) -> P:
    """PartitionSpec of the stacked table `[rows, dim]`."""
    return P(self.row_axes or None, "col" if "col" in self.axes else None)

  def row_spec(self) -> P:
    """PartitionSpec of a per-row array `[rows]` (row-wise optimizer state)."""
    return P(self.row_axes or None)

  def table_spec(self):
    """PartitionSpec(s) of the stored table: `spec()`, or for int8 a `QuantizedTable` of
    specs (`q` like `spec()`, per-row `scale`/`bias` like `row_spec()`)."""
    if self.dtype == "int8":
      return quant.QuantizedTable(self.spec(), self.row_spec(), self.row_spec())
    return self.spec()

  def slot_start(self, slot: TableSlot) -> int:
    """First row of `slot`'s table in the stacked array."""
    return slot.table_slice * self.slice_rows + slot.row_offset

  def feature_row_offsets(self) -> tuple[int, ...]:
    """Per stack feature, the first row of its table inside the table's slice."""
    return tuple(self.slots[t].row_offset for t in self.feature_tables)

  def feature_rows(self) -> tuple[int, ...]:
    """Per stack feature, its table's row count (ids `>= rows` are outside the table)."""
    return tuple(self.slots[t].rows for t in self.feature_tables)


BAG_BUCKETS = (1, 4, 16)


def bag_bucket(max_len: int) -> int:
  """Stacks also group by bag size (1, <=4, <=16, larger), because every feature of a
  stack is padded to the stack's longest bag: one 20-id feature must not make 25 one-hot
  features pay for 20 slots each. (`build_layouts` merges buckets back where that is
  cheaper, see `_merge_buckets`.)"""
  for b in BAG_BUCKETS:
    if max_len <= b:
      return b
  return 1 << (int(max_len) - 1).bit_length()


def _slots_per_example(members, features, plan, nt: int) -> int:
  """W * L of a stack of tables `members` split over `nt` table slices: the most features
  on one slice times the longest bag (every device's id slots per example)."""
  names = {t.name for t in members}
  per_slice, longest = [0] * nt, 1
  for f in features:
    if f.table in names:
      per_slice[plan[f.table].table_slice if nt > 1 else 0] += 1
      longest = max(longest, f.max_len)
  return max(1, max(per_slice)) * longest


def _merge_buckets(buckets: dict, features, plan, nt: int) -> dict:
  """`{bag: [tables]}` of one (kind, dim, dtype) split over `nt` > 1 table slices → the same
  tables in fewer stacks where that lowers the id slots every device handles.

  Each device pads a stack to its widest slice (W features) and longest bag (L), so a
  stack of long bags whose tables sit on few slices costs every device W * L slots per
  example; stacks of other buckets whose tables sit on other slices can share those slots.
  From the longest bucket down, a bucket joins the current stack when W * L of the union
  is at most the sum of the two. Keys: the largest bag bucket of each merged stack."""
  out, current, cost = {}, None, 0
  for bag in sorted(buckets, reverse=True):
    tables = buckets[bag]
    own = _slots_per_example(tables, features, plan, nt)
    if current is not None:
      union = out[current] + tables
      joint = _slots_per_example(union, features, plan, nt)
      if joint <= cost + own:
        out[current], cost = union, joint
        continue
    out[bag], current, cost = list(tables), bag, own
  return out


def build_layouts(tables: Sequence[TableSpec], features: Sequence[FeatureSpec], plan: Plan,
                  mesh_shape: Mapping[str, int], optimizer=None) -> tuple[StackLayout, ...]:
  """Groups tables into stacks and places features; checks the mesh can hold the plan.
  `optimizer`: the sparse optimizer, or one per table (`optimizers.TableOptimizers`: tables
  of different optimizer families never share a stack); each stack carries its own, and
  the rates of its tables where they differ (`StackLayout.rates`)."""
  plan.check_tables([t.name for t in tables], allow_unknown=True)
  sizes = tuple((a, int(mesh_shape.get(a, 1))) for a in MESH_AXES)
  table_slices = dict(sizes)["table"]
  longest: dict[str, int] = {}   # a read table's longest bag
  reading: dict[str, list[int]] = {}   # a table's features, as indices
  for i, f in enumerate(features):
    longest[f.table] = max(longest.get(f.table, 1), f.max_len)
    reading.setdefault(f.table, []).append(i)
  keyed = []   # (table, stacking key, its bag bucket: None for a table no feature reads)
  read_bags: dict[tuple, list[int]] = {}   # bag buckets of read tables per stacking key
  for t in tables:
    placement = plan.placements[t.name]
    if "table" in KIND_AXES[placement.kind] and not 0 <= placement.table_slice < table_slices:
      raise ConfigError(f"table '{t.name}': table_slice {placement.table_slice} is outside "
                        f"mesh axis table={table_slices}")
    key = (placement.kind, t.dim, t.dtype, optimizers.group(optimizer, t.name))
    bag = bag_bucket(longest[t.name]) if t.name in longest else None
    if bag is not None:
      read_bags.setdefault(key, []).append(bag)
    keyed.append((t, key, bag))
  groups: dict[tuple, dict[int, list[TableSpec]]] = {}
  for t, key, bag in keyed:
    # a table no feature reads joins the shortest bag bucket of its kind, dim, dtype, group
    bag = bag if bag is not None else min(read_bags.get(key, [1]))
    groups.setdefault(key, {}).setdefault(bag, []).append(t)
  order = {t.name: i for i, t in enumerate(tables)}
  stacks: dict[tuple, list[TableSpec]] = {}
  for (kind, dim, dtype, opt), buckets in groups.items():
    nt = dict(sizes)["table"] if "table" in KIND_AXES[kind] else 1
    if nt > 1:
      buckets = _merge_buckets(buckets, features, plan, nt)
    for bag, members in buckets.items():
      stacks[(kind, dim, dtype, opt, bag)] = sorted(members, key=lambda t: order[t.name])

  layouts = []
  for (kind, dim, dtype, opt, bag), members in sorted(stacks.items()):
    axes = plan[members[0].name].axes
    nt = dict(sizes)["table"] if "table" in axes else 1
    nr = dict(sizes)["row"] if "row" in axes else 1
    fill = [0] * nt
    slots = []
    for t in members:
      s = plan[t.name].table_slice if nt > 1 else 0
      slots.append(TableSlot(t.name, t.rows, s, fill[s]))
      fill[s] += t.rows
    slice_rows = stack_shape.round_up(max(max(fill), 1), nr)
    slot_index = {s.name: i for i, s in enumerate(slots)}
    feats = sorted(i for s in slots for i in reading.get(s.name, ()))
    feature_tables = tuple(slot_index[features[i].table] for i in feats)
    per_slice = [[] for _ in range(nt)]
    for j, ti in enumerate(feature_tables):
      per_slice[slots[ti].table_slice].append(j)
    width = max(1, max(len(p) for p in per_slice))
    slot_features = tuple(tuple(p + [-1] * (width - len(p))) for p in per_slice)
    max_len = max([features[i].max_len for i in feats], default=1)
    layouts.append(StackLayout(
        name=stack_shape.stack_name(kind, dim, dtype, bag, opt), kind=kind,
        axes=axes, sizes=sizes, dim=dim, dtype=dtype, slots=tuple(slots),
        slice_rows=slice_rows, features=tuple(feats), feature_tables=feature_tables,
        max_len=max_len, slot_features=slot_features,
        optimizer=optimizers.of(optimizer, members[0].name),
        rates=optimizers.slot_rates(optimizer, [s.name for s in slots])))
  return tuple(layouts)


MAX_SLICE_ROWS = 2**31 - 1   # ids and local row numbers are int32


# How `stack_error` words a stack over `MAX_SLICE_ROWS` on one slice: a problem of the
# placement on this mesh, which one with a `table` axis may solve (the planner's
# `--mesh=auto` then prices other meshes).
SLICE_OVERFLOW = "rows on one table slice"


def stack_error(layouts: Sequence[StackLayout]) -> str | None:
  """Why a collection cannot be built from `layouts`, if it cannot (None when it can; the
  planner prices only such plans):
  - a stack no feature reads: an unread table must share its kind, dim and dtype with a
    read one (it then joins that one's shortest bag bucket);
  - a `table` slice of a stack holding over `MAX_SLICE_ROWS` rows: stage 1 numbers a
    slice's rows (table offset + id) in int32, which would wrap (rows read as zeros and
    never updated)."""
  return first_problem([stack_problems(l) for l in layouts])


def first_problem(problems) -> str | None:
  """Of the stacks' `stack_problems`, in stack order, the first stack's with the first kind
  of problem (the order `stack_error` reports them in), or None."""
  return next((p[check] for check in range(3) for p in problems if p[check]), None)


def stack_problems(l: StackLayout) -> tuple[str | None, str | None, str | None]:
  """`l`'s problems of each kind `stack_error` checks, in its order (None: none of that
  kind): no feature reads it; a table over `MAX_SLICE_ROWS` rows; a slice over them. Per
  stack, so the planner can cache them with the stack (`planner.pricing`)."""
  unread = None
  if not l.features:
    # a family of its own (`_o<g>` stacks): its optimizer is what no read table shares
    own = f", sparse optimizer {l.optimizer!r}" if re.search(r"_o\d+$", l.name) else ""
    unread = (f"tables {[s.name for s in l.slots]} ({l.kind}, dim {l.dim}, {l.dtype}{own}) "
              "are read by no feature, and no table a feature reads has the same kind, dim, "
              "dtype" + (" and optimizer family (its class and every setting but lr)" if own
                         else "") +
              ", whose stack they would join; add a feature for them, place them like a "
              "read table" + (", give them a read table's optimizer" if own else "") +
              ", or leave them out")
  too_long = None
  for t in l.slots:   # a table over the limit alone: no placement helps (it was named in a
    if t.rows > MAX_SLICE_ROWS:   # stack, with advice to spread the stack)
      too_long = (f"table '{t.name}' has {t.rows:,} rows, over the {MAX_SLICE_ROWS:,} that "
                  "int32 ids reach")
      break
  fill = [sum(t.rows for t in l.slots if t.table_slice == s) for s in range(l.num_slices)]
  s = max(range(l.num_slices), key=fill.__getitem__)
  overflow = None
  if fill[s] > MAX_SLICE_ROWS:
    names = [t.name for t in l.slots if t.table_slice == s]
    overflow = (f"tables [{some(names)}] ({l.kind}, dim {l.dim}, {l.dtype}) stack {fill[s]:,} "
                f"{SLICE_OVERFLOW}, over the {MAX_SLICE_ROWS:,} that int32 row numbers "
                "reach; place them on different table slices (tw, twrw, twcw, grid) or give "
                "them different kinds")
  return unread, too_long, overflow


def ids_gather_axes(layouts: Sequence[StackLayout], dedups: Sequence[bool]
                    ) -> tuple[str, ...]:
  """Axes stage 1 all-gathers the packed ids over (`MESH_AXES` order): the union of every
  stack's `lookup_axes`. Empty when no stack needs another device's ids before its
  update (e.g. `dp` with SGD): then stage 1 moves nothing."""
  need = {a for l, d in zip(layouts, dedups) for a in l.lookup_axes(d)}
  return tuple(a for a in MESH_AXES if a in need)


def ids_gather_devices(layouts: Sequence[StackLayout], dedups: Sequence[bool]) -> int:
  """How many devices' ids each device holds after stage 1's all-gather (1: none moved)."""
  axes = ids_gather_axes(layouts, dedups)
  return math.prod(dict(layouts[0].sizes)[a] for a in axes) if axes else 1


def init_table(key: jax.Array, spec: TableSpec):
  """`[rows, dim]` uniform in `[-scale, scale)`, keyed by the table name
  (`table_init`): f32 values (the same for every dtype) rounded to `spec.dtype` (int8: a
  `QuantizedTable`)."""
  return _to_dtype(table_init.table_values(key, spec.name, spec.rows, spec.dim, spec.scale),
                   spec.dtype)


def init_stack(key: jax.Array, layout: StackLayout, specs: Sequence[TableSpec]):
  """The stacked array of `init_table` for every slot (`specs` in slot order), built in
  place by one kernel (`table_init.stack_values`); equal to `stack` of the tables."""
  values = table_init.stack_values(key, layout, [s.scale for s in specs])
  if layout.dtype == "int8" and layout.padded_dim > layout.dim:   # row ranges: real columns
    return pad_columns(layout, quant.quantize(values[:, :layout.dim]))
  return _to_dtype(values, layout.dtype)


def _to_dtype(x: jax.Array, dtype: str):
  return quant.quantize(x) if dtype == "int8" else x.astype(dtype)


def stack(layout: StackLayout, per_table: Mapping[str, Any]):
  """Per-table arrays (`[rows, ...]`, or pytrees of them such as `QuantizedTable`) → the
  stacked array(s) `[nt * slice_rows, ...]`."""
  parts = [per_table[slot.name] for slot in layout.slots]
  return pad_columns(layout, jax.tree.map(lambda *xs: _stack_array(layout, xs), *parts))


def pad_columns(layout: StackLayout, tree):
  """`[rows, dim]` leaves of `tree` → `[rows, padded_dim]` (zero columns appended); per-row
  leaves `[rows]` unchanged."""
  extra = layout.padded_dim - layout.dim
  if not extra:
    return tree
  return jax.tree.map(lambda x: jnp.pad(x, ((0, 0), (0, extra))) if x.ndim == 2 else x, tree)


def _stack_array(layout, arrays):
  pieces = []
  trailing, dtype = arrays[0].shape[1:], arrays[0].dtype
  for s in range(layout.num_slices):
    used = 0
    for slot, x in zip(layout.slots, arrays):
      if slot.table_slice == s:
        pieces.append(x)
        used += slot.rows
    if layout.slice_rows > used:
      pieces.append(jnp.zeros((layout.slice_rows - used, *trailing), dtype))
  return jnp.concatenate(pieces, axis=0)


def unstack(layout: StackLayout, stacked) -> dict[str, Any]:
  """The stacked array (or pytree, as `stack` returns) → per-table `{name: [rows, ...]}`.
  Each leaf is cut by one compiled program (`_cutter`): sliced op by op, every table's
  rows and then its columns were a program of their own to compile, the largest share of
  the compiles of a test that compares tables."""
  leaves, treedef = jax.tree.flatten(stacked)
  cut = [_cutter(layout)(x) for x in leaves]
  return {slot.name: treedef.unflatten([c[slot.name] for c in cut]) for slot in layout.slots}


@functools.lru_cache(maxsize=256)
def _cutter(layout: StackLayout):
  """jit of `x [stacked rows, ...] → {table: [rows, ...]}` (2-D leaves cut to the dim)."""
  def cut(x):
    out = {}
    for slot in layout.slots:
      start = layout.slot_start(slot)
      piece = x[start:start + slot.rows]
      out[slot.name] = piece[:, :layout.dim] if piece.ndim == 2 else piece
    return out
  return jax.jit(cut)


def table_sharding(mesh: Mesh, layout: StackLayout):
  """NamedSharding(s) of the stacked table (a `QuantizedTable` of them for int8)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), layout.table_spec(),
                      is_leaf=lambda x: isinstance(x, P))


def bytes_per_row(layout: StackLayout) -> int:
  """Stored bytes per table row, padding columns included (int8 adds its f32 scale and
  bias)."""
  if layout.dtype == "int8":
    return layout.padded_dim + 8
  return layout.padded_dim * jnp.dtype(layout.dtype).itemsize


def describe(layouts: Sequence[StackLayout]) -> str:
  lines = []
  for l in layouts:
    pad = (f" (dim {l.dim} padded to {l.padded_dim} for col={l.size('col')})"
           if l.padded_dim > l.dim else "")
    lines.append(f"{l.name}: {len(l.slots)} tables, {len(l.features)} features, "
                 f"array {l.shape}{pad} split over {l.axes or 'nothing (replicated)'}, "
                 f"local shard [{l.local_rows}, {l.local_dim}], "
                 f"{l.shape[0] * bytes_per_row(l) / 2**20:.1f} MiB total")
  return "\n".join(lines)
