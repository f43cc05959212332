"""Checkpoint manager: asynchronous, atomic saves of the whole train state over orbax;
restore onto any mesh and plan, falling back past corrupt checkpoints.

Layout of `directory` (one orbax step directory per checkpoint):

    <step>/state/       canonical pytree (see `canonical`): dense params + optax state,
                        one array per table and per table optimizer state, step, rng,
                        fingerprints; tensorstore zarr in an OCDBT database
    <step>/data_state/  data iterator state (JSON)
    <step>/meta/        run metadata given by the caller (JSON: plan, mesh, gin text, ...)
    <step>/manifest/    what the state holds: leaves, tables, fingerprint order (JSON)
    rejected/           steps that failed to restore (corrupt) or were rolled back,
                        moved here (never deleted) when a restore falls back past them

Atomicity comes from orbax: a save writes `<step>.orbax-checkpoint-tmp-*`, writes
`commit_success.txt` and renames it to `<step>` only when everything is written; orbax
never lists tmp directories and deletes leftovers (a save killed midway) when a manager
opens the directory. Old steps are deleted (beyond `max_to_keep`) only after a newer save
has committed.

Usage (trainer):

    ckpt = CheckpointManager(workdir / "checkpoints", max_to_keep=3, save_every=1000)
    restored = ckpt.restore(fresh_state, collection)   # None: fresh run
    ...
    ckpt.save(step, state, collection, data_state=it.state(), meta=run_meta)  # async
    ...
    ckpt.save(step, state, collection, ..., force=True); ckpt.close()
"""

from __future__ import annotations

import time
from typing import Any, Mapping, NamedTuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrec.checkpoint import canonical as canonical_lib
from jaxrec.checkpoint import storage
from jaxrec.checkpoint.storage import DATA_STATE, ITEMS, MANIFEST, META, STATE
from jaxrec.errors import ConfigError, JaxrecError

REJECTED_DIR = "rejected"


class CheckpointError(JaxrecError):
  """No usable checkpoint: every candidate is corrupt, or a requested step is absent."""


class Restored(NamedTuple):
  """What `CheckpointManager.restore` returns.

  state: the train state `{"step", "params", "opt_state", "emb", "rng"}` on the new mesh
    and plan (`emb` sharded by `collection.shardings()`, dense leaves as in `target`).
  data_state: the data iterator's state saved with it (JSON dict).
  meta: the run metadata saved with it (JSON dict).
  """
  state: dict
  data_state: dict
  meta: dict


def _jsonable(x):
  """Numpy / jax scalars and tuples → plain JSON types."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  return x


def _abstract(x):
  """Leaf of a target → ShapeDtypeStruct with sharding (typed keys → their key data)."""
  sharding = getattr(x, "sharding", None)
  if canonical_lib.is_key(x):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    if isinstance(sharding, NamedSharding):
      sharding = NamedSharding(sharding.mesh, P(*sharding.spec, None))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


@jax.jit
def _all_finite(leaves):
  ok = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(ok)) if ok else jnp.bool_(True)


def all_finite(state) -> bool:
  """True when every float leaf of `state` (dense and tables) is finite."""
  leaves = [x for x in jax.tree.leaves(state) if not canonical_lib.is_key(x)]
  by_devices: dict[Any, list] = {}
  for x in leaves:   # one program per device set
    by_devices.setdefault(frozenset(getattr(x, "devices", lambda: ())()), []).append(x)
  return all(bool(_all_finite(group)) for group in by_devices.values())


@gin.configurable(denylist=["directory", "read_only"])
class CheckpointManager:
  """Saves and restores train states under `directory` (see module docstring).

  Args:
    directory: where step directories live, e.g. `workdir/checkpoints`.
    max_to_keep: newest committed checkpoints kept (older ones deleted after a newer save
      commits); None keeps all.
    save_every: `save` without `force` writes only when `step % save_every == 0`
      (0: only forced saves).
    async_save: write in a background thread; `save` returns once the arrays are copied
      off the train state (the trainer may then donate or overwrite it).
    read_only: never writes, deletes or moves anything (tools, conversion).
    chunk_bytes: target zarr chunk size; smaller chunks let a restore on another mesh read
      less than a whole shard.
  """

  def __init__(self, directory: epath.PathLike, max_to_keep: int | None = 3,
               save_every: int = 0, async_save: bool = True, read_only: bool = False,
               chunk_bytes: int = 32 << 20):
    self.directory = epath.Path(directory)
    self.save_every = int(save_every)
    self.read_only = read_only
    self._chunk_bytes = chunk_bytes
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only, read_only=read_only, create=not read_only)
    self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  # ----------------------------------------------------------------------------- listing
  def all_steps(self) -> list[int]:
    """Committed steps, ascending (tmp directories of unfinished saves are never listed)."""
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(int(step))

  def check(self, step: int, full: bool = False) -> dict:
    """Raises if `step` is unreadable; `full` also reads every array and checks its
    fingerprint. Returns the step's manifest."""
    return storage.check_step(self.step_dir(step), full=full)

  def latest_valid_step(self, full: bool = False) -> int | None:
    """Newest step that passes `check` (warns about each newer one that does not);
    None when there are no checkpoints. Raises `CheckpointError` if none is valid."""
    steps = self.all_steps()
    errors = []
    for step in reversed(steps):
      try:
        self.check(step, full)
        return step
      except Exception as e:  # pylint: disable=broad-except
        self._warn_corrupt(step, e)
        errors.append((step, e))
    if errors:
      raise self._none_valid(errors)
    return None

  # ----------------------------------------------------------------------------- save
  def save(self, step: int, state: Mapping, collection, data_state: Mapping | None = None,
           meta: Mapping | None = None, force: bool = False) -> bool:
    """Starts saving `state` as checkpoint `step`; returns whether it did.

    Saves when `force` or `step % save_every == 0`, unless `step` is already saved.
    Blocks only to copy the state off the device buffers (and to wait for a previous
    save still in flight); writing happens in the background when `async_save`.

    Args:
      step: the global step (checkpoint name).
      state: `{"step", "params", "opt_state", "emb", "rng"}`; `emb` laid out by
        `collection`. Missing dense keys are simply not saved.
      collection: the `EmbeddingCollection` that laid out `state["emb"]`.
      data_state: JSON-able state of the data iterator.
      meta: JSON-able run metadata (plan json, mesh shape, gin text, ...).
    """
    step = int(step)
    if self.read_only:
      raise CheckpointError(f"{self.directory} was opened read-only")
    if not force and not (self.save_every > 0 and step % self.save_every == 0):
      return False
    if step in self.all_steps():
      logging.info("checkpoint %s already exists; not saving it again", self.step_dir(step))
      return False
    canonical = canonical_lib.to_canonical(state, collection)
    manifest = canonical_lib.describe(canonical, collection)
    manifest.update(step=step, key_impls=canonical_lib.key_impls(state))
    self._write(step, canonical, manifest, data_state, meta)
    return True

  def save_canonical(self, step: int, canonical: Mapping, data_state: Mapping | None = None,
                     meta: Mapping | None = None, manifest_extra: Mapping | None = None
                     ) -> None:
    """Saves an already canonical pytree (tools: import, conversion); `fingerprint` is
    computed here. Only the keys present are saved (e.g. tables alone)."""
    canonical = dict(canonical)
    canonical.pop("fingerprint", None)
    prints = canonical_lib.fingerprints(canonical)
    canonical["fingerprint"] = jnp.asarray(np.array([prints[n] for n in sorted(prints)],
                                                    np.uint32))
    manifest = canonical_lib.describe(canonical)
    manifest.update(step=int(step), key_impls={}, **(manifest_extra or {}))
    self._write(int(step), canonical, manifest, data_state, meta)

  def _write(self, step, canonical, manifest, data_state, meta):
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=self._chunk_bytes),
                             canonical)
    self._mgr.save(step, force=True, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(canonical, save_args=save_args),
        DATA_STATE: ocp.args.JsonSave(_jsonable(dict(data_state or {}))),
        META: ocp.args.JsonSave(_jsonable(dict(meta or {}))),
        MANIFEST: ocp.args.JsonSave(manifest)}))

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is committed."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight, then releases orbax's threads."""
    self._mgr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # ----------------------------------------------------------------------------- restore
  def restore(self, target: Mapping, collection, step: int | None = None,
              require_finite: bool = False) -> Restored | None:
    """Restores the newest usable checkpoint (at or before `step` when given).

    Tries steps newest first. A step that cannot be read or fails its fingerprint check
    is reported (`logging.warning`, naming its directory) and skipped; with
    `require_finite`, so is one holding NaN/inf. Once a step restores, the skipped newer
    ones are moved to `rejected/` (unless read-only) so that the run can save those step
    numbers again; nothing is ever deleted.

    Args:
      target: the new run's state or its dense part, `{"params", "opt_state", "rng"[,
        "step"]}`, as arrays (e.g. the freshly created state) or `ShapeDtypeStruct`s with
        shardings; `emb` is ignored. Leaves give shape, dtype and placement. Dense keys the
        checkpoint lacks (e.g. an imported TorchRec checkpoint holds only tables) are
        taken from `target`, which must then hold arrays.
      collection: the new run's `EmbeddingCollection` (any mesh and plan); tables are
        placed with `collection.shardings()`.
      step: newest step to consider; None: the latest.
      require_finite: skip checkpoints with non-finite values (rollback after NaN).

    Returns:
      `Restored(state, data_state, meta)`, or None if `directory` has no checkpoint.

    Raises:
      ConfigError: the checkpoint does not match the configuration (tables, shapes,
        dense structure); not a corruption, so there is no fallback.
      CheckpointError: checkpoints exist but none is usable, or `step` is not saved.
    """
    self.wait()
    self._mgr.reload()
    steps = self.all_steps()
    if step is not None:
      if int(step) not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                              f"(steps: {steps or 'none'})")
      steps = [s for s in steps if s <= int(step)]
    if not steps:
      return None
    skipped = []
    for s in reversed(steps):
      try:
        restored = self._restore_step(s, collection, target)
      except ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        self._warn_corrupt(s, e)
        skipped.append((s, e, "corrupt"))
        continue
      if require_finite and not all_finite(restored.state):
        logging.warning("checkpoint %s holds NaN/inf values; rolling back further",
                        self.step_dir(s))
        skipped.append((s, ValueError("non-finite values"), "nonfinite"))
        continue
      if skipped:
        logging.warning("restored checkpoint %s after skipping step(s) %s", self.step_dir(s),
                        ", ".join(str(x[0]) for x in skipped))
        for bad, _, reason in skipped:
          self._reject(bad, reason)
      return restored
    raise self._none_valid([(s, e) for s, e, _ in skipped])

  def restore_latest(self, target: Mapping, collection) -> tuple[dict, dict] | None:
    """`(state, data_state)` of the latest usable checkpoint, or None (fresh run)."""
    restored = self.restore(target, collection)
    return None if restored is None else (restored.state, restored.data_state)

  def _restore_step(self, step, collection, target) -> Restored:
    step_dir = self.step_dir(step)
    json_items = self._mgr.restore(step, args=ocp.args.Composite(**{
        MANIFEST: ocp.args.JsonRestore(), DATA_STATE: ocp.args.JsonRestore(),
        META: ocp.args.JsonRestore()}))
    manifest = json_items[MANIFEST]
    if not manifest or manifest.get("format") != canonical_lib.FORMAT:
      raise ValueError(f"{step_dir} has no jaxrec manifest")
    target = {k: v for k, v in target.items() if k != "emb"}
    abstract = self._abstract_state(manifest, collection, target, step_dir)
    restored = self._mgr.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract)}))[STATE]
    self._verify(restored, manifest, step_dir)

    state = {}
    impls = manifest.get("key_impls", {})
    for key in canonical_lib.DENSE_KEYS:
      if key in restored:
        state[key] = _wrap_keys(restored[key], target.get(key), impls, key)
      elif key in target:
        state[key] = target[key]
    if "step" not in state or isinstance(state["step"], jax.ShapeDtypeStruct):
      state["step"] = jax.device_put(jnp.int32(step), NamedSharding(collection.mesh, P()))
    missing = [k for k, v in state.items()
               if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(v))]
    if missing:
      raise ConfigError(f"checkpoint {step_dir} holds no {missing} (contents: "
                        f"{manifest['contents']}); pass initial values (arrays) for them in "
                        "`target`")
    state["emb"] = canonical_lib.stack_tables(collection, restored["tables"],
                                              restored.get("table_opt"))
    return Restored(state, json_items[DATA_STATE] or {}, json_items[META] or {})

  def _abstract_state(self, manifest, collection, target, step_dir) -> dict:
    """ShapeDtypeStructs (with shardings) of the stored canonical tree; checks it matches
    the configuration first (ConfigError naming the difference)."""
    leaves, contents = manifest["leaves"], manifest["contents"]
    stored = manifest["tables"]
    names = {t.name for t in collection.tables}
    if set(stored) != names:
      raise ConfigError(
          f"checkpoint {step_dir} has tables {sorted(stored)} but the configuration has "
          f"{sorted(names)} (missing: {sorted(names - set(stored))}, extra: "
          f"{sorted(set(stored) - names)})")
    for t in collection.tables:
      s = stored[t.name]
      if (s["rows"], s["dim"], s["dtype"]) != (t.rows, t.dim, str(np.dtype(t.dtype))):
        raise ConfigError(f"table '{t.name}': checkpoint {step_dir} has [{s['rows']}, "
                          f"{s['dim']}] {s['dtype']}, configuration has [{t.rows}, {t.dim}] "
                          f"{t.dtype}")
    tables, opt = canonical_lib.table_shardings(collection)
    abstract = {"tables": {t.name: jax.ShapeDtypeStruct((t.rows, t.dim), np.dtype(t.dtype),
                                                        sharding=tables[t.name])
                           for t in collection.tables}}
    want_opt = sorted(collection.optimizer.state_layout())
    have_opt = sorted(manifest["table_opt"].get(collection.tables[0].name, []))
    if "table_opt" in contents:
      if have_opt != want_opt:
        raise ConfigError(f"checkpoint {step_dir} has sparse optimizer state {have_opt}, the "
                          f"configured optimizer {type(collection.optimizer).__name__} "
                          f"needs {want_opt}")
      abstract["table_opt"] = {
          t: {k: jax.ShapeDtypeStruct(tuple(leaves[f"table_opt/{t}/{k}"]["shape"]),
                                      np.dtype(leaves[f"table_opt/{t}/{k}"]["dtype"]),
                                      sharding=s) for k, s in o.items()}
          for t, o in opt.items()}
    elif want_opt:
      logging.warning("checkpoint %s has no sparse optimizer state; starting it fresh",
                      step_dir)
    rep = NamedSharding(collection.mesh, P())
    for key in canonical_lib.DENSE_KEYS:
      if key not in contents:
        continue
      if key == "step":
        abstract["step"] = jax.ShapeDtypeStruct((), np.int32, sharding=getattr(
            target.get("step"), "sharding", rep))
        continue
      if key not in target:
        raise ConfigError(f"checkpoint {step_dir} holds '{key}' but the restore target has "
                          "none")
      abstract[key] = jax.tree.map(_abstract, target[key])
      _check_dense(key, abstract[key], leaves, step_dir)
    if manifest.get("fingerprint"):
      abstract["fingerprint"] = jax.ShapeDtypeStruct((len(manifest["fingerprint"]),),
                                                     np.uint32, sharding=rep)
    return abstract

  def _verify(self, restored, manifest, step_dir) -> None:
    """Compares fingerprints of the restored arrays with the saved ones."""
    if not manifest.get("fingerprint"):
      return
    saved = dict(zip(manifest["fingerprint"], np.asarray(restored["fingerprint"]).tolist()))
    got = canonical_lib.fingerprints({k: restored[k] for k in canonical_lib.TABLE_KEYS
                                      if k in restored})
    dense = {k: restored[k] for k in canonical_lib.DENSE_KEYS if k in restored}
    by_devices: dict[Any, dict] = {}
    for name, x in canonical_lib.leaf_names(dense):
      by_devices.setdefault(frozenset(x.devices()), {})[name] = x
    for group in by_devices.values():
      got.update(canonical_lib.fingerprints(group))
    bad = sorted(n for n in saved if got.get(n, saved[n]) != saved[n])
    if bad:
      raise ValueError(f"fingerprint mismatch in {step_dir} for {bad[:5]}: the stored data "
                       "differ from what was saved")

  # ----------------------------------------------------------------------------- failures
  def _warn_corrupt(self, step, error) -> None:
    logging.warning("checkpoint %s is corrupt or unreadable, falling back to the previous "
                    "one: %s: %s", self.step_dir(step), type(error).__name__,
                    str(error).splitlines()[0][:500] if str(error) else "")

  def _none_valid(self, errors) -> CheckpointError:
    detail = "; ".join(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                       for s, e in errors)
    return CheckpointError(f"no valid checkpoint in {self.directory}: every one failed to "
                           f"restore ({detail}). Fix or move them away to start afresh.")

  def _reject(self, step, reason) -> None:
    """Moves step directory `step` to `rejected/` (read-only managers leave it)."""
    if self.read_only:
      return
    dest = self.directory / REJECTED_DIR / f"{step}.{reason}.{time.time_ns()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    self.step_dir(step).rename(dest)
    logging.warning("moved checkpoint %s to %s", self.step_dir(step), dest)
    self._mgr.reload()


def _check_dense(key, abstract, leaves, step_dir) -> None:
  """Dense leaves of the target must match the stored ones (names, shapes, dtypes)."""
  want = {n: (list(x.shape), str(x.dtype)) for n, x in canonical_lib.leaf_names({key: abstract})}
  have = {n: (v["shape"], v["dtype"]) for n, v in leaves.items()
          if n == key or n.startswith(key + "/")}
  if want != have:
    diff = sorted(set(want) ^ set(have)) or sorted(n for n in want if want[n] != have[n])
    raise ConfigError(f"'{key}' in checkpoint {step_dir} does not match the model: "
                      f"differs at {diff[:5]} (checkpoint: "
                      f"{[(n, have.get(n)) for n in diff[:3]]}, model: "
                      f"{[(n, want.get(n)) for n in diff[:3]]})")


def _wrap_keys(tree, target, impls, key):
  """Key data → typed PRNG keys where the target leaf is a typed key."""
  if target is None:
    return tree
  named = dict(canonical_lib.leaf_names({key: tree}))
  out = []
  for name, t in canonical_lib.leaf_names({key: target}):
    x = named[name]
    if canonical_lib.is_key(t):
      x = jax.random.wrap_key_data(x, impl=impls.get(name, "threefry2x32"))
    out.append(x)
  return jax.tree.unflatten(jax.tree.structure(target), out)
