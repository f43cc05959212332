"""Canonical checkpoint layout: names, the dense part, and bit-exact fingerprints.

The train state (what the trainer holds) is

    {"step": int32 [], "params": dense pytree, "opt_state": optax pytree,
     "emb": EmbeddingState {"tables": {stack: [R, D]}, "opt": {stack: {name: array}}},
     "rng": uint32 [2] or a typed PRNG key,
     "item_freq": {name: array} (only with a two-tower model's `logq_correction`)}

A checkpoint stores it without any trace of the mesh or plan:

    state item (orbax pytree):  {"step", "params", "opt_state", "rng" (key data, uint32),
                                 ["item_freq",] "fingerprint": uint32 [L]}
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

from jaxrec.errors import CheckpointError

DENSE_KEYS = ("step", "params", "opt_state", "rng", "item_freq")


def check_keys(state) -> None:
  """A `CheckpointError` for keys of a train state a checkpoint does not hold (`DENSE_KEYS`
  and `emb`): saved without them, they were lost on disk without a word."""
  unknown = sorted(set(state) - set(DENSE_KEYS) - {"emb"})
  if unknown:
    raise CheckpointError(f"save: the state has keys {unknown} a checkpoint does not hold "
                          f"(it holds {list(DENSE_KEYS)} and 'emb'): keep the dense "
                          "optimizer's state under 'opt_state' and the rest (e.g. EMA "
                          "parameters) inside 'params' or 'opt_state'")
# why a restore target may lack a dense key the checkpoint holds, for the error
MISSING_KEY_HINTS = {"item_freq": " (its run bound TwoTower.logq_correction = True, with "
                                  "loss = 'in_batch_softmax': bind both to resume it, or "
                                  "train in a new --workdir)"}
# what to change when a dense part of the checkpoint has other leaves than the model's
MISMATCH_HINTS = {
    "opt_state": ": the dense optimizer (dense_optimizer.name, and its momentum, mask or "
                 "state dtypes; or dense_optimizer.learning_rate switched between a number "
                 "and a schedule, whose state keeps a step count) is not the one the "
                 "checkpoint was trained with; bind that one to resume, or train in a new "
                 "--workdir",
    "params": ": the dense model (its layer sizes, feature count or table dims) is not the "
              "one the checkpoint was trained with; bind that one to resume, or train in a "
              "new --workdir",
    "item_freq": ": the logQ estimator's bucket count (TwoTower.logq_buckets) is not the "
                 "one the checkpoint was trained with (the checkpoint's is the shape above); "
                 "bind that one to resume, or train in a new --workdir"}
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


def key_sharding(sharding, ndim: int):
  """The sharding of a typed key array of rank `ndim` placed by `sharding`, its spec cut to
  `ndim` entries: on one device JAX reports for a key wrapped eagerly (`wrap_key_data`)
  the spec of its key data, one entry longer than the key (which then saves no more)."""
  if not isinstance(sharding, NamedSharding) or len(sharding.spec) <= ndim:
    return sharding
  return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[:ndim]))


def key_data_sharding(sharding, ndim: int):
  """The sharding of the key data `[*shape, words]` of a typed key array `[*shape]` of rank
  `ndim` placed by `sharding` (any mesh size; the words are not split)."""
  sharding = key_sharding(sharding, ndim)
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  return NamedSharding(sharding.mesh, P(*spec, *[None] * (ndim + 1 - len(spec))))


def wrap_key(data: jax.Array, impl: str) -> jax.Array:
  """Key data `[*shape, words]` → typed key array `[*shape]` on the same devices, its
  sharding that of a key (`key_sharding`), so that it saves again."""
  key = jax.random.wrap_key_data(data, impl=impl)
  sharding = key.sharding
  fixed = key_sharding(sharding, key.ndim)
  return key if fixed is sharding else jax.device_put(key, fixed)


# ----------------------------------------------------------------------------- fingerprint
# fingerprint(x) = sum over words w of (w ^ P(position)) * M  (mod 2^32), where x is seen as
# uint32 words `[*shape, words]` and P xors one term per axis, ((i + 1) * K_axis). Any
# single changed or moved word changes it (multiplying by odd M is a bijection).
_M = 0x85EBCA6B
_K = (0x9E3779B1, 0xC2B2AE35, 0x27D4EB2F, 0x165667B1, 0xD3A2646C | 1, 0xFD7046C5, 0xB55A4F09)


def _axis_key(axis: int) -> int:
  return _K[axis % len(_K)] ^ (axis // len(_K))


def _bits32(x, xp):
  """Values as uint32 words `[..., w]` (bitwise, any dtype)."""
  if x.dtype == bool:
    return x.astype(xp.uint32)[..., None]
  size = np.dtype(x.dtype).itemsize
  if xp is np:
    x = np.asarray(x, order="C")
    if size >= 4:
      return x.view(np.uint32).reshape(x.shape + (size // 4,))
    return x.view(f"uint{8 * size}").astype(np.uint32)[..., None]
  if size >= 4:
    w = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return w if size > 4 else w[..., None]
  return jax.lax.bitcast_convert_type(x, getattr(jnp, f"uint{8 * size}")).astype(
      jnp.uint32)[..., None]


def fingerprint(x: jax.Array) -> jax.Array:
  """uint32 [] hash of the exact bits of `x` and their positions (on device)."""
  bits = _bits32(x, jnp)
  pos = jnp.zeros((), jnp.uint32)
  for axis in range(bits.ndim):
    iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
    pos = pos ^ ((iota + jnp.uint32(1)) * jnp.uint32(_axis_key(axis)))
  return jnp.sum((bits ^ pos) * jnp.uint32(_M), dtype=jnp.uint32)


_FINGERPRINT_ROWS_BYTES = 16 << 20   # fingerprint_np's pieces, as uint32 words (its temporaries)


def fingerprint_np(block: np.ndarray, shape: tuple[int, ...],
                   start: tuple[int, ...] = ()) -> int:
  """Contribution of `block`, placed at `start` inside an array of `shape`, to that
  array's `fingerprint`; blocks tiling the array sum (mod 2^32) to its fingerprint.
  Taken over row pieces of ~16 MiB of uint32 words: whole, a save's 1.2 GB piece of a
  table needed 1.2 GB of temporaries more (4.8 GB for int8 codes)."""
  block = np.asarray(block)
  word_bytes = 4 * max(1, block.dtype.itemsize // 4)   # what one element widens to
  if block.ndim == 0 or block.size * word_bytes <= _FINGERPRINT_ROWS_BYTES:
    return _fingerprint_piece(block, start)
  start = tuple(start) + (0,) * (block.ndim - len(start))
  rows = max(1, _FINGERPRINT_ROWS_BYTES // max(1, block[0].size * word_bytes))
  total = 0
  for i in range(0, len(block), rows):
    total += _fingerprint_piece(block[i:i + rows], (start[0] + i,) + start[1:])
  return total & 0xFFFFFFFF


def _fingerprint_piece(block: np.ndarray, start: tuple[int, ...]) -> int:
  bits = _bits32(block, np)
  start = tuple(start) + (0,) * (bits.ndim - len(start))
  with np.errstate(over="ignore"):
    terms = [((np.arange(s, s + n, dtype=np.uint64) + np.uint64(1)) * np.uint64(_axis_key(a))
              & np.uint64(0xFFFFFFFF)).astype(np.uint32)
             for a, (s, n) in enumerate(zip(start, bits.shape))]
    tail = np.zeros((), np.uint32)   # axes after the first: small, built once
    for a in range(1, bits.ndim):
      tail = tail[..., None] ^ terms[a].reshape((1,) * (a - 1) + (-1,))
    head = terms[0].reshape((-1,) + (1,) * (bits.ndim - 1))
    h = bits ^ head
    h ^= tail
    h *= np.uint32(_M)
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
  values = np.asarray(_fingerprints_jit(jax.tree.structure(leaves))(leaves).addressable_data(0))
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
    if is_key(x):
      s = key_data_sharding(s, x.ndim)
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
