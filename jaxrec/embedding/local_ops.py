"""Per-device code of the collection's three stages (each runs inside `shard_map`).

`l` is the stack's `StackLayout`, `opts` the collection's resolved `EmbeddingOptions`.
Shapes: nd, nt, nr, nc = sizes of the data/table/row/col mesh axes (1 for axes the stack
does not use), b = examples per device, F_s = the stack's features, Ft = features per
table slice, L = bag size, n = unique-row capacity, dl = local dim (`padded_dim / nc`;
the last col devices' columns may be padding, `column_mask`).

Kernels (`opts.kernel`):
- stage 2 pooling with `pallas` is `kernels.lookup_pool` with the unique rows as the
  table and `inverse` as ids, under a custom VJP whose backward is the segment-sum of
  `w * g` over the ids (what XLA's autodiff of the gather gives);
- stage 3 with `pallas` runs the fused `kernels.sparse_update` for SGD / Adagrad /
  RowWiseAdagrad, each unique row a one-slot bag of weight 1. RowWiseAdagrad and int8
  re-quantisation need whole-row reductions (a psum / pmin / pmax over `col`), so with
  split columns they stay on XLA, as do Adam and FTRL. A stack of tables that differ only
  in `lr` (`StackLayout.rates`) passes each unique row's rate to the kernel (`lr_rows`),
  scheduled ones too, and so does a stack of one scheduled rate (its value at the step,
  the same for every row: the kernel takes compile-time hyperparameters otherwise).

Per-table rates: where a stack's tables have different rates, stage 3 gathers each row's
rate (`row_rates`: its table found from the slots' static row offsets) into f32 `[n]` and
the optimizer takes it instead of its own `lr` (`optimizers`' `lr` argument); a stack of
one rate takes the scalar, as with a single optimizer.

Reduced precision:
- tables: rows are read as f32 (stage 1), updated in f32 and rounded back to the stored
  dtype (to nearest, or stochastically with `opts.stochastic_rounding`); int8 tables are
  re-quantised per row (`kernels.QuantizedTable`).
- communication (`opts.comm_dtype`): None moves f32 with `psum_scatter` / `all_to_all`.
  A reduced dtype sends every hop with `kernels.all_to_all_compressed` (fp8/fp16: per-row
  scales), forward and backward; the `row` reduction becomes all-to-all + an f32 sum, so
  each partial sum is rounded once and the sum itself is exact.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec import kernels
from jaxrec.embedding import layout as layout_lib
from jaxrec.kernels import quant
from jaxrec.kernels.quant import QuantizedTable
from jaxrec.schedules import rate_at
from jaxrec.sharding.plan import MESH_AXES

FUSED_OPTIMIZERS = ("SGD", "Adagrad", "RowWiseAdagrad")
# Stochastic rounding's key (with the step, `quant.seed_from`): the same for every stack and
# shard, whose bits differ by their rows' and columns' keys (`rounding_rows`/`_cols`).
ROUNDING_KEY = functools.partial(jax.random.key, 0)


# ---------------------------------------------------------------------------- helpers
def axis_index(l, axis):
  return jax.lax.axis_index(axis) if l.size(axis) > 1 else 0


def group_slice(l, x):
  """`[nd, nt, nr, nc, ...]` → keep model axes, take this device's index on replica axes."""
  for pos, axis in enumerate(MESH_AXES):
    if axis not in l.axes and x.shape[pos] > 1:
      x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis), 1, axis=pos)
  return x


def select_features(l, x, fill):
  """`[..., F_s, L]` → `[..., Ft, L]`: the features whose tables sit on this table slice."""
  slots = np.array(l.slot_features, np.int32)
  if l.num_slices == 1 and np.array_equal(slots[0], np.arange(x.shape[-2])):
    # Every feature, in order (one slice: `dp`, `rw`, `cw`, one device). The identity
    # gather would otherwise stay in the lookup's fusion, where XLA:CPU recomputes it
    # (and its transpose to batch-major) for every element of every row it reads.
    return x, jnp.asarray(slots[0])
  slot_features = jnp.asarray(slots)
  sel = slot_features[axis_index(l, "table")] if l.num_slices > 1 else slot_features[0]
  picked = jnp.take(x, jnp.maximum(sel, 0), axis=-2)
  return jnp.where((sel >= 0)[:, None], picked, fill), sel


def column_mask(l):
  """bool `[dl]`: which of this device's columns are real (`< l.dim`); None when the stack
  stores no padding columns (`layout` module docstring)."""
  if l.padded_dim == l.dim:
    return None
  first = axis_index(l, "col") * l.local_dim
  return first + jnp.arange(l.local_dim) < l.dim


def unsigned(x):
  """int32 → uint32, same bits: `unsigned(x) < n` is `0 <= x < n` for n <= 2**31."""
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


def slice_feature_tables(l, sel):
  """Per feature of this table slice (`sel`, -1 for padding: 0, 0), its table's first row in
  the slice (int32) and its row count (uint32): numpy constants on one slice, where XLA
  then folds them into the lookup's index arithmetic."""
  offsets = np.array(l.feature_row_offsets(), np.int32)
  rows = np.array(l.feature_rows(), np.uint32)
  xp, sel = (np, np.array(l.slot_features[0])) if l.num_slices == 1 else (jnp, sel)
  pick = xp.maximum(sel, 0)
  return tuple(xp.where(sel >= 0, xp.asarray(a)[pick], a.dtype.type(0)) for a in (offsets, rows))


def read_rows(table, uniq):
  """f32 rows `[n, dl]` of the local shard (dense or `QuantizedTable`); rows outside the
  shard (the sentinel) read as 0."""
  # `uniq` is never negative (the sentinel is `local_rows`): no wrap-around select, which
  # XLA:CPU would recompute for every element of the gather's fusion.
  take = lambda x: x.at[uniq].get(mode="fill", fill_value=0, wrap_negative_indices=False)
  if isinstance(table, QuantizedTable):
    return (take(table.q).astype(jnp.float32) * take(table.scale)[:, None]
            + take(table.bias)[:, None])
  return take(table).astype(jnp.float32)


# ---------------------------------------------------------------------------- stage 1
def lookup_all(layouts, dedups, packing, tables, packed):
  """Stage 1 for every stack: one all-gather of the ids over the axes some stack needs
  (`layout.ids_gather_axes`; none for `dp` without dedup), then per stack `lookup_stack`.

  packed `[b, S]` int32: every feature's ids `[b, max_len]` (-1 padded), then the f32 bits
  of weighted features' per-id weights (`collection.Packing` says where). Returns
  `{stack: (rows, uniq, inverse, weights)}` as `lookup_stack` does."""
  axes = layout_lib.ids_gather_axes(layouts, dedups)
  sizes = dict(layouts[0].sizes)
  shape = tuple(sizes[a] if a in axes else 1 for a in MESH_AXES)
  if axes:
    packed = jax.lax.all_gather(packed, axes, axis=0, tiled=False)
  gathered = packed.reshape(shape + packed.shape[-2:])    # [nd,nt,nr,nc,b,S], 1 if not gathered
  out = {}
  for l, dedup, pk in zip(layouts, dedups, packing):
    n_feat, bag = len(l.features), l.max_len
    cols = pk.columns(packed.shape[-1], bag)
    if cols is None:   # one contiguous [F_s * L] block
      ids = gathered[..., pk.id_starts[0]:pk.id_starts[0] + n_feat * bag]
      ids = ids.reshape(ids.shape[:-1] + (n_feat, bag))                  # [nd,...,b,F_s,L]
    else:              # features of shorter bags: pad them to L here, not on the wire
      pad = np.arange(bag)[None] >= np.array(pk.lens)[:, None]           # [F_s, L]
      ids = jnp.where(pad, -1, jnp.take(gathered, cols, axis=-1))
    out[l.name] = lookup_stack(l, dedup, tables[l.name], ids, gathered, pk)
  return out


def pooling_weights(pk, ids, gathered, rows):
  """Pooling weight of every slot `[..., F_s, L]`: 0 for absent ids (-1, or outside the
  feature's table: `rows` uint32 `[F_s]`, as stage 1 counts them), the feature's per-id
  weight (f32 bits in `gathered` columns `pk.weight_starts`) if weighted, divided by the
  bag's id count for mean pooling."""
  valid = unsigned(ids) < rows[:, None]
  w = valid.astype(jnp.float32)
  starts = np.array(pk.weight_starts)
  if (starts >= 0).any():
    cols = np.maximum(starts, 0)[:, None] + np.arange(ids.shape[-1])[None]   # [F_s, L]
    cols = np.minimum(cols, gathered.shape[-1] - 1)   # slots past a bag: ids -1, weight 0
    explicit = jax.lax.bitcast_convert_type(jnp.take(gathered, cols, axis=-1), jnp.float32)
    w = jnp.where(jnp.asarray(starts >= 0)[:, None], jnp.where(valid, explicit, 0.0), w)
  if any(pk.mean):
    count = jnp.maximum(valid.sum(axis=-1, keepdims=True), 1).astype(jnp.float32)
    w = jnp.where(jnp.asarray(np.array(pk.mean))[:, None], w / count, w)
  return w


def lookup_stack(l, dedup, table, ids_all, gathered, pk):
  """One stack's stage 1. table `[local_rows, dl]`; ids_all `[nd, nt, nr, nc, b, F_s, L]`
  (the ids of the devices along `ids_gather_axes`, size 1 on the other axes) → (rows f32
  `[n, dl]`, uniq `[1, n]`, inverse and weights `[1, nt, nr, nc, b, Ft, L]` for the
  examples of this device's model-parallel group).

  With `dedup`, `uniq` holds each local row once (n = min(slots, local_rows + 1): at most
  every row plus the sentinel) and replicas of a shard read the same rows. Without, every
  slot of this device's group is its own entry, in order (no sort; `inverse` is an iota),
  and duplicates are summed by stage 3's scatter-add; stage 3 all-gathers these slots and
  their SGD deltas over the replicas (`gather_replicas`), so each replica applies all of
  them."""
  ids_sel, sel = select_features(l, ids_all, -1)                        # [nd,nt,nr,nc,b,Ft,L]
  sentinel = l.local_rows
  offsets, rows_of = slice_feature_tables(l, sel)
  # `0 <= id < rows` in one unsigned compare: an id outside its table (never past the
  # host's `check_ids`) reads 0 and is not updated, never another table's row.
  row = ids_sel + offsets[:, None]
  ok = unsigned(ids_sel) < rows_of[:, None]
  if "row" in l.axes:
    row = row - axis_index(l, "row") * l.local_rows
    ok = ok & (unsigned(row) < l.local_rows)
  local = jnp.where(ok, row, sentinel)
  if dedup:
    uniq, inv = unique_inverse(local.reshape(-1), min(local.size, l.local_rows + 1),
                               sentinel)
    inv = group_slice(l, inv.reshape(local.shape))                      # [1,nt,nr,nc,b,Ft,L]
  else:
    group = group_slice(l, local)                                       # [1,nt,nr,nc,b,Ft,L]
    uniq = group.reshape(-1)
    inv = jnp.arange(group.size, dtype=jnp.int32).reshape(group.shape)
  rows = read_rows(table, uniq)
  w = pooling_weights(pk, group_slice(l, ids_all), group_slice(l, gathered),
                      np.array(l.feature_rows(), np.uint32))
  w_sel, _ = select_features(l, w, 0.0)
  return rows, uniq[None], inv, w_sel


def unique_inverse(x, size: int, fill: int):
  """`jnp.unique(x, size=size, fill_value=fill, return_inverse=True)` for int `x [n]`
  whose values are at most `fill` and have at most `size` distinct values: (ascending
  distinct values padded with `fill` `[size]`, each element's index in them `[n]`).

  On CPU it sorts the keys alone and finds each element's index by a binary search:
  XLA:CPU sorts keys with a payload (the positions `jnp.unique` carries for the inverse)
  ~4x slower than keys alone (13,312 ids: 2.5 ms against 0.7 ms for this). Elsewhere
  `jnp.unique` (one sort with the payload, cheap on GPU)."""
  def by_search(x):
    s = jax.lax.sort(x, is_stable=False)   # keys alone: order among equals is moot
    first = jnp.concatenate([jnp.ones(1, bool), s[1:] != s[:-1]])
    at = jnp.where(first, jnp.cumsum(first) - 1, size)               # past the end: dropped
    uniq = jnp.full(size, fill, x.dtype).at[at].set(s, mode="drop")
    return uniq, jnp.searchsorted(uniq, x, method="scan").astype(jnp.int32)

  def by_unique(x):
    uniq, inv = jnp.unique(x, size=size, fill_value=fill, return_inverse=True)
    return uniq, inv.reshape(x.shape).astype(jnp.int32)

  return jax.lax.platform_dependent(x, cpu=by_search, default=by_unique)


# ---------------------------------------------------------------------------- stage 2
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def pool_kernel(rows, idx, w, interpret):
  """`kernels.lookup_pool` (Pallas) of `rows [n, dl]` for bags `idx, w [N, L]` (ids in
  `[0, n)`) → f32 `[N, dl]`, differentiable in `rows` and `w`."""
  return kernels.lookup_pool(rows, idx, w, kernel="pallas", interpret=interpret)


def _pool_kernel_fwd(rows, idx, w, interpret):
  return pool_kernel(rows, idx, w, interpret), (rows, idx, w)


def _pool_kernel_bwd(interpret, res, g):
  del interpret
  rows, idx, w = res
  d_rows = jax.ops.segment_sum((w[..., None] * g[:, None, :]).reshape(-1, g.shape[-1]),
                               idx.reshape(-1), num_segments=rows.shape[0])
  d_w = jnp.einsum("nld,nd->nl", jnp.take(rows, idx, axis=0), g)
  return d_rows.astype(rows.dtype), None, d_w.astype(w.dtype)


pool_kernel.defvjp(_pool_kernel_fwd, _pool_kernel_bwd)


def pool_all(layouts, opts, dedups, packing, rows, inv, w):
  """Stage 2 for every stack: `[b, F, dim]` for this device's examples, features in
  collection order (a stack's feature `f` is the collection's `l.features[f]`). Stacks of
  one dim split over the same axes send their partial sums home in one set of collectives
  (concatenated along the feature axis). `dim` is the widest stack's: a narrower stack's
  features are padded with zero columns. The groups' results, flattened to
  `[b, slots, dim]`, are put in collection order by one `select`."""
  dim = max(l.dim for l in layouts)
  groups: dict[tuple, list] = {}
  for l, dedup, pk in zip(layouts, dedups, packing):
    groups.setdefault((l.axes, l.dim), []).append((l, dedup, pk))
  source = np.full(sum(len(l.features) for l in layouts), -1)   # feature -> slot in `flat`
  flat, base = [], 0
  for members in groups.values():
    stacks = [l for l, _, _ in members]
    parts = [pool_partial(l, opts, dedup, pk.plain_sum, rows[l.name], inv[l.name],
                          w[l.name]) for l, dedup, pk in members]
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=4)
    x = send_home(stacks[0], opts.comm_dtype, x)                  # [b, nt, Ft_all, padded_dim]
    x = x[..., :stacks[0].dim]   # padding columns: never seen, so their gradient is zero
    nt, ft_all = x.shape[1], x.shape[2]
    start = 0
    for l, part in zip(stacks, parts):
      for s, fs in enumerate(l.slot_features):
        for j, f in enumerate(fs):
          if f >= 0:
            source[l.features[f]] = base + s * ft_all + start + j
      start += part.shape[4]
    x = x.reshape(x.shape[0], nt * ft_all, x.shape[-1])            # [b, nt*Ft_all, dim_g]
    flat.append(x if x.shape[-1] == dim else
                jnp.pad(x, ((0, 0), (0, 0), (0, dim - x.shape[-1]))))
    base += nt * ft_all
  assert (source >= 0).all(), source
  return select(flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=1),
                tuple(int(k) for k in source))


def select(x, index: tuple[int, ...]):
  """`x[:, index]` (`x [b, n, ...]`, `index` distinct positions in `[0, n)`), `x` itself
  where `index` is the identity. Its gradient is a gather too (each position's gradient
  read from where it went, zero for positions not selected): XLA would transpose a gather
  into a scatter-add into zeros, which XLA:CPU runs element by element."""
  if index == tuple(range(x.shape[1])):
    return x
  return _select(x, index, x.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _select(x, index, n):
  del n   # `x.shape[1]`, for the gradient's shape
  return x[:, np.array(index)]


def _select_fwd(x, index, n):
  return _select(x, index, n), None


def _select_bwd(index, n, _, g):
  back = np.full(n, len(index))   # not selected: the zero row appended below
  back[np.array(index)] = np.arange(len(index))
  g = jnp.concatenate([g, jnp.zeros_like(g[:, :1])], axis=1)
  return (g[:, back],)


_select.defvjp(_select_fwd, _select_bwd)


def pool_partial(l, opts, dedup, plain_sum, rows, inv, w):
  """Partial pooled sums `[nt, nr, nc, b, Ft, dl]` of one stack's `rows [n, dl]` for the
  examples of this device's group (`inv`, `w` `[1, nt, nr, nc, b, Ft, L]`).

  `plain_sum` (`Packing.plain_sum`: no weighted or mean features): every weight is 1 for a
  present id and 0 for an absent one, whose row reads as 0 (the sentinel), so the XLA
  paths just add the rows (exactly the same sums; the gradient differs only on sentinel
  slots, which stage 3 drops). XLA:CPU would otherwise recompute the weights from the ids
  for every element of the rows it gathers."""
  inv, w = inv[0], w[0]                                                  # [nt,nr,nc,b,Ft,L]
  weigh = (lambda x: x) if plain_sum else (lambda x: x * w[..., None])
  if not dedup:
    # Without dedup `rows` holds this group's slots in order (`inv` is an iota): a
    # reshape, whose transpose is a reshape, not a gather whose transpose is a
    # scatter-add into a zeroed `[n, dl]`.
    return weigh(rows.reshape(inv.shape + rows.shape[-1:])).sum(axis=-2)
  if opts.kernel == "pallas":
    bags = inv.shape[:-1]
    return pool_kernel(rows, inv.reshape(-1, inv.shape[-1]), w.reshape(-1, w.shape[-1]),
                       opts.interpret).reshape(bags + rows.shape[-1:])
  return weigh(jnp.take(rows, inv, axis=0)).sum(axis=-2)


def send_home(l, comm_dtype, x):
  """Partial pooled `[nt, nr, nc, b, Ft, dl]` → this device's `[b, nt, Ft, nc*dl]`:
  sum over `row`, features over `table` and columns over `col` to the examples' device."""
  def a2a(x, axis, split, concat):
    if comm_dtype is None:
      return jax.lax.all_to_all(x, axis, split, concat, tiled=True)
    return kernels.all_to_all_compressed(x, axis, split, concat, comm_dtype, True)

  nt, ft = x.shape[0], x.shape[4]
  if "row" in l.axes:
    if comm_dtype is None:
      x = jax.lax.psum_scatter(x, "row", scatter_dimension=1, tiled=True)
    else:   # all-to-all of the partial sums, added in f32: exact but for their rounding
      x = a2a(x, "row", 1, 1).sum(axis=1, keepdims=True)
  if "table" in l.axes:
    x = a2a(x, "table", 0, 4)                                            # [1,1,nc,b,nt*Ft,dl]
  if "col" in l.axes:   # column block k comes from col device k: keep it as axis 2 (fp8/
    x = a2a(x, "col", 2, 2)  # fp16 scales are per row: the last axis cannot be concatenated)
  x = jnp.moveaxis(x, 2, 4)                                              # [1,1,b,nt*Ft,nc,dl]
  return x.reshape((x.shape[2], nt, ft, -1))


# ---------------------------------------------------------------------------- stage 3
def fused_update_ok(l, optimizer) -> bool:
  """Whether `kernels.sparse_update` can run stage 3 of this stack (see module doc)."""
  name = type(optimizer).__name__
  if name not in FUSED_OPTIMIZERS:
    return False
  return "col" not in l.axes or (name != "RowWiseAdagrad" and l.dtype != "int8")


def slice_slots(l, local, values):
  """For local rows `local [n]` of this device's table slice, by the stack slot (table)
  holding each: `(row, start, value)`, each `[n]`: the row in the slice (the local row
  offset by this device's `row` shard), that slot's first row in the slice, and its entry
  of `values` (one int in [0, 2**32) per `l.slots`; uint32). A slice's tables are
  contiguous, so a row's table is the last one starting at or before it; rows past the
  slice's tables (padding, the sentinel) get its last table's, and are never stored.
  (`row_rates` and `rounding_rows` find their rows' tables so.)"""
  per_slice = [sorted((s.row_offset, values[i]) for i, s in enumerate(l.slots)
                      if l.num_slices == 1 or s.table_slice == t) for t in range(l.num_slices)]
  width = max(len(p) for p in per_slice)
  pad = lambda p: p + [(np.iinfo(np.int32).max, 0)] * (width - len(p))   # never chosen
  starts, vals = np.array([pad(p) for p in per_slice], np.int64).transpose(2, 0, 1)  # [nt, w]
  t = axis_index(l, "table")
  starts = jnp.asarray(starts.astype(np.int32))[t]
  row = local + axis_index(l, "row") * l.local_rows
  # comparing with every start is the fastest for a few tables (26 SGD tables, every slot's
  # rate: 0.43 ms a step against 0.55 for the default binary search, 0.37 with one rate)
  method = "compare_all" if width <= 64 else "scan"
  which = jnp.clip(jnp.searchsorted(starts, row, side="right", method=method) - 1, 0, width - 1)
  return row, starts[which], jnp.asarray(vals.astype(np.uint32))[t][which]


def row_rates(l, local, step):
  """f32 `[n]`: the learning rate at `step` of the table of each local row `local [n]` of a
  stack whose tables' rates differ (`l.rates`, per slot; `slice_slots` finds the table)."""
  distinct = list(dict.fromkeys(l.rates))
  _, _, which_rate = slice_slots(l, local, [distinct.index(r) for r in l.rates])
  rates = jnp.stack([jnp.asarray(rate_at(r, step), jnp.float32) for r in distinct])
  return rates[which_rate]


def rounding_rows(l, uniq, slot_rows=None):
  """uint32 `[n]` row keys of stochastic rounding's bits for local rows `uniq [n]`: the
  crc32 of the row's table name xor its row in that table, the same on every plan and mesh
  (rows past the slice's tables, e.g. the sentinel, get keys of the slice's last table:
  they are never stored). An offloaded table's rows in the stack are cache slots: its
  table row is `slot_rows[table][slot]` (`{table: uint32 [cache_rows]}`, the low 32 bits,
  `OffloadTier.step_args`), so it gets the bits it gets in memory."""
  row, start, name = slice_slots(l, uniq, [zlib.crc32(s.name.encode()) for s in l.slots])
  within = (row - start).astype(jnp.uint32)
  for s in l.slots:
    if s.name in (slot_rows or {}):
      slot = row - s.row_offset
      cached = unsigned(slot) < s.rows
      if l.num_slices > 1:
        cached = cached & (axis_index(l, "table") == s.table_slice)
      table_row = jnp.take(slot_rows[s.name], jnp.clip(slot, 0, s.rows - 1))
      within = jnp.where(cached, table_row, within)
  return name ^ within


def rounding_cols(l):
  """int32 `[dl]`: this device's columns' indices in the table (stochastic rounding's bits)."""
  return axis_index(l, "col") * l.local_dim + jnp.arange(l.local_dim, dtype=jnp.int32)


def update(l, optimizer, opts, dedup, table, opt_state, rows, uniq, grads, step,
           slot_rows=None):
  """Stage 3: optimizer step on the unique rows `uniq [1, n]` of the local shard
  (without `dedup`: per slot, scatter-added, for SGD — see `lookup`).

  table `[local_rows, dl]` (or `QuantizedTable`); rows f32 `[n, dl]` (the values read in
  stage 1); grads f32: with dedup `[n, dl]`, the unique rows' gradients before their psum
  over replicas; without, the slots' gradients `[n, dl]`, or for a stack with replicas
  every slot's delta of the replica group, `[R, g, dl]` at slots `uniq [R, g]`, already
  all-gathered by the collection (`gather_replicas`). `slot_rows`: of this stack's
  offloaded tables (`rounding_rows`)."""
  if not dedup:   # SGD (float32, xla kernel): linear in the gradient, so duplicate slots'
    if not l.split_replica_axes:                        # deltas add up in the scatter
      uniq = uniq[0]
      grads = slot_deltas(l, optimizer, grads, uniq, step)
    return table.at[uniq].add(grads.astype(table.dtype), mode="drop"), opt_state
  uniq = uniq[0]
  if l.split_replica_axes:
    grads = jax.lax.psum(grads, l.split_replica_axes)
  key = ROUNDING_KEY() if opts.stochastic_rounding else None
  lr = None if l.rates is None else row_rates(l, uniq, step)   # [n]: per row
  if opts.kernel == "pallas" and fused_update_ok(l, optimizer):
    if lr is None and callable(optimizer.lr):   # a schedule's rate at `step`, a traced
      lr = jnp.full(uniq.shape, rate_at(optimizer.lr, step), jnp.float32)  # value: per row
    idx = jnp.where(uniq < l.local_rows, uniq, -1)[:, None]
    bit_rows = None if key is None else rounding_rows(l, uniq, slot_rows)[:, None]
    fused = kernels.coerce(optimizer if lr is None else dataclasses.replace(optimizer, lr=0.0))
    return kernels.sparse_update(table, opt_state, idx, jnp.ones(idx.shape, jnp.float32),
                                 grads, fused, step, key=key,
                                 kernel="pallas", interpret=opts.interpret,
                                 bit_rows=bit_rows, col_offset=rounding_cols(l)[0],
                                 lr_rows=None if lr is None else lr[:, None])
  mask = column_mask(l)
  real = (lambda x: x) if mask is None else (lambda x: jnp.where(mask, x, 0.0))
  if "col" in l.axes:   # over the real columns only (`optimizers.dim_full` counts them)
    dim_sum = lambda x: jax.lax.psum(real(x).sum(axis=-1), "col")
  else:
    dim_sum = lambda x: x.sum(axis=-1)
  state_rows = {k: jnp.take(v, uniq, axis=0, mode="fill", fill_value=0)
                for k, v in opt_state.items()}
  new_rows, new_state = optimizer.update(rows, grads, state_rows, step, dim_sum, lr)
  bits = None
  if key is not None:
    bits = quant.random_bits(quant.seed_from(key, step), rounding_rows(l, uniq, slot_rows),
                             rounding_cols(l))
  table = store_rows(l, table, uniq, new_rows, bits)
  opt_state = {k: opt_state[k].at[uniq].set(new_state[k].astype(opt_state[k].dtype),
                                             mode="drop") for k in opt_state}
  return table, opt_state


def slot_deltas(l, optimizer, grads, slots, step):
  """SGD's change to each slot's row, `[g, dl]`, from its gradient `grads [g, dl]` at local
  rows `slots [g]` (each its table's rate where the stack's rates differ)."""
  return optimizer.delta(grads, step, None if l.rates is None else row_rates(l, slots, step))


def gather_replicas(layouts, step, grads, uniqs):
  """Without dedup: each stack's slots of this device's group, `uniqs` `[1, g]` int32 and
  their gradients `grads` `[g, dl]`, → every slot of its replica group and its SGD delta
  (`[R, g]` and `[R, g, dl]`, R = replicas, in mesh order), for stacks sharing
  `slot_gather_key`: side by side, one all-gather per replica axis for all of them. The
  slot numbers ride in extra rows of `dl` columns (the payload is int32: deltas travel as
  their bits, exactly), so they cost no collective of their own (stage 1 did not gather
  the replicas' ids). Each replica pooled a disjoint part of the batch, so this is the psum
  of the zero-padded deltas at a fraction of the bytes. Each replica turns its own
  slots' gradients into deltas before the gather (`slot_deltas`, R times fewer than after
  it), and the update scatter-adds each replica's block as gathered (a flat `[R * g, dl]`
  took every device a reshaping copy of the gathered block; on 8 CPU devices the two cut
  `dlrm_synthetic`'s `dp` step by 2–8%, docs/benchmarks.md)."""
  l0 = layouts[0]
  gs, dl = l0.group_shape, grads[0].shape[-1]
  parts, sizes = [], []
  for l, g, u in zip(layouts, grads, uniqs):
    g = slot_deltas(l, l.optimizer, g, u[0], step)
    g = jax.lax.bitcast_convert_type(g, jnp.int32).reshape(gs + (-1, dl))  # [.., b*Ft*L, dl]
    u = u.reshape(gs + (-1,))
    k, pad = u.shape[-1], -u.shape[-1] % dl
    u = jnp.pad(u, [(0, 0)] * len(gs) + [(0, pad)]).reshape(gs + (-1, dl))
    parts += [g, u]
    sizes.append((k, u.shape[-2]))
  x = jnp.concatenate(parts, axis=-2)
  for axis in l0.split_replica_axes:
    x = jax.lax.all_gather(x, axis, axis=MESH_AXES.index(axis), tiled=True)
  out_g, out_u, start = [], [], 0
  for k, id_rows in sizes:
    g = x[..., start:start + k, :].reshape(-1, k, dl)                          # [R, g, dl]
    out_g.append(jax.lax.bitcast_convert_type(g, jnp.float32))
    ids = x[..., start + k:start + k + id_rows, :].reshape(x.shape[:-2] + (-1,))[..., :k]
    out_u.append(ids.reshape(-1, k))
    start += k + id_rows
  return tuple(out_g), tuple(out_u)


def store_rows(l, table, uniq, new_rows, bits=None):
  """Writes f32 `new_rows [n, dl]` at local rows `uniq` (sentinel dropped), rounded to the
  table's dtype: to nearest, or stochastically given uint32 `bits [n, dl]`."""
  put = lambda arr, val: arr.at[uniq].set(val, mode="drop")
  if not isinstance(table, QuantizedTable):
    return put(table, quant.cast_store(new_rows, table.dtype, bits))
  mask = column_mask(l)
  if mask is None:
    lo, hi = new_rows.min(axis=-1), new_rows.max(axis=-1)
  else:   # the row's range over its real columns; padding columns stored as 0 (clipped)
    new_rows = jnp.where(mask, new_rows, 0.0)
    lo = jnp.where(mask, new_rows, jnp.inf).min(axis=-1)
    hi = jnp.where(mask, new_rows, -jnp.inf).max(axis=-1)
  if "col" in l.axes:   # one scale and bias for the whole row
    lo, hi = jax.lax.pmin(lo, "col"), jax.lax.pmax(hi, "col")
  u = 0.5 if bits is None else quant.uniform(bits)
  q, scale, bias = quant.quantize_with_range(new_rows, lo, hi, u)
  return QuantizedTable(put(table.q, q), put(table.scale, scale), put(table.bias, bias))
