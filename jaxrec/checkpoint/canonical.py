"""Canonical checkpoint layout: one logical array per table, by name, plan-independent.

The train state (what the trainer holds) is

    {"step": int32 [], "params": dense pytree, "opt_state": optax pytree,
     "emb": EmbeddingState {"tables": {stack: [R, D]}, "opt": {stack: {name: array}}},
     "rng": uint32 [2] or a typed PRNG key}

and its canonical form (what a checkpoint stores) replaces the stacks by tables:

    {"step", "params", "opt_state", "rng" (key data, uint32),
     "tables": {table: [rows, dim]}, "table_opt": {table: {name: [rows, dim] | [rows]}},
     "fingerprint": uint32 [L]}

`fingerprint` holds one 32-bit hash per other leaf (sorted by leaf name, e.g.
`tables/t0`, `opt_state/0/mu/w`), computed on device when saving and checked after
restoring, so a restore is verified bit for bit.

In between, every table lives on a *transfer sharding*: the same devices as the plan's
mesh, re-factored into prime-sized axes, its rows (then columns) split over as many of
them as divide it evenly. Saving writes each device's block; restoring reads only the
blocks a device needs, on any mesh and plan. No host or device ever holds a whole
sharded table.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DENSE_KEYS = ("step", "params", "opt_state", "rng")
TABLE_KEYS = ("tables", "table_opt")
FORMAT = "jaxrec-checkpoint"
VERSION = 1


# ----------------------------------------------------------------------------- names
def key_name(entry) -> str:
  """One pytree key-path entry as a string (dict key, sequence index or attribute)."""
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def leaf_names(tree) -> list[tuple[str, Any]]:
  """`[(name, leaf)]` with names like `opt_state/0/mu/w`, in tree order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [("/".join(key_name(k) for k in path), leaf) for path, leaf in flat]


def is_key(x) -> bool:
  """True for typed PRNG key arrays (and their ShapeDtypeStructs)."""
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


# ----------------------------------------------------------------------------- shardings
@functools.lru_cache(maxsize=32)
def transfer_mesh(mesh: Mesh) -> Mesh:
  """`mesh`'s devices, same order, as axes of prime sizes (8 → 2x2x2, 6 → 3x2)."""
  devices = np.asarray(mesh.devices).reshape(-1)
  n, factors, p = devices.size, [], 2
  while n > 1:
    while n % p == 0:
      factors.append(p)
      n //= p
    p += 1
  factors = sorted(factors, reverse=True) or [1]
  return Mesh(devices.reshape(factors), tuple(f"ckpt{i}" for i in range(len(factors))))


def transfer_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
  """Even sharding of a canonical array on `mesh`'s devices: rows split over as many
  devices as divide them, then columns; the rest replicate."""
  tm = transfer_mesh(mesh)
  rows = shape[0] if shape else 1
  cols = shape[1] if len(shape) > 1 else 1
  row_axes, col_axes = [], []
  for axis, size in zip(tm.axis_names, tm.devices.shape):
    if size > 1 and rows % size == 0:
      row_axes.append(axis)
      rows //= size
    elif size > 1 and len(shape) > 1 and cols % size == 0:
      col_axes.append(axis)
      cols //= size
  spec = [tuple(row_axes) or None, tuple(col_axes) or None][:len(shape)]
  return NamedSharding(tm, P(*spec))


def table_shardings(collection) -> tuple[dict, dict]:
  """Transfer shardings of the canonical `tables` and `table_opt` trees."""
  tables, opt = {}, {}
  layout = collection.optimizer.state_layout()
  for t in collection.tables:
    tables[t.name] = transfer_sharding(collection.mesh, (t.rows, t.dim))
    opt[t.name] = {k: transfer_sharding(collection.mesh, (t.rows, t.dim) if per == "element"
                                        else (t.rows,))
                   for k, (per, _) in layout.items()}
  return tables, opt


# ----------------------------------------------------------------------------- fingerprint
_M1, _M2, _M3 = 0x85EBCA6B, 0x9E3779B1, 0xC2B2AE35


def _bits32(x, xp):
  """Leaf values as uint32 words `[..., w]` (bitwise, any dtype)."""
  if x.dtype == bool:
    return x.astype(xp.uint32)[..., None]
  size = np.dtype(x.dtype).itemsize
  if xp is np:
    if size >= 4:
      return np.ascontiguousarray(x).view(np.uint32).reshape(x.shape + (size // 4,))
    return np.ascontiguousarray(x).view(f"uint{8 * size}").astype(np.uint32)[..., None]
  if size >= 4:
    w = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return w if size > 4 else w[..., None]
  return jax.lax.bitcast_convert_type(x, getattr(jnp, f"uint{8 * size}")).astype(
      jnp.uint32)[..., None]


def _mix(bits, index, xp):
  h = bits * xp.uint32(_M1) + index * xp.uint32(_M2)
  h = h ^ (h >> xp.uint32(15))
  h = h * xp.uint32(_M3)
  return h ^ (h >> xp.uint32(13))


def fingerprint(x: jax.Array) -> jax.Array:
  """uint32 [] hash of the exact bits of `x` (and their positions); order-free sum, so
  any sharding gives the same value. Matches `fingerprint_np`."""
  bits = _bits32(x, jnp)
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(
        stride & 0xFFFFFFFF)
    stride *= bits.shape[axis]
  return jnp.sum(_mix(bits, index, jnp), dtype=jnp.uint32)


def fingerprint_np(block: np.ndarray, shape: tuple[int, ...], start_row: int = 0) -> int:
  """`fingerprint` of rows `[start_row, start_row + len(block))` of an array of `shape`;
  sums of blocks (mod 2^32) give the whole array's value."""
  bits = _bits32(np.asarray(block), np)
  words = bits.shape[-1]
  row_size = int(np.prod(shape[1:], dtype=np.int64)) * words if shape else words
  index = (np.arange(bits.size, dtype=np.int64) + start_row * row_size) & 0xFFFFFFFF
  with np.errstate(over="ignore"):
    h = _mix(bits.reshape(-1), index.astype(np.uint32), np)
    return int(h.sum(dtype=np.uint64) & 0xFFFFFFFF)


# ----------------------------------------------------------------------------- state ↔ canonical
def _key_data(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def _canonicalize(collection, state):
  tables, table_opt = collection.unstack_tables(state["emb"])
  out = {k: _key_data(state[k]) for k in DENSE_KEYS if k in state}
  out["step"] = jnp.asarray(out.get("step", 0), jnp.int32)
  out["tables"] = tables
  if any(table_opt.values()):
    out["table_opt"] = table_opt
  out["fingerprint"] = jnp.stack([fingerprint(x) for _, x in sorted(leaf_names(out))])
  return out


def _sharding_of(x, mesh):
  s = getattr(x, "sharding", None)
  return s if isinstance(s, jax.sharding.Sharding) else NamedSharding(mesh, P())


def canonical_shardings(collection, state) -> dict:
  """Out shardings of `to_canonical`: dense leaves keep theirs, tables use transfer ones."""
  mesh = collection.mesh
  dense = {k: jax.tree.map(lambda x: _sharding_of(x, mesh), state[k])
           for k in DENSE_KEYS if k in state}
  dense["step"] = NamedSharding(mesh, P())
  tables, opt = table_shardings(collection)
  rep = NamedSharding(mesh, P())
  out = {**dense, "tables": tables, "table_opt": opt, "fingerprint": rep}
  if not any(opt.values()):
    del out["table_opt"]
  return out


@functools.lru_cache(maxsize=8)
def _canonicalize_jit(collection, shardings_flat, treedef):
  return jax.jit(functools.partial(_canonicalize, collection),
                 out_shardings=jax.tree.unflatten(treedef, shardings_flat))


def to_canonical(state: Mapping, collection) -> dict:
  """Train state → canonical pytree (fresh arrays: the caller may donate `state` after).

  Runs as one jitted program, dispatched asynchronously; tables come out on their
  transfer shardings, dense leaves on their own."""
  state = dict(state)
  if not isinstance(state.get("step", 0), jax.Array):
    state["step"] = jnp.asarray(state.get("step", 0), jnp.int32)
  flat, treedef = jax.tree.flatten(canonical_shardings(collection, state))
  return _canonicalize_jit(collection, tuple(flat), treedef)(state)


def describe(canonical: Mapping, collection=None) -> dict:
  """JSON manifest of a canonical pytree: leaves (shape, dtype), tables, fingerprint order."""
  leaves = {n: {"shape": list(np.shape(x)), "dtype": str(x.dtype)}
            for n, x in leaf_names({k: v for k, v in canonical.items() if k != "fingerprint"})}
  tables = {n: {"rows": int(np.shape(x)[0]), "dim": int(np.shape(x)[1]), "dtype": str(x.dtype)}
            for n, x in canonical.get("tables", {}).items()}
  manifest = {
      "format": FORMAT, "version": VERSION,
      "contents": sorted(k for k in canonical if k != "fingerprint"),
      "tables": tables,
      "table_opt": {t: sorted(o) for t, o in canonical.get("table_opt", {}).items()},
      "leaves": leaves,
      "fingerprint": sorted(leaves) if "fingerprint" in canonical else [],
  }
  if collection is not None:
    from jaxrec.sharding.mesh import mesh_shape
    manifest["saved_plan"] = collection.plan.to_json()
    manifest["saved_mesh"] = mesh_shape(collection.mesh)
  return manifest


def key_impls(state: Mapping) -> dict[str, str]:
  """`{leaf name: PRNG impl name}` for typed-key leaves of the dense state."""
  dense = {k: state[k] for k in DENSE_KEYS if k in state}
  return {n: str(jax.random.key_impl(x)) for n, x in leaf_names(dense) if is_key(x)}


@functools.lru_cache(maxsize=8)
def _stack_jit(collection, with_opt: bool):
  def fn(tables, table_opt):
    return collection.stack_tables(tables, table_opt if with_opt else None)
  return jax.jit(fn, out_shardings=collection.shardings())


def stack_tables(collection, tables: Mapping, table_opt: Mapping | None) -> dict:
  """Canonical tables (+ optimizer state, or fresh when None) → `EmbeddingState` on the
  collection's mesh and plan."""
  return _stack_jit(collection, table_opt is not None)(dict(tables), dict(table_opt or {}))


@functools.lru_cache(maxsize=32)
def _fingerprints_jit(treedef):
  return jax.jit(lambda leaves: jnp.stack([fingerprint(x) for x in leaves]))


def fingerprints(tree) -> dict[str, int]:
  """`{leaf name: fingerprint}` of a pytree of jax arrays (one jitted program)."""
  named = leaf_names(tree)
  if not named:
    return {}
  leaves = [x for _, x in named]
  values = np.asarray(_fingerprints_jit(jax.tree.structure(leaves))(leaves))
  return {n: int(v) for (n, _), v in zip(named, values)}
