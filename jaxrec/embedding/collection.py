"""The sharded embedding collection: lookup + pooling on the mesh, sparse update.

One training step touches the tables in three `shard_map` stages, so that autodiff sees
only the rows a batch uses (never a dense `[rows, dim]` gradient):

1. `lookup` (no gradient). Every device all-gathers the int32 ids of the global batch
   (the only thing that moves), keeps the features whose tables sit on its `table` slice,
   turns ids into local row numbers (rows it does not own become a sentinel), deduplicates
   them (`unique`) and gathers the unique rows from its shard:
   `rows [n, dim/col]` per device. Replicas of a shard see the same unique set.
2. `pool` (differentiable in `rows`). Each device pools the rows for its model-parallel
   group's part of the batch, `[group, batch/dev, features_on_slice, dim/col]`, and sends
   the pooled activations home: `psum_scatter` over `row` (partial sums of row shards),
   `all_to_all` over `table` (features to the devices holding their examples) and over
   `col` (column shards concatenated). Result `[batch, features, dim]` split over batch.
3. `apply_gradients`. The gradient w.r.t. `rows` (what autodiff of stage 2 returns) is
   summed over the stack's replica axes (`psum`), then the sparse optimizer updates just
   the unique rows of the local shard, identically on every replica.

The collection is static configuration (hashable); all state is in the pytree
`EmbeddingState = {"tables": {stack: [rows, dim]}, "opt": {stack: {name: array}}}`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrec.embedding import layout as layout_lib
from jaxrec.embedding.specs import FeatureSpec, TableSpec, validate
from jaxrec.errors import ConfigError, DataError
from jaxrec.sharding.mesh import BATCH_AXES, mesh_shape
from jaxrec.sharding.plan import MESH_AXES, Plan

EmbeddingState = dict
PER_DEVICE = P(MESH_AXES)   # leading axis: one block per device


@dataclasses.dataclass(frozen=True)
class Context:
  """Stage-1 results every later stage needs, one block per device (leading axis)."""
  rows: dict[str, jax.Array]      # stack -> [devices * n, dim/col] unique rows
  unique: dict[str, jax.Array]    # stack -> [devices, n] local row numbers (sentinel-padded)
  inverse: dict[str, jax.Array]   # stack -> [devices, nt, nr, nc, b, Ft, L] into `unique`
  weights: dict[str, jax.Array]   # stack -> same shape, pooling weight per slot


jax.tree_util.register_dataclass(Context, data_fields=["rows", "unique", "inverse", "weights"],
                                 meta_fields=[])


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingCollection:
  """Tables + features + plan on a mesh; see module docstring for the data flow."""

  tables: tuple[TableSpec, ...]
  features: tuple[FeatureSpec, ...]
  plan: Plan
  mesh: Mesh
  optimizer: Any
  layouts: tuple[layout_lib.StackLayout, ...] = ()

  @classmethod
  def create(cls, tables: Sequence[TableSpec], features: Sequence[FeatureSpec], plan: Plan,
             mesh: Mesh, optimizer) -> "EmbeddingCollection":
    tables, features = tuple(tables), tuple(features)
    validate(tables, features)
    dims = {tables[[t.name for t in tables].index(f.table)].dim for f in features}
    if len(dims) > 1:
      raise ConfigError(f"features read tables of different dims {sorted(dims)}; the models "
                        "take [batch, features, dim] with one dim")
    layouts = layout_lib.build_layouts(tables, features, plan, mesh_shape(mesh))
    return cls(tables, features, plan, mesh, optimizer, layouts)

  # ----------------------------------------------------------------------------- state
  @property
  def dim(self) -> int:
    return self.layouts[0].dim

  def table_spec(self, name: str) -> TableSpec:
    return next(t for t in self.tables if t.name == name)

  def shardings(self) -> EmbeddingState:
    """NamedShardings of the `EmbeddingState` pytree."""
    tables, opt = {}, {}
    for l in self.layouts:
      tables[l.name] = NamedSharding(self.mesh, l.spec())
      opt[l.name] = {k: NamedSharding(self.mesh, l.spec() if per == "element" else l.row_spec())
                     for k, (per, _) in self.optimizer.state_layout().items()}
    return {"tables": tables, "opt": opt}

  def init(self, key: jax.Array) -> EmbeddingState:
    """Initial state, placed on the mesh; values do not depend on the plan."""
    return jax.jit(self._init, out_shardings=self.shardings())(key)

  def _init(self, key):
    per_table = {t.name: layout_lib.init_table(key, t) for t in self.tables}
    return self.stack_tables(per_table)

  def stack_tables(self, per_table: Mapping[str, jax.Array],
                   per_table_opt: Mapping[str, Mapping[str, jax.Array]] | None = None
                   ) -> EmbeddingState:
    """Per-table arrays (canonical layout) → `EmbeddingState`; fresh optimizer state when
    `per_table_opt` is None."""
    tables, opt = {}, {}
    for l in self.layouts:
      tables[l.name] = layout_lib.stack(l, {s.name: per_table[s.name] for s in l.slots})
      opt[l.name] = {}
      for k, (per, initial) in self.optimizer.state_layout().items():
        if per_table_opt is None:
          shape = l.shape if per == "element" else l.shape[:1]
          opt[l.name][k] = jnp.full(shape, initial, jnp.float32)
        else:
          opt[l.name][k] = layout_lib.stack(l, {s.name: per_table_opt[s.name][k]
                                                for s in l.slots})
    return {"tables": tables, "opt": opt}

  def unstack_tables(self, state: EmbeddingState) -> tuple[dict, dict]:
    """`EmbeddingState` → (`{table: [rows, dim]}`, `{table: {opt_name: array}}`)."""
    tables, opt = {}, {}
    for l in self.layouts:
      tables.update(layout_lib.unstack(l, state["tables"][l.name]))
      for k, arr in state["opt"][l.name].items():
        for name, piece in layout_lib.unstack(l, arr).items():
          opt.setdefault(name, {})[k] = piece
    return tables, opt

  # ----------------------------------------------------------------------------- input
  def check_ids(self, ids: Mapping[str, np.ndarray]) -> None:
    """Host-side check before the step: every feature present, ids in `[-1, rows)`."""
    for f in self.features:
      if f.name not in ids:
        raise DataError(f"batch has no ids for feature '{f.name}'")
      x = np.asarray(ids[f.name])
      rows = self.table_spec(f.table).rows
      if x.ndim != 2 or x.shape[1] != f.max_len:
        raise DataError(f"feature '{f.name}': ids shape {x.shape}, expected [batch, {f.max_len}]")
      if x.size and (x.min() < -1 or x.max() >= rows):
        bad = x[(x < -1) | (x >= rows)][0]
        raise DataError(f"feature '{f.name}' (table '{f.table}', {rows} rows): id {bad} is out "
                        f"of range [0, {rows})")

  def _stack_inputs(self, l, ids, weights):
    """`[B, F_s, L]` ids (-1 padded) and pooling weights for one stack."""
    cols, ws = [], []
    for i in l.features:
      f = self.features[i]
      x = ids[f.name].astype(jnp.int32)
      x = jnp.pad(x, ((0, 0), (0, l.max_len - x.shape[1])), constant_values=-1)
      valid = (x >= 0).astype(jnp.float32)
      w = valid
      if f.weighted:
        w = w * jnp.pad(weights[f.name].astype(jnp.float32),
                        ((0, 0), (0, l.max_len - f.max_len)))
      if f.pooling == "mean":
        w = w / jnp.maximum(valid.sum(axis=1, keepdims=True), 1.0)
      cols.append(x)
      ws.append(w)
    return jnp.stack(cols, axis=1), jnp.stack(ws, axis=1)

  # ----------------------------------------------------------------------------- stage 1
  def lookup(self, state: EmbeddingState, ids: Mapping[str, jax.Array],
             weights: Mapping[str, jax.Array] | None = None) -> Context:
    """Stage 1: gather ids, dedupe, read the unique local rows (see module docstring)."""
    weights = weights or {}
    out = Context({}, {}, {}, {})
    for l in self.layouts:
      x, w = self._stack_inputs(l, ids, weights)
      fn = jax.shard_map(functools.partial(_lookup_local, l), mesh=self.mesh,
                         in_specs=(l.spec(), P(BATCH_AXES), P(BATCH_AXES)),
                         out_specs=(P(MESH_AXES, None),) + (PER_DEVICE,) * 3, check_vma=False)
      rows, uniq, inv, wl = fn(state["tables"][l.name], x, w)
      out.rows[l.name], out.unique[l.name] = rows, uniq
      out.inverse[l.name], out.weights[l.name] = inv, wl
    return out

  # ----------------------------------------------------------------------------- stage 2
  def pool(self, rows: Mapping[str, jax.Array], ctx: Context) -> jax.Array:
    """Stage 2: pooled activations `[batch, features, dim]`, split over batch."""
    parts, order = [], []
    for l in self.layouts:
      fn = jax.shard_map(functools.partial(_pool_local, l), mesh=self.mesh,
                         in_specs=(P(MESH_AXES, None), PER_DEVICE, PER_DEVICE),
                         out_specs=P(BATCH_AXES), check_vma=False)
      parts.append(fn(rows[l.name], ctx.inverse[l.name], ctx.weights[l.name]))
      order.extend(l.features)
    pooled = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    if order != sorted(order):
      pooled = pooled[:, np.argsort(order)]
    return pooled

  # ----------------------------------------------------------------------------- stage 3
  def apply_gradients(self, state: EmbeddingState, ctx: Context,
                      row_grads: Mapping[str, jax.Array], step: jax.Array) -> EmbeddingState:
    """Stage 3: sum row gradients over replicas, update the unique rows in place."""
    tables, opt = {}, {}
    for l in self.layouts:
      opt_specs = {k: (l.spec() if per == "element" else l.row_spec())
                   for k, (per, _) in self.optimizer.state_layout().items()}
      fn = jax.shard_map(functools.partial(_update_local, l, self.optimizer), mesh=self.mesh,
                         in_specs=(l.spec(), opt_specs, P(MESH_AXES, None), PER_DEVICE,
                                   P(MESH_AXES, None), P()),
                         out_specs=(l.spec(), opt_specs), check_vma=False)
      tables[l.name], opt[l.name] = fn(state["tables"][l.name], state["opt"][l.name],
                                       ctx.rows[l.name], ctx.unique[l.name],
                                       row_grads[l.name], step)
    return {"tables": tables, "opt": opt}


# ------------------------------------------------------------------------- per-device code
def _axis_index(l, axis):
  return jax.lax.axis_index(axis) if l.size(axis) > 1 else 0


def _group_slice(l, x):
  """`[nd, nt, nr, nc, ...]` → keep model axes, take this device's index on replica axes."""
  for pos, axis in enumerate(MESH_AXES):
    if axis not in l.axes and x.shape[pos] > 1:
      x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis), 1, axis=pos)
  return x


def _select_features(l, x, fill):
  """`[..., F_s, L]` → `[..., Ft, L]`: the features whose tables sit on this table slice."""
  slot_features = jnp.asarray(np.array(l.slot_features, np.int32))
  sel = slot_features[_axis_index(l, "table")] if l.num_slices > 1 else slot_features[0]
  picked = jnp.take(x, jnp.maximum(sel, 0), axis=-2)
  return jnp.where((sel >= 0)[:, None], picked, fill), sel


def _lookup_local(l, table, ids, w):
  """Device part of stage 1. table `[local_rows, dim/col]`; ids, w `[b, F_s, L]`."""
  sizes = dict(l.sizes)
  b = ids.shape[0]
  ids_all = jax.lax.all_gather(ids, MESH_AXES, axis=0, tiled=False)   # [N, b, F_s, L]
  ids_all = ids_all.reshape(tuple(sizes[a] for a in MESH_AXES) + ids.shape)
  ids_sel, sel = _select_features(l, ids_all, -1)                       # [nd,nt,nr,nc,b,Ft,L]
  offsets = jnp.asarray(np.array(l.feature_row_offsets(), np.int32))[jnp.maximum(sel, 0)]
  row = ids_sel + offsets[:, None]
  if "row" in l.axes:
    row = row - _axis_index(l, "row") * l.local_rows
  sentinel = l.local_rows
  local = jnp.where((ids_sel >= 0) & (row >= 0) & (row < l.local_rows), row, sentinel)
  flat = local.reshape(-1)
  uniq, inv = jnp.unique(flat, size=flat.size, fill_value=sentinel, return_inverse=True)
  rows = jnp.take(table, uniq, axis=0, mode="fill", fill_value=0)
  inv = _group_slice(l, inv.reshape(local.shape))                       # [1,nt,nr,nc,b,Ft,L]
  group_axes = tuple(a for a in MESH_AXES if a in l.axes)
  if group_axes:
    w_all = jax.lax.all_gather(w, group_axes, axis=0, tiled=False)
    w_all = w_all.reshape(tuple(l.size(a) for a in MESH_AXES) + w.shape)
  else:
    w_all = w.reshape((1, 1, 1, 1) + w.shape)
  w_sel, _ = _select_features(l, w_all, 0.0)
  del b
  return rows, uniq[None], inv, w_sel


def _pool_local(l, rows, inv, w):
  """Device part of stage 2: `rows [n, d]` → `[b, F_s, d]` for this device's examples."""
  x = jnp.take(rows, inv[0], axis=0) * w[0][..., None]                  # [nt,nr,nc,b,Ft,L,d]
  x = x.sum(axis=-2)                                                     # [nt,nr,nc,b,Ft,d]
  if "row" in l.axes:
    x = jax.lax.psum_scatter(x, "row", scatter_dimension=1, tiled=True)
  if "table" in l.axes:
    x = jax.lax.all_to_all(x, "table", split_axis=0, concat_axis=4, tiled=True)
  if "col" in l.axes:
    x = jax.lax.all_to_all(x, "col", split_axis=2, concat_axis=5, tiled=True)
  x = x.reshape(x.shape[3:])                                             # [b, nt*Ft, d]
  width = len(l.slot_features[0])
  position = {f: s * width + j for s, fs in enumerate(l.slot_features)
              for j, f in enumerate(fs) if f >= 0}
  return x[:, np.array([position[f] for f in range(len(l.features))])]


def _update_local(l, optimizer, table, opt_state, rows, uniq, grads, step):
  """Device part of stage 3: optimizer step on the unique rows of the local shard."""
  replicas = tuple(a for a in l.replica_axes if dict(l.sizes)[a] > 1)
  if replicas:
    grads = jax.lax.psum(grads, replicas)
  uniq = uniq[0]
  if "col" in l.axes:
    dim_sum = lambda x: jax.lax.psum(x.sum(axis=-1), "col")
  else:
    dim_sum = lambda x: x.sum(axis=-1)
  state_rows = {k: jnp.take(v, uniq, axis=0, mode="fill", fill_value=0)
                for k, v in opt_state.items()}
  new_rows, new_state = optimizer.update(rows.astype(jnp.float32), grads, state_rows, step,
                                         dim_sum)
  table = table.at[uniq].set(new_rows.astype(table.dtype), mode="drop")
  opt_state = {k: opt_state[k].at[uniq].set(new_state[k].astype(opt_state[k].dtype),
                                             mode="drop") for k in opt_state}
  return table, opt_state
