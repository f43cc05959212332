"""The dense part of a checkpoint (`CheckpointManager`): orbax's array handler for saving
it (`register_array_handler`); for a restore, the target's abstract tree, checked against
the step's manifest (names, shapes, dtypes), fingerprint verification of what was read,
typed PRNG keys from their stored key data, and a NaN/inf check of a whole state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec.checkpoint import canonical as canonical_lib
from jaxrec.errors import ConfigError


# orbax splits the write of a replicated array over its replicas, each slice a program
# compiled per shape and device: dlrm_criteo's dense state on 8 devices compiled 88
# `jit(slice)` programs at each first save (~3 s). Replicas split only a slice this large.
REPLICA_PARALLEL_MIN_BYTES = 64 << 20


def register_array_handler() -> None:
  """Registers orbax's jax.Array handler, as orbax's default one (with its array metadata
  store) but with `REPLICA_PARALLEL_MIN_BYTES`; once per process (orbax keeps one
  registry; only the dense state goes through it here), without orbax's override warning
  (each run logged one) where its registry allows."""
  global _REGISTERED
  if _REGISTERED:
    return
  # pylint: disable-next=import-outside-toplevel
  from orbax.checkpoint._src.metadata import array_metadata_store
  # pylint: disable-next=import-outside-toplevel
  from orbax.checkpoint._src.serialization import type_handler_registry
  handler = ocp.type_handlers.ArrayHandler(
      array_metadata_store=array_metadata_store.Store(),
      min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
  type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, handler, override=True,
                                                         ignore_warnings=True)
  _REGISTERED = True


_REGISTERED = False


def _abstract(x, default_sharding):
  """Leaf of a target → ShapeDtypeStruct with sharding (typed keys → their key data)."""
  sharding = getattr(x, "sharding", None) or default_sharding
  if canonical_lib.is_key(x):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype,
                                sharding=canonical_lib.key_data_sharding(sharding, len(x.shape)))
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _by_devices(named):
  """Groups `[(name, array)]` by device set (one jitted program per group)."""
  groups: dict[Any, dict] = {}
  for name, x in named:
    groups.setdefault(frozenset(x.devices()), {})[name] = x
  return list(groups.values())


@jax.jit
def _all_finite(leaves):
  ok = [jnp.all(jnp.isfinite(x)) for x in leaves.values()
        if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(ok)) if ok else jnp.bool_(True)


def all_finite(state) -> bool:
  """True when every float leaf of `state` (dense and tables) is finite."""
  named = [(n, x) for n, x in canonical_lib.leaf_names(state) if not canonical_lib.is_key(x)]
  return all(bool(_all_finite(group).addressable_data(0)) for group in _by_devices(named))


def abstract_tree(manifest, collection, target, step_dir) -> dict:
  """ShapeDtypeStructs (with shardings) of the stored dense tree, after checking it
  matches `target` (ConfigError naming the difference)."""
  rep = NamedSharding(collection.mesh, P())
  abstract = {}
  # 'params' first: a changed model changes its optimizer state too, and the error should
  # name the parameters (not 'opt_state/0/mu/...')
  for key in sorted(manifest["contents"], key=lambda k: k != "params"):
    if key == "step":
      abstract["step"] = jax.ShapeDtypeStruct((), np.int32, sharding=getattr(
          target.get("step"), "sharding", rep))
      continue
    if key not in target:
      raise ConfigError(f"checkpoint {step_dir} holds '{key}' but the restore target has "
                        f"none{canonical_lib.MISSING_KEY_HINTS.get(key, '')}")
    abstract[key] = jax.tree.map(lambda x: _abstract(x, rep), target[key])
    _check_dense(key, abstract[key], manifest["leaves"], step_dir)
  if manifest.get("fingerprint"):
    abstract["fingerprint"] = jax.ShapeDtypeStruct((len(manifest["fingerprint"]),),
                                                   np.uint32, sharding=rep)
  return abstract


def verify(dense, manifest, table_prints, saved_tables, step_dir) -> None:
  """Compares fingerprints of what was restored with those saved (`saved_tables`: the
  tables', `tables.saved_fingerprints`); ValueError if not."""
  bad = []
  if manifest.get("fingerprint"):
    saved = dict(zip(manifest["fingerprint"],
                     np.asarray(dense["fingerprint"].addressable_data(0)).tolist()))
    named = canonical_lib.leaf_names({k: v for k, v in dense.items() if k != "fingerprint"})
    got = {}
    for group in _by_devices(named):
      got.update(canonical_lib.fingerprints(group))
    bad += [n for n in saved if got.get(n, saved[n]) != saved[n]]
  names = sorted(table_prints)
  read = np.array([table_prints[n] for n in names], np.uint64)
  if jax.process_count() > 1:   # each process read its own shards: add the parts
    read = np.asarray(multihost_utils.process_allgather(read)).sum(0, dtype=np.uint64)
  bad += [n for n, v in zip(names, read.tolist()) if saved_tables[n] != v & 0xFFFFFFFF]
  if bad:
    raise ValueError(f"fingerprint mismatch in {step_dir} for {sorted(bad)[:5]}: the stored "
                     "data differ from what was saved")


def _check_dense(key, abstract, leaves, step_dir) -> None:
  """Dense leaves of the target must match the stored ones (names, shapes, dtypes)."""
  want = {n: (list(x.shape), str(x.dtype)) for n, x in canonical_lib.leaf_names({key: abstract})}
  have = {n: (v["shape"], v["dtype"]) for n, v in leaves.items()
          if n == key or n.startswith(key + "/")}
  if want != have:
    # leaves one side lacks, then those of other shapes (a layer removed changes the one
    # before it too: only the missing ones were named)
    diff = sorted(set(want) ^ set(have)) + sorted(n for n in set(want) & set(have)
                                                  if want[n] != have[n])
    at = f"{len(diff)} leaves, e.g. " if len(diff) > 3 else ""
    error = ConfigError(f"'{key}' in checkpoint {step_dir} does not match the model at {at}"
                        f"{diff[:3]} (checkpoint: {[have.get(n, 'absent') for n in diff[:3]]}"
                        f", model: {[want.get(n, 'absent') for n in diff[:3]]})"
                        f"{canonical_lib.MISMATCH_HINTS.get(key, '')}")
    error.step_dir = step_dir   # the trainer adds the bindings changed since its config
    raise error


def structure_error(step_dir) -> ConfigError:
  """The error for a dense state whose leaves match the checkpoint's but whose structure
  does not: `adam` and `adamw` (an `EmptyState` more), or a `mask` added, hold the same
  `mu`/`nu` leaves. orbax's ValueError was taken for a corrupt step: every step was set
  aside as corrupt, and a valid one rejected where an older one restored."""
  error = ConfigError(
      f"'opt_state' in checkpoint {step_dir} has the same leaves as this run's but another "
      f"structure (e.g. adam vs adamw, or a mask added or removed)"
      f"{canonical_lib.MISMATCH_HINTS['opt_state']}")
  error.step_dir = step_dir   # as `_check_dense`'s
  return error


def wrap_keys(tree, target, impls, key):
  """Key data → typed PRNG keys where the target leaf is a typed key."""
  if target is None:
    return tree
  named = dict(canonical_lib.leaf_names({key: tree}))
  out = []
  for name, t in canonical_lib.leaf_names({key: target}):
    x = named[name]
    if canonical_lib.is_key(t):
      x = canonical_lib.wrap_key(x, impls.get(name, "threefry2x32"))
    out.append(x)
  return jax.tree.unflatten(jax.tree.structure(target), out)
