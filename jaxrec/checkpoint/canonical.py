"""Canonical checkpoint layout: names, the dense part, and bit-exact fingerprints.

The train state (what the trainer holds) is

    {"step": int32 [], "params": dense pytree, "opt_state": optax pytree,
     "emb": EmbeddingState {"tables": {stack: [R, D]}, "opt": {stack: {name: array}}},
     "rng": uint32 [2] or a typed PRNG key}

A checkpoint stores it without any trace of the mesh or plan:

    state item (orbax pytree):  {"step", "params", "opt_state", "rng" (key data, uint32),
                                 "fingerprint": uint32 [L]}
    embeddings item (`tables`): one array per table `tables/<name>` [rows, dim] and per
                                optimizer state `table_opt/<name>/<opt>`

Leaves are named by their pytree path (`params/bottom_0/kernel`, `opt_state/0/mu/...`).
A *fingerprint* is a 32-bit hash of an array's exact bits and positions, a sum over
elements (mod 2^32), so it can be computed on device, or on host block by block, and
any split of the array gives the same value. Restores check them.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DENSE_KEYS = ("step", "params", "opt_state", "rng")
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


# ----------------------------------------------------------------------------- fingerprint
_M1, _M2, _M3 = 0x85EBCA6B, 0x9E3779B1, 0xC2B2AE35


def _words(dtype) -> int:
  return max(1, np.dtype(dtype).itemsize // 4)


def _bits32(x, xp):
  """Values as uint32 words `[..., w]` (bitwise, any dtype)."""
  if x.dtype == bool:
    return x.astype(xp.uint32)[..., None]
  size = np.dtype(x.dtype).itemsize
  if xp is np:
    x = np.ascontiguousarray(x)
    if size >= 4:
      return x.view(np.uint32).reshape(x.shape + (size // 4,))
    return x.view(f"uint{8 * size}").astype(np.uint32)[..., None]
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
  """uint32 [] hash of the exact bits of `x` and their positions (on device)."""
  bits = _bits32(x, jnp)
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(
        stride & 0xFFFFFFFF)
    stride *= bits.shape[axis]
  return jnp.sum(_mix(bits, index, jnp), dtype=jnp.uint32)


def fingerprint_np(block: np.ndarray, shape: tuple[int, ...],
                   start: tuple[int, ...] = ()) -> int:
  """Contribution of `block`, placed at `start` inside an array of `shape`, to that
  array's `fingerprint`; blocks tiling the array sum (mod 2^32) to its fingerprint."""
  block = np.asarray(block)
  bits = _bits32(block, np)
  full = tuple(shape) + (bits.shape[-1],)
  start = tuple(start) + (0,) * (len(full) - len(start))
  index = np.zeros((), np.int64)
  stride = 1
  for axis in reversed(range(len(full))):
    iota = np.arange(start[axis], start[axis] + bits.shape[axis], dtype=np.int64)
    index = index + (iota * stride).reshape((-1,) + (1,) * (len(full) - axis - 1))
    stride *= full[axis]
  index = (index & 0xFFFFFFFF).astype(np.uint32)
  with np.errstate(over="ignore"):
    h = _mix(bits, np.broadcast_to(index, bits.shape), np)
    return int(h.sum(dtype=np.uint64) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=32)
def _fingerprints_jit(treedef):
  del treedef
  return jax.jit(lambda leaves: jnp.stack([fingerprint(x) for x in leaves]))


def fingerprints(tree) -> dict[str, int]:
  """`{leaf name: fingerprint}` of a pytree of arrays on one set of devices."""
  named = leaf_names(tree)
  if not named:
    return {}
  leaves = [x for _, x in named]
  values = np.asarray(_fingerprints_jit(jax.tree.structure(leaves))(leaves))
  return {n: int(v) for (n, _), v in zip(named, values)}


# ----------------------------------------------------------------------------- dense part
def _key_data(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def _canonical_dense(dense):
  out = _key_data(dense)
  out["step"] = jnp.asarray(out["step"], jnp.int32)
  out["fingerprint"] = jnp.stack([fingerprint(x) for _, x in sorted(leaf_names(out))])
  return out


@functools.lru_cache(maxsize=8)
def _dense_jit(shardings_flat, treedef):
  return jax.jit(_canonical_dense, out_shardings=jax.tree.unflatten(treedef, shardings_flat))


def canonical_dense(state: Mapping, mesh) -> dict:
  """The dense part of a train state as stored: `{"step", "params", "opt_state", "rng",
  "fingerprint"}` (those present; typed keys → key data). Fresh arrays, made by one
  jitted program dispatched asynchronously, so the caller may donate `state` after."""
  rep = NamedSharding(mesh, P())
  dense = {k: state[k] for k in DENSE_KEYS if k in state}
  if not isinstance(dense.get("step"), jax.Array):
    dense["step"] = jax.device_put(jnp.asarray(dense.get("step", 0), jnp.int32), rep)

  def out_sharding(x):
    s = getattr(x, "sharding", None)
    if is_key(x) and isinstance(s, NamedSharding):
      return NamedSharding(s.mesh, P(*s.spec, None))
    return s if isinstance(s, jax.sharding.Sharding) else rep

  shardings = jax.tree.map(out_sharding, dense)
  shardings["fingerprint"] = rep
  flat, treedef = jax.tree.flatten(shardings)
  return _dense_jit(tuple(flat), treedef)(dense)


def key_impls(state: Mapping) -> dict[str, str]:
  """`{leaf name: PRNG impl name}` for typed-key leaves of the dense state."""
  dense = {k: state[k] for k in DENSE_KEYS if k in state}
  return {n: str(jax.random.key_impl(x)) for n, x in leaf_names(dense) if is_key(x)}


def describe_dense(dense: Mapping) -> dict:
  """Manifest entries for the stored dense tree: leaves and the fingerprint order."""
  leaves = {n: {"shape": list(np.shape(x)), "dtype": str(x.dtype)}
            for n, x in leaf_names({k: v for k, v in dense.items() if k != "fingerprint"})}
  return {"leaves": leaves,
          "fingerprint": sorted(leaves) if "fingerprint" in dense else []}
