"""Jitted device operations on the cache rows inside the `EmbeddingState`.

An offloaded table is an ordinary table of `cache_rows` rows in its stack; slot `s` of it
is row `base + s` of the stacked array (and of its optimizer state), where `base` is the
table's first row in the stack (`StackLayout.slot_start`). The
operations index the global stacked arrays, so they work for every placement kind; jit
places the gathers and scatters on the devices that own the rows.

Index arrays are padded to power-of-two lengths (>= 64) with an out-of-range row (dropped
by scatters, zero for gathers); a training install's length is fixed by the batch shape
(`install_size`), so a run compiles its install and eviction gather once.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.embedding.collection import EmbeddingCollection
from jaxrec.sharding.mesh import replicated

MIN_PAD = 64


@dataclasses.dataclass(frozen=True)
class CachePlace:
  """Where the cache of table `table` sits: rows `[base, base + cache_rows)` of `stack`,
  whose arrays may hold more columns than the table's `dim` (column padding,
  `embedding.layout`)."""
  table: str
  stack: str
  base: int
  cache_rows: int
  stack_rows: int
  dim: int


def cache_places(collection: EmbeddingCollection, names) -> dict[str, CachePlace]:
  out = {}
  for l in collection.layouts:
    for s in l.slots:
      if s.name in names:
        out[s.name] = CachePlace(s.name, l.name, l.slot_start(s), s.rows, l.shape[0], l.dim)
  return out


def padded(n: int) -> int:
  return max(MIN_PAD, 1 << max(0, int(n) - 1).bit_length())


def install_size(t, ids) -> int:
  """Padded rows of every install into the cache of `t` (a `TierTable`) for batches with
  `ids` (`{feature: [B, ...]}`): at most one row per id of its features, and at most the
  cache. Fixed by the batch shape, so the install and the eviction gather compile once, not
  each time a batch misses more rows than any before."""
  ids_per_batch = sum(int(np.size(ids[f])) for f in t.features)
  return padded(min(t.cache.cache_rows, ids_per_batch))


def global_rows(place: CachePlace, slots: np.ndarray, size: int | None = None) -> np.ndarray:
  """Slots → stacked-array rows, padded to `size` (default `padded(len(slots))`)."""
  size = padded(len(slots)) if size is None else size
  out = np.full(size, place.stack_rows, np.int32)
  out[:len(slots)] = place.base + np.asarray(slots)
  return out


def with_columns(x: jax.Array, width: int) -> jax.Array:
  """Rows `[n, d]` cut or zero-padded to `[n, width]` (a column-padded stack's rows ↔ the
  table's); per-row values `[n]` unchanged."""
  if x.ndim != 2 or x.shape[1] == width:
    return x
  return x[:, :width] if x.shape[1] > width else jnp.pad(x, ((0, 0), (0, width - x.shape[1])))


def with_bounces(values: Mapping[str, jax.Array], bounces) -> dict[str, jax.Array]:
  """`values` `{array: [n, ...]}` with `values[dst]` replaced by `evicted[src]` for each
  bounce `(evicted {array: [m, ...]}, src [n], dst [n])` (padding: `dst` out of range). The
  bounces are one gather and one scatter: their `dst` are disjoint (each row's newest
  value is in one eviction), and one pair per bounce source made the install program
  `bounce_sources` x tables x arrays of them (100 offloaded tables: 1,800)."""
  if not bounces:
    return dict(values)
  sizes = [next(iter(evicted.values())).shape[0] for evicted, _, _ in bounces]
  starts = np.cumsum([0] + sizes[:-1])
  src = jnp.concatenate([s + int(o) for (_, s, _), o in zip(bounces, starts)])
  dst = jnp.concatenate([d for _, _, d in bounces])
  return {k: v.at[dst].set(jnp.concatenate([evicted[k] for evicted, _, _ in bounces])
                           .at[src].get(mode="fill", fill_value=0).astype(v.dtype), mode="drop")
          for k, v in values.items()}


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  out = np.zeros((size,) + x.shape[1:], x.dtype)
  out[:len(x)] = x
  return out


class DeviceOps:
  """The jitted install / gather functions of one collection."""

  def __init__(self, collection: EmbeddingCollection, places: Mapping[str, CachePlace]):
    self.places = dict(places)
    emb = collection.shardings()
    rep = replicated(collection.mesh)
    self.replicated = rep
    options = collection.compiler_options()   # the install and view scatter rows
    self.install = jax.jit(self._install, in_shardings=(emb, rep, rep), out_shardings=emb,
                           donate_argnums=(0,), compiler_options=options)
    self.gather = jax.jit(self._gather, in_shardings=(emb, rep), out_shardings=rep)
    self.set_slot_rows = jax.jit(self._set_slot_rows, out_shardings=rep, donate_argnums=(0,))

  def _install(self, emb, payload, bounces):
    """payload `{table: (rows [n] int32, values {array: [n, ...]})}`: writes the values
    into those stack rows, in place (the state is donated). `bounces` `{table: [(evicted
    {array: [m, ...]}, src [n], dst [n])]}` first replace `values[dst]` by `evicted[src]`
    (rows whose newest value is in an earlier eviction still on the device). Read the rows
    being replaced with `gather` first, a separate program: a gather and a scatter of the
    same buffer in one program make XLA copy the whole stack."""
    tables, opt = dict(emb["tables"]), {k: dict(v) for k, v in emb["opt"].items()}
    for name, (rows, values) in payload.items():
      values = with_bounces(values, bounces.get(name, ()))
      stack = self.places[name].stack
      put = lambda a, v: a.at[rows].set(with_columns(v, a.shape[-1]).astype(a.dtype), mode="drop")
      tables[stack] = put(tables[stack], values["table"])
      for k in opt[stack]:
        opt[stack][k] = put(opt[stack][k], values[f"opt.{k}"])
    return {"tables": tables, "opt": opt}

  def _set_slot_rows(self, slot_rows, rows, table_rows):
    """`slot_rows` `{table: uint32 [cache_rows]}` (the table row in each slot) with an
    install's `table_rows [n]` (uint32) written at the slots of its stack `rows [n]`
    (`{table: ...}`, padding dropped)."""
    return {name: m.at[rows[name] - self.places[name].base].set(table_rows[name], mode="drop")
            if name in table_rows else m for name, m in slot_rows.items()}

  def _gather(self, emb, rows_by_table):
    """`{table: rows [n]}` → `{table: {array: [n, ...]}}`."""
    out = {}
    for name, rows in rows_by_table.items():
      stack, dim = self.places[name].stack, self.places[name].dim
      take = lambda a: with_columns(a.at[rows].get(mode="fill", fill_value=0), dim)
      vals = {"table": take(emb["tables"][stack])}
      for k, a in emb["opt"][stack].items():
        vals[f"opt.{k}"] = take(a)
      out[name] = vals
    return out

  def put(self, tree):
    """Host arrays → replicated device arrays."""
    return jax.device_put(tree, self.replicated)
