"""The sharded embedding collection: lookup + pooling on the mesh, sparse update.

One training step touches the tables in three `shard_map` stages, so that autodiff sees
only the rows a batch uses (never a dense `[rows, dim]` gradient):

1. `lookup` (no gradient). Every device all-gathers the int32 ids of the devices whose
   examples it looks up (the only thing that moves; one all-gather for all stacks, over
   the axes they need, `layout.ids_gather_axes`: none for `dp` without dedup; the per-id
   weights of weighted features ride along as f32 bits), keeps the features whose tables
   sit on its `table` slice, turns ids into local row numbers (rows it does not own become
   a sentinel), deduplicates them (`unique`) and gathers the unique rows from its shard:
   `rows [n, dim/col]` per device. Replicas of a shard see the same unique set.
2. `pool` (differentiable in `rows`). Each device pools the rows for its model-parallel
   group's part of the batch, `[group, batch/dev, features_on_slice, dim/col]`, and sends
   the pooled activations home: `psum_scatter` over `row` (partial sums of row shards),
   `all_to_all` over `table` (features to the devices holding their examples) and over
   `col` (column shards concatenated); stacks split over the same axes share one set of
   these collectives (stacks of one dim). Result `[batch, features, dim]` split over
   batch; with tables of mixed dims `dim` is the widest and narrower features are padded
   with zero columns (`feature_dims`).
3. `apply_gradients`. The gradient w.r.t. `rows` (what autodiff of stage 2 returns) is
   summed over the stack's replica axes (`psum`), then the sparse optimizer updates just
   the unique rows of the local shard, identically on every replica. (Without dedup each
   device reads and pools only its group's slots, and the replicas all-gather their
   slots' SGD deltas, each computed by the replica that pooled the slot, the slot numbers
   riding along, instead: every replica then scatter-adds all of them.)

The per-device code of each stage is in `local_ops`, with its choices: `EmbeddingOptions`
picks XLA or the Pallas kernels (`jaxrec.kernels`) for pooling and update, and the dtype
the pooled activations travel in. Tables are stored in their `TableSpec.dtype`
(f32/bf16/f16, or int8 as a `QuantizedTable`); rows are pooled and updated in f32.

The collection is static configuration (hashable); all state is in the pytree
`EmbeddingState = {"tables": {stack: [rows, dim]}, "opt": {stack: {name: array}}}`
(an int8 stack's table is a `QuantizedTable(q [rows, dim], scale [rows], bias [rows])`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrec.embedding import layout as layout_lib
from jaxrec.embedding import local_ops, optimizers, specs
from jaxrec.embedding.caller_inputs import as_table, check_packed_alone, concrete, weight_bits
from jaxrec.embedding.specs import EmbeddingOptions, FeatureSpec, TableSpec, validate
from jaxrec.errors import ConfigError, DataError, close_to, in_order, some
from jaxrec.kernels import platform as platform_lib
from jaxrec.kernels import quant
from jaxrec.sharding.mesh import BATCH_AXES, format_mesh, mesh_shape, shares_cores
from jaxrec.sharding.plan import MESH_AXES, Plan

log = logging.getLogger(__name__)

EmbeddingState = dict
PER_DEVICE = P(MESH_AXES)   # leading axis: one block per device


@dataclasses.dataclass(frozen=True)
class Context:
  """Stage-1 results every later stage needs, one block per device (leading axis)."""
  rows: dict[str, jax.Array]      # stack -> [devices * n, dim/col] unique rows, f32
  unique: dict[str, jax.Array]    # stack -> [devices, n] local row numbers (sentinel-padded)
  inverse: dict[str, jax.Array]   # stack -> [devices, nt, nr, nc, b, Ft, L] into `unique`
  weights: dict[str, jax.Array]   # stack -> same shape, pooling weight per slot


jax.tree_util.register_dataclass(Context, data_fields=["rows", "unique", "inverse", "weights"],
                                 meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Packing:
  """Where one stack's inputs sit in the packed `[batch, S]` int32 array that stage 1
  all-gathers. Per stack feature: the first column of its ids (`lens` columns: the
  feature's own `max_len`, not the stack's longest bag, so short bags in a stack of long
  ones do not send padding), the first column of its per-id weights (f32 bits, `lens`
  columns) or -1, and whether it mean-pools."""
  id_starts: tuple[int, ...]
  lens: tuple[int, ...]
  weight_starts: tuple[int, ...]
  mean: tuple[bool, ...]

  def columns(self, width: int, bag: int) -> np.ndarray | None:
    """`[F_s, bag]` column of each feature's slot in a `[..., width]` array, clipped
    (slots past a feature's `lens` are padding: their ids read as -1); None when the
    stack's ids already sit as `[F_s, bag]` in one contiguous block."""
    starts, lens = np.array(self.id_starts), np.array(self.lens)
    if (lens == bag).all() and (starts == starts[0] + bag * np.arange(len(starts))).all():
      return None
    return np.minimum(starts[:, None] + np.arange(bag)[None], width - 1)

  @property
  def plain_sum(self) -> bool:
    """No weighted and no mean-pooled feature: every pooling weight is 1 or 0 (absent)."""
    return all(s < 0 for s in self.weight_starts) and not any(self.mean)


def _resolved(options: EmbeddingOptions, tables: Sequence[TableSpec],
              backend: str) -> EmbeddingOptions:
  """`options.resolve(backend)`, warning about what runs slowly or does nothing."""
  resolved = options.resolve(backend)
  warnings = specs.ineffective_warnings(options, resolved.kernel, [t.dtype for t in tables])
  tuning = platform_lib.tuning_warning(resolved.kernel, backend, bool(resolved.interpret))
  for warning in [specs.interpret_warning(resolved, backend),
                  specs.narrow_chunks_warning(resolved.kernel, tables), *warnings, tuning]:
    if warning:
      log.warning(warning)
  return resolved


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingCollection:
  """Tables + features + plan on a mesh; see module docstring for the data flow."""

  tables: tuple[TableSpec, ...]
  features: tuple[FeatureSpec, ...]
  plan: Plan
  mesh: Mesh
  optimizer: Any
  layouts: tuple[layout_lib.StackLayout, ...] = ()
  options: EmbeddingOptions | None = None   # resolved by `create`

  @classmethod
  def create(cls, tables: Sequence[TableSpec], features: Sequence[FeatureSpec], plan: Plan,
             mesh: Mesh, optimizer, options: EmbeddingOptions | None = None,
             **overrides) -> "EmbeddingCollection":
    """Builds the stacks for `plan` on `mesh`.

    Args:
      optimizer: sparse optimizer (`embedding.optimizers`), or one per table
        (`optimizers.TableOptimizers`, from `optimizers.per_table`): a table's optimizer
        updates its rows and shapes its state; tables of different optimizer families
        (`optimizers.family`) are in different stacks, tables that differ in `lr` only
        share them (each row stepped at its table's rate).
      options: kernel / communication choices; None: `EmbeddingOptions()` as gin binds it.
      **overrides: fields of `EmbeddingOptions` to replace, e.g. `kernel='pallas'`,
        `comm_dtype='bfloat16'`, `interpret=True`, `stochastic_rounding=True`.
    """
    tables, features = tuple(tables), tuple(features)
    validate(tables, features)   # TableSpec itself checks the dtype
    for opt in optimizers.distinct(optimizer):
      if not optimizers.is_sparse_optimizer(opt):
        # e.g. `jaxrec.kernels.SGD` (the fused kernels' optimizer, same name): `init` failed
        # later with an AttributeError
        raise ConfigError(f"EmbeddingCollection.create: optimizer {opt!r} is not a sparse "
                          "optimizer of jaxrec.embedding.optimizers (SGD, Adagrad, "
                          "RowWiseAdagrad, Adam, FTRL; see sparse_optimizer)")
    optimizers.check_tables(optimizer, [t.name for t in tables])
    typed = [a for a, t in zip(mesh.axis_names, getattr(mesh, "axis_types", ()) or ())
             if t != jax.sharding.AxisType.Auto]
    if typed:   # the lookup failed deep in jax (a ShardingTypeError in a shard_map)
      raise ConfigError(f"EmbeddingCollection.create: mesh axes {typed} are not of type Auto; "
                        "the collection places its stacks with shard_map over Auto axes: build "
                        "the mesh with jaxrec.sharding.mesh.make_mesh (or axis_types Auto)")
    try:
      options = dataclasses.replace(options or EmbeddingOptions(), **overrides)
    except TypeError as e:
      raise ConfigError(f"EmbeddingCollection.create: {e}") from None
    given, options = options, _resolved(options, tables, mesh.devices.flat[0].platform)
    layouts = layout_lib.build_layouts(tables, features, plan, mesh_shape(mesh), optimizer)
    problem = layout_lib.stack_error(layouts)
    if problem:
      raise ConfigError(problem)
    if options.comm_dtype is not None and not any(
        l.size(a) > 1 for l in layouts for a in l.axes):
      log.warning("EmbeddingOptions.comm_dtype=%r has no effect: no stack is split over more "
                  "than one device of table, row or col (on this mesh and plan pooled "
                  "activations never cross devices)", given.comm_dtype)
    collection = cls(tables, features, plan, mesh, optimizer, layouts, options)
    for l in layouts:
      collection.dedup(l)   # raises for an impossible dedup=False
    unplaced = in_order(set(plan.placements) - {t.name for t in tables})
    if unplaced:
      log.warning("the plan places tables %s that are not configured: ignored", unplaced)
    unfused = [l.name for l in layouts if not local_ops.fused_update_ok(l, l.optimizer)]
    if options.kernel == "pallas" and unfused:
      log.warning("kernel='pallas': stacks %s update on XLA (the fused update kernel takes "
                  "SGD, Adagrad and row-wise Adagrad; row-wise Adagrad and int8 not on split "
                  "columns); their pooling uses the kernel", unfused)
    return collection

  def dedup(self, l: layout_lib.StackLayout) -> bool:
    """Whether stack `l` deduplicates ids (see `EmbeddingOptions.dedup`)."""
    name = type(l.optimizer).__name__
    return specs.dedups(self.options.dedup, name == "SGD", l.dtype, self.options.kernel,
                        f"stack '{l.name}' (tables {', '.join(s.name for s in l.slots)}) has "
                        f"{name}, {l.dtype}, kernel {self.options.kernel}")

  def compiler_options(self) -> dict[str, str]:
    """XLA compiler options for a program that updates these tables: pass them to its
    `jax.jit` (`kernels.platform.table_compiler_options`: bf16 tables on CPU)."""
    return platform_lib.table_compiler_options(self.mesh.devices.flat[0].platform,
                                               [l.dtype for l in self.layouts])

  # ----------------------------------------------------------------------------- state
  @property
  def dim(self) -> int:
    """`D` of the pooled activations `[B, F, D]`: the widest table's dim (features of
    narrower tables are padded with zero columns, see `feature_dims`)."""
    return max(l.dim for l in self.layouts)

  @property
  def feature_dims(self) -> tuple[int, ...]:
    """Each feature's own dim, in feature order: feature `i` fills the first
    `feature_dims[i]` columns of `[B, F, D]`; the rest are zero (and get no gradient)."""
    return specs.feature_dims(self.tables, self.features)

  def optimizer_of(self, table: str):
    """The sparse optimizer of table `table` (the one `optimizer`, or its per-table entry)."""
    return optimizers.of(self.optimizer, table)

  def table_spec(self, name: str) -> TableSpec:
    """The spec of table `name` (by name: the init of 1,000 tables scanned them 1,000 times)."""
    return self._specs_by_name[name]

  @functools.cached_property
  def _specs_by_name(self) -> dict[str, TableSpec]:
    return {t.name: t for t in self.tables}

  def shardings(self) -> EmbeddingState:
    """NamedShardings of the `EmbeddingState` pytree."""
    tables, opt = {}, {}
    for l in self.layouts:
      tables[l.name] = layout_lib.table_sharding(self.mesh, l)
      opt[l.name] = {k: NamedSharding(self.mesh, l.spec() if per == "element" else l.row_spec())
                     for k, (per, _) in l.optimizer.state_layout().items()}
    return {"tables": tables, "opt": opt}

  def init(self, key: jax.Array) -> EmbeddingState:
    """Initial state, placed on the mesh; values do not depend on the plan. A stack that is
    replicated on CPU devices of one process (`shares_cores`) is computed split over
    its rows, then copied to every device: each device drew all of it, 8x the host's work
    on 8 devices (a 1,000-table `dp` stack `[1e6, 16]`: 1.6-1.8 s against 0.25 s on one)."""
    shardings = self.shardings()
    built = jax.jit(self._init, out_shardings=self._init_shardings(shardings))(key)
    return jax.device_put(built, shardings)   # the split stacks replicated; the rest as is

  def _init_shardings(self, shardings: EmbeddingState) -> EmbeddingState:
    """`shardings` with each replicated stack's rows split over every device, where the mesh
    shares the host's cores and the rows divide evenly."""
    if not shares_cores(self.mesh):
      return shardings
    split = NamedSharding(self.mesh, P(MESH_AXES))
    tables = dict(shardings["tables"])
    for l in self.layouts:
      leaves = jax.tree.leaves(tables[l.name])
      if all(s.is_fully_replicated for s in leaves) and l.shape[0] % self.mesh.size == 0:
        tables[l.name] = jax.tree.map(lambda _: split, tables[l.name])
    return {**shardings, "tables": tables}

  def _init(self, key):
    tables = {l.name: layout_lib.init_stack(key, l, [self.table_spec(s.name) for s in l.slots])
              for l in self.layouts}
    return {"tables": tables, "opt": {l.name: self._fresh_opt(l) for l in self.layouts}}

  def _fresh_opt(self, l: layout_lib.StackLayout) -> dict[str, jax.Array]:
    """The optimizer's initial state of stack `l`, shaped per element or per row."""
    return {k: jnp.full(l.shape if per == "element" else l.shape[:1], initial, jnp.float32)
            for k, (per, initial) in l.optimizer.state_layout().items()}

  def stack_tables(self, per_table: Mapping[str, jax.Array],
                   per_table_opt: Mapping[str, Mapping[str, jax.Array]] | None = None
                   ) -> EmbeddingState:
    """Per-table arrays (canonical layout) → `EmbeddingState`; fresh optimizer state when
    `per_table_opt` is None. `ConfigError` naming the table (and state) for a missing array
    or one not shaped `[rows, dim]` (per-row state `[rows]`): stacked, it would shift the
    rows of every later table in its stack."""
    self._check_per_table(per_table, per_table_opt)
    tables, opt = {}, {}
    for l in self.layouts:
      tables[l.name] = layout_lib.stack(l, {s.name: as_table(per_table[s.name],
                                                              self.table_spec(s.name).dtype)
                                            for s in l.slots})
      if per_table_opt is None:
        opt[l.name] = self._fresh_opt(l)
      else:
        opt[l.name] = {k: layout_lib.stack(l, {s.name: jnp.asarray(per_table_opt[s.name][k],
                                                                    jnp.float32)
                                               for s in l.slots})
                       for k in l.optimizer.state_layout()}
    return {"tables": tables, "opt": opt}

  def _check_per_table(self, per_table, per_table_opt) -> None:
    """`stack_tables`' inputs: every table (and optimizer state) present, shaped as its spec."""
    def check(x, name, what, shape):
      got = tuple(np.shape(x.q if isinstance(x, quant.QuantizedTable) else x))
      if got != shape:
        raise ConfigError(f"stack_tables: {what} of table '{name}' has shape {list(got)}, "
                          f"expected {list(shape)}")
      if isinstance(x, quant.QuantizedTable):
        return
      dtype = getattr(x, "dtype", None)   # an array's own: not a copy of the table
      dtype = np.asarray(x).dtype if dtype is None else dtype   # (a list)
      if not jnp.issubdtype(dtype, jnp.floating):   # an int array
        raise ConfigError(f"stack_tables: {what} of table '{name}' is {dtype}: give float "
                          "values (an integer stack's updates rounded to whole numbers)")

    for t in self.tables:
      if t.name not in per_table:
        raise ConfigError(f"stack_tables: no array for table '{t.name}'")
      check(per_table[t.name], t.name, "the array", (t.rows, t.dim))
      if per_table_opt is None:
        continue
      for k, (per, _) in self.optimizer_of(t.name).state_layout().items():
        if k not in per_table_opt.get(t.name, {}):
          raise ConfigError(f"stack_tables: no optimizer state '{k}' for table '{t.name}'")
        check(per_table_opt[t.name][k], t.name, f"optimizer state '{k}'",
              (t.rows, t.dim) if per == "element" else (t.rows,))

  def unstack_tables(self, state: EmbeddingState) -> tuple[dict, dict]:
    """`EmbeddingState` → (`{table: [rows, dim]}`, `{table: {opt_name: array}}`), each table
    in its storage dtype; an int8 table as a `kernels.quant.QuantizedTable` (`q [rows, dim]`
    int8, `scale` and `bias` `[rows]`; `quant.dequantize` gives its float32 values)."""
    tables, opt = {}, {}
    for l in self.layouts:
      tables.update(layout_lib.unstack(l, state["tables"][l.name]))
      for k, arr in state["opt"][l.name].items():
        for name, piece in layout_lib.unstack(l, arr).items():
          opt.setdefault(name, {})[k] = piece
    return tables, opt

  def _jitted(self, method: str):
    """`method` of this collection under one `jax.jit`, kept: an eager call built new
    `shard_map`s of new partials each time and compiled ~80 programs per call (2-7 s,
    0.2-0.7 ms jitted)."""
    cache = self.__dict__.setdefault("_jit_cache", {})
    if method not in cache:
      cache[method] = jax.jit(getattr(self, method))
    return cache[method]

  def _check_state(self, state: EmbeddingState, where: str) -> None:
    """A `ConfigError` for a state this collection did not lay out (`init`, `stack_tables`):
    another collection's stacks read wrong rows without a word."""
    tables = state.get("tables", {}) if isinstance(state, Mapping) else {}
    for l in self.layouts:
      x = tables.get(l.name)
      got = None if x is None else tuple(np.shape(x.q if isinstance(x, quant.QuantizedTable)
                                                  else x))
      if got != l.shape:
        have = "none" if got is None else f"shape {list(got)}"
        raise ConfigError(
            f"{where}: the state's stack '{l.name}' has {have}, this collection's is "
            f"{list(l.shape)}: the state was laid out by another collection (other tables, "
            "features or plan); build it with this one's init or stack_tables (unstack_tables "
            "gives another collection's tables by name)")

  # ----------------------------------------------------------------------------- input
  def check_ids(self, ids: Mapping[str, np.ndarray]) -> None:
    """Host-side check before the step: every feature present, ids in `[-1, rows)`."""
    for f in self.features:
      specs.checked_ids(ids, f.name, f"table '{f.table}'", self.table_spec(f.table).rows,
                        f.max_len)

  @property
  def packed_width(self) -> int:
    """`S` of the packed stage-1 input `[B, S]` (`pack`): each feature's `max_len` id
    columns, and as many weight columns for a weighted feature."""
    return sum(f.max_len * (2 if f.weighted else 1) for f in self.features)

  def packing(self) -> tuple[Packing, ...]:
    """Per stack, its place in the packed stage-1 input (see `Packing`)."""
    column, id_starts = 0, []
    for l in self.layouts:
      id_starts.append([])
      for i in l.features:
        id_starts[-1].append(column)
        column += self.features[i].max_len
    out = []
    for l, starts in zip(self.layouts, id_starts):
      weight_starts = []
      for i in l.features:
        if self.features[i].weighted:
          weight_starts.append(column)
          column += self.features[i].max_len
        else:
          weight_starts.append(-1)
      out.append(Packing(tuple(starts), tuple(self.features[i].max_len for i in l.features),
                         tuple(weight_starts),
                         tuple(self.features[i].pooling == "mean" for i in l.features)))
    return tuple(out)

  def pack(self, ids: Mapping[str, Any], weights: Mapping[str, Any] | None = None, xp=np):
    """The stage-1 input `[B, S]` int32 (`xp` = np on the host, jnp under jit): every
    feature's ids (`[B, max_len]`, -1 for absent), then the weighted features' per-id
    weights as f32 bits, in `packing()` order. Packing on the host turns a batch's many id
    arrays into one transfer (`pack_batch`). On the host the ids are checked as `check_ids`
    does (`DataError`: not integers, or outside `[-1, rows)`); the lookup would read such an
    id as an absent one (and a float id as its integer part) without a word."""
    weights = weights or {}
    extra = in_order(set(ids) - {f.name for f in self.features})
    if extra:   # a misspelt feature was ignored (its table read nothing for it)
      raise DataError(f"batch has ids for {extra}, not features of this collection "
                      f"([{some(in_order(f.name for f in self.features))}])"
                      f"{close_to(extra[0], [f.name for f in self.features])}")
    extra = in_order(set(weights) - {f.name for f in self.features if f.weighted})
    if extra:   # e.g. a feature meant to be weighted but not configured so
      raise DataError(f"batch has weights for features {extra}, which are not weighted "
                      "features of this collection (FeatureSpec.weighted)")
    blocks = []   # (column, [B, width] int32)
    for l, pk in zip(self.layouts, self.packing()):
      for j, i in enumerate(l.features):
        f = self.features[i]
        if f.name not in ids:
          raise DataError(f"batch has no ids for feature '{f.name}'")
        raw = ids[f.name]
        if xp is np or isinstance(raw, np.ndarray):   # traced values (jit) are not known
          raw = specs.checked_ids(ids, f.name, f"table '{f.table}'",
                                  self.table_spec(f.table).rows, f.max_len)
        x = xp.asarray(raw, xp.int32)   # in [-1, rows) when checked: int64 ids cast exactly
        if x.ndim != 2 or x.shape[1] != f.max_len:
          raise DataError(f"feature '{f.name}': ids shape {x.shape}, expected "
                          f"[batch, {f.max_len}]")
        if blocks and x.shape[0] != blocks[0][1].shape[0]:
          raise DataError(f"feature '{f.name}': {x.shape[0]} examples, but the batch's other "
                          f"features have {blocks[0][1].shape[0]}")
        blocks.append((pk.id_starts[j], x))
        if f.weighted:
          if f.name not in weights:
            raise DataError(f"batch has no weights for weighted feature '{f.name}'")
          w = xp.asarray(weights[f.name], xp.float32)
          if w.shape != x.shape:
            raise DataError(f"feature '{f.name}': weights shape {w.shape}, expected the ids' "
                            f"{x.shape}")
          blocks.append((pk.weight_starts[j], w.view(xp.int32) if xp is np else
                         weight_bits(w)))
    width = sum(x.shape[1] for _, x in blocks)
    batch = blocks[0][1].shape[0]
    if xp is np:   # one buffer, every column written: the host path runs every step
      out = np.empty((batch, width), np.int32)
      for column, x in blocks:
        out[:, column:column + x.shape[1]] = x
      return out
    out = jnp.zeros((batch, width), jnp.int32)
    for column, x in blocks:
      out = jax.lax.dynamic_update_slice_in_dim(out, x, column, axis=1)
    return out

  def feature_inputs(self, ids, weights, name: str) -> tuple[jax.Array, jax.Array | None]:
    """Feature `name`'s `(ids [B, max_len] int32, weights [B, max_len] float32 or None)`
    from a batch's ids, by feature or packed (`pack`)."""
    i = [f.name for f in self.features].index(name)
    f = self.features[i]
    check_packed_alone(ids, weights, "feature_inputs")
    if isinstance(ids, Mapping):
      w = (weights or {}).get(name) if f.weighted else None
      return (jnp.asarray(ids[name], jnp.int32),
              None if w is None else jnp.asarray(w, jnp.float32))
    l, pk = next((l, pk) for l, pk in zip(self.layouts, self.packing()) if i in l.features)
    j = list(l.features).index(i)
    x = ids[:, pk.id_starts[j]:pk.id_starts[j] + f.max_len]
    if not f.weighted:
      return x, None
    s = pk.weight_starts[j]
    return x, jax.lax.bitcast_convert_type(ids[:, s:s + f.max_len], jnp.float32)

  def pack_batch(self, batch):
    """Host `Batch` → the same batch with `ids` packed (`pack`) and no `weights`: what the
    train and eval steps take (`lookup` accepts ids packed or by feature)."""
    return dataclasses.replace(batch, ids=self.pack(batch.ids, batch.weights), weights={})

  # ----------------------------------------------------------------------------- stage 1
  def lookup(self, state: EmbeddingState, ids: Mapping[str, jax.Array],
             weights: Mapping[str, jax.Array] | None = None) -> Context:
    """Stage 1: gather ids, dedupe, read the unique local rows (see module docstring).

    `ids`: `{feature: [B, max_len]}` (with `weights` for weighted features), or the packed
    `[B, S]` array of `pack` (which holds the weights: `weights` must then be empty)."""
    check_packed_alone(ids, weights, "lookup")
    manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
    if manual:   # the batch arrived split: 'batch of 1 examples is not divisible by 8'
      raise ConfigError(f"lookup inside a shard_map (manual axes {list(manual)}): call it "
                        "outside, on the global batch; it shards itself")
    self._check_state(state, "lookup")
    if concrete(state, ids, weights):   # eagerly: compiled once, not at every call (2 s);
      packed = ids if not isinstance(ids, Mapping) else self.pack(ids, weights)   # checked
      return self._jitted("lookup")(state, packed)
    packed = ids if not isinstance(ids, Mapping) else self.pack(ids, weights, xp=jnp)
    width = self.packed_width
    if packed.ndim != 2 or packed.shape[1] != width:
      raise DataError(f"packed ids shape {packed.shape}, expected [batch, {width}] (`pack`)")
    if not packed.shape[0]:   # the pooling's reshapes divide by the per-device batch
      raise DataError("batch of 0 examples: a lookup needs at least one example per device")
    if packed.shape[0] % self.mesh.size:
      raise DataError(f"batch of {packed.shape[0]} examples is not divisible by the "
                      f"{self.mesh.size} devices of mesh {format_mesh(mesh_shape(self.mesh))}")
    per_stack = (P(MESH_AXES, None),) + (PER_DEVICE,) * 3
    fn = jax.shard_map(
        functools.partial(local_ops.lookup_all, self.layouts,
                          tuple(self.dedup(l) for l in self.layouts), self.packing()),
        mesh=self.mesh, in_specs=({l.name: l.table_spec() for l in self.layouts}, P(BATCH_AXES)),
        out_specs={l.name: per_stack for l in self.layouts}, check_vma=False)
    out = fn({l.name: state["tables"][l.name] for l in self.layouts}, packed)
    return Context(*({name: parts[k] for name, parts in out.items()} for k in range(4)))

  # ----------------------------------------------------------------------------- stage 2
  def pool(self, rows: Mapping[str, jax.Array], ctx: Context) -> jax.Array:
    """Stage 2: pooled activations `[batch, features, dim]`, split over batch."""
    if concrete(rows, ctx):
      return self._jitted("pool")(rows, ctx)
    names = [l.name for l in self.layouts]
    dedups = tuple(self.dedup(l) for l in self.layouts)
    fn = jax.shard_map(functools.partial(local_ops.pool_all, self.layouts, self.options,
                                         dedups, self.packing()),
                       mesh=self.mesh,
                       in_specs=({n: P(MESH_AXES, None) for n in names},
                                 {n: PER_DEVICE for n in names}, {n: PER_DEVICE for n in names}),
                       out_specs=P(BATCH_AXES), check_vma=False)
    return fn({n: rows[n] for n in names}, {n: ctx.inverse[n] for n in names},
              {n: ctx.weights[n] for n in names})

  # ----------------------------------------------------------------------------- stage 3
  def apply_gradients(self, state: EmbeddingState, ctx: Context,
                      row_grads: Mapping[str, jax.Array], step: jax.Array,
                      slot_rows: Mapping[str, jax.Array] | None = None) -> EmbeddingState:
    """Stage 3: sum row gradients over replicas, update the unique rows in place.
    `slot_rows`: `{table: uint32 [cache_rows]}`, the table row in each cache slot of
    offloaded tables, which stochastic rounding keys their rows by
    (`local_ops.rounding_rows`)."""
    self._check_state(state, "apply_gradients")
    missing = [l.name for l in self.layouts if l.name not in row_grads]
    shaped = [l.name for l in self.layouts if l.name not in missing
              and np.shape(row_grads[l.name]) != np.shape(ctx.rows[l.name])]
    if missing or shaped:   # a bare KeyError, or a reshape's TypeError (pooled gradients)
      raise ConfigError(f"apply_gradients: row_grads has no gradient for stacks "
                        f"{missing or shaped} shaped as their rows in `ctx.rows`: pass the "
                        "rows' gradients by stack (the vjp of `pool` with respect to "
                        "`ctx.rows`), not the pooled activations'")
    if concrete(state, ctx, row_grads, step, slot_rows):
      return self._jitted("apply_gradients")(state, ctx, row_grads, step, slot_rows)
    slot_rows = slot_rows or {}
    uniq, grads = self._gather_slots(ctx.unique, row_grads, step)
    tables, opt = {}, {}
    for l in self.layouts:
      opt_specs = {k: (l.spec() if per == "element" else l.row_spec())
                   for k, (per, _) in l.optimizer.state_layout().items()}
      fn = jax.shard_map(functools.partial(local_ops.update, l, l.optimizer, self.options,
                                           self.dedup(l)),
                         mesh=self.mesh,
                         in_specs=(l.table_spec(), opt_specs, P(MESH_AXES, None), PER_DEVICE,
                                   P(MESH_AXES, None), P(), P()),
                         out_specs=(l.table_spec(), opt_specs), check_vma=False)
      mine = {s.name: slot_rows[s.name] for s in l.slots if s.name in slot_rows}
      tables[l.name], opt[l.name] = fn(state["tables"][l.name], state["opt"][l.name],
                                       ctx.rows[l.name], uniq[l.name], grads[l.name], step,
                                       mine)
    return {"tables": tables, "opt": opt}

  def _gather_slots(self, unique, row_grads, step) -> tuple[dict, dict]:
    """(`unique`, `row_grads`) with the stacks without dedup that have replicas replaced by
    their slots and the slots' deltas at `step`, all-gathered over them: one collective per
    replica axis for each group of stacks sharing `slot_gather_key`
    (`local_ops.gather_replicas`)."""
    groups: dict[tuple, list] = {}
    for l in self.layouts:
      if not self.dedup(l) and l.split_replica_axes:
        groups.setdefault(l.slot_gather_key, []).append(l)
    unique, row_grads = dict(unique), dict(row_grads)
    for members in groups.values():
      names = [l.name for l in members]
      specs_g = tuple(P(MESH_AXES, None) for _ in members)
      specs_u = tuple(PER_DEVICE for _ in members)
      fn = jax.shard_map(functools.partial(local_ops.gather_replicas, tuple(members)),
                         mesh=self.mesh, in_specs=(P(), specs_g, specs_u),
                         out_specs=(specs_g, specs_u), check_vma=False)
      grads, uniqs = fn(step, tuple(row_grads[n] for n in names),
                        tuple(unique[n] for n in names))
      row_grads.update(zip(names, grads))
      unique.update(zip(names, uniqs))
    return unique, row_grads
