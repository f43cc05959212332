"""Checkpoint manager: asynchronous, atomic saves of the whole train state over orbax;
restore onto any mesh and plan, falling back past corrupt checkpoints.

Layout of `directory` (one orbax step directory per checkpoint):

    <step>/state/       dense part (orbax pytree, see `canonical`): step, params, optax
                        state, rng key data, fingerprints
    <step>/embeddings/  one zarr array per table and per table optimizer state, by name
                        (see `tables`): independent of mesh and plan
    <step>/data_state/  data iterator state (JSON)
    <step>/meta/        run metadata given by the caller (JSON: plan, mesh, gin text, ...)
    <step>/manifest/    what the state holds: dense leaves, tables, saved plan/mesh (JSON)
    rejected/           steps a restore skipped (corrupt, or NaN on rollback), moved here
                        so the run can save those step numbers again; never deleted

Atomicity is orbax's (0.12.8, local/POSIX filesystems: `AtomicRenameTemporaryPath`): a
save writes everything into `<step>.orbax-checkpoint-tmp*`, then `commit_success.txt`,
then renames the directory to `<step>`. Orbax lists only renamed directories and, when a
manager opens the directory, deletes tmp leftovers of saves killed midway. Steps beyond
`max_to_keep` are deleted only after a newer save has committed.

Usage (trainer):

    ckpt = CheckpointManager(workdir / "checkpoints", max_to_keep=3, save_every=1000)
    restored = ckpt.restore(fresh_state, collection)          # None: nothing saved yet
    ...
    ckpt.save(step, state, collection, data_state=..., meta=...)   # returns quickly
    ...
    ckpt.save(step, state, collection, ..., force=True); ckpt.close()
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
import types
from typing import Any, Mapping, NamedTuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as preservation
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrec import futures as futures_lib
from jaxrec.checkpoint import canonical as canonical_lib
from jaxrec.checkpoint import compatible as compatible_lib
from jaxrec.checkpoint import dense as dense_lib
from jaxrec.checkpoint import device_copy
from jaxrec.checkpoint import offloaded as offloaded_lib
from jaxrec.checkpoint import steps as steps_lib
from jaxrec.checkpoint import storage
from jaxrec.checkpoint import tables as tables_lib
from jaxrec.checkpoint.storage import DATA_STATE, ITEMS, MANIFEST, META, STATE, TABLES
from jaxrec.embedding.specs import flag
from jaxrec.errors import CheckpointError, ConfigError
from jaxrec.sharding.mesh import mesh_shape

REJECTED_DIR = offloaded_lib.REJECTED   # rejected steps: `<step>.<reason>.<ns>`


class _NonFinite(Exception):
  """A checkpoint step holds NaN/inf values (skipped by a `require_finite` restore)."""


def _check_whole_specs(collection, then: Mapping, now: Mapping, step_dir) -> None:
  """ConfigError when a table offloaded by the saving run, and not passed in `offloaded`,
  has its device cache's rows in `collection`: the caller forgot `offloaded=`."""
  for t in collection.tables:
    info = then.get(t.name) or {}
    if t.name not in now and info.get("cache_rows") == t.rows != info.get("rows"):
      raise ConfigError(
          f"table '{t.name}': the collection holds {t.rows} rows, the device cache of the "
          f"offloaded table ({info.get('rows')} rows) in checkpoint {step_dir}; pass the "
          "whole TableSpec of each offloaded table as restore(offloaded={name: spec})")


def _warn_fresh(step_dir, fresh, collection, index: Mapping) -> None:
  """Warns that the sparse optimizer state of the tables `fresh` starts fresh (the
  checkpoint holds none of theirs: e.g. saved with SGD, or a TorchRec import), naming
  them and their optimizer unless the checkpoint holds no optimizer state at all."""
  if not fresh:
    return
  if not any(n.startswith("table_opt/") for n in index["arrays"]):
    logging.warning("checkpoint %s has no sparse optimizer state; starting it fresh",
                    step_dir)
    return
  named = [f"'{t}' ({type(collection.optimizer_of(t)).__name__})" for t in fresh[:20]]
  more = f" and {len(fresh) - 20} more" if len(fresh) > 20 else ""
  logging.warning("checkpoint %s has no sparse optimizer state of table(s) %s%s (saved with "
                  "an optimizer without state, e.g. SGD); starting theirs fresh, the other "
                  "tables' restored", step_dir, ", ".join(named), more)


class Restored(NamedTuple):
  """What `CheckpointManager.restore` returns.

  state: the train state `{"step", "params", "opt_state", "emb", "rng"}` on the new mesh
    and plan (`emb` sharded by `collection.shardings()`, dense leaves as in `target`).
  data_state: the data iterator's state saved with it (JSON dict).
  meta: the run metadata saved with it (JSON dict).
  host_tables: `{table: offloaded.StoredTable}`: tables the checkpoint holds whole that
    this run offloads (`restore(offloaded=...)`); the offload tier fills their stores from
    these (`OffloadTier.restore`). (`state` holds zeros for the device cache of every
    table this run offloads: the tier starts the caches empty.)
  """
  state: dict
  data_state: dict
  meta: dict
  host_tables: Mapping[str, Any] = types.MappingProxyType({})


def _jsonable(x):
  """Numpy / jax scalars and tuples → plain JSON types."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  return x


class _Protected:
  """Orbax preservation policy: the steps in `steps` (`CheckpointManager.protect`)."""

  def __init__(self):
    self.steps: frozenset = frozenset()

  def should_preserve(self, checkpoints, *, context):  # pylint: disable=unused-argument
    steps = self.steps   # one read: `protect` may replace it from another thread
    return [info.step in steps for info in checkpoints]


# max_to_keep / save_every: the trainer passes --keep_checkpoints / --checkpoint_every, so a
# binding of them would never apply
@gin.configurable(denylist=["directory", "read_only", "max_to_keep", "save_every"])
class CheckpointManager:
  """Saves and restores train states under `directory` (see module docstring).

  Args:
    directory: where step directories live, e.g. `workdir/checkpoints`.
    max_to_keep: newest committed checkpoints kept (older ones are deleted after a newer
      save commits); None keeps all.
    save_every: if > 0, `save` without `force` skips steps that are not multiples of it
      (0: every `save` call writes; the caller decides).
    async_save: write in background threads; `save` returns once the state is copied to
      host (the trainer may then donate or overwrite it).
    read_only: never writes, deletes or moves anything (tools, conversion).
    chunk_bytes: zarr chunk size of stored tables; a restore reads whole chunks.
    device_copy: with `async_save`, copy the tables on their devices and leave the copy to
      host to the background thread (`checkpoint.device_copy`): `auto` when the devices
      have room for it (GPUs with free memory; never on CPU), or True / False.
  """

  def __init__(self, directory: epath.PathLike, max_to_keep: int | None = 3,
               save_every: int = 0, async_save: bool = True, read_only: bool = False,
               chunk_bytes: int = tables_lib.CHUNK_BYTES, device_copy: bool | str = "auto"):
    if max_to_keep is not None and max_to_keep < 1:   # orbax would delete every checkpoint
      raise ConfigError(f"max_to_keep (--keep_checkpoints) must be at least 1, got "
                        f"{max_to_keep}: fewer would delete every checkpoint, the last included")
    async_save = flag(async_save, "CheckpointManager.async_save")   # 'False' is truthy
    self._device_copy = flag(device_copy, "CheckpointManager.device_copy", "auto")
    self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
    self.save_every = int(save_every)
    self.read_only = read_only
    self._chunk_bytes = int(chunk_bytes)
    self._host_buffers: dict = {}   # host copies of the tables, reused by every save
    # Multi-process: orbax's cross-process syncs must not interleave with training
    # collectives in a different order on each process, so saves run in the caller there.
    self._executor = (concurrent.futures.ThreadPoolExecutor(1, "jaxrec_checkpoint")
                      if async_save and not read_only and jax.process_count() == 1 else None)
    self._pending: concurrent.futures.Future | None = None
    self._saving: int | None = None   # the step of the save in flight (its error names it)
    self._failed_save: int | None = None   # a save whose `CheckpointError` was raised
    self.restore_warnings: list[str] = []   # steps restores skipped, for launch.py's stderr
    self._threads_at_save: set = set()   # threads before it (`futures_lib.join_threads`)
    # the newest `max_to_keep`, and the steps `protect` names (early stopping's best)
    self._protected = _Protected()
    keep = None if read_only or max_to_keep is None else preservation.AnyPreservationPolicy(
        [preservation.LatestN(n=max_to_keep), self._protected])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keep,
        save_interval_steps=0 if read_only else 1, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only, read_only=read_only, create=not read_only,
        save_root_metadata=not read_only)
    if not read_only and max_to_keep is not None:
      steps_lib.refuse_linked_steps(self.directory)
      steps_lib.warn_only_unfinished(self.directory)   # orbax removes them: a fresh start
    dense_lib.register_array_handler()
    self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  # ----------------------------------------------------------------------------- listing
  def all_steps(self) -> list[int]:
    """Committed steps, ascending (tmp directories of unfinished saves are never listed)."""
    return sorted(self._mgr.all_steps())

  def steps_on_disk(self) -> list[int]:
    """Step directories present now, ascending: committed ones, including those a save in
    flight will rotate out when it commits (`all_steps` already leaves them out)."""
    return steps_lib.step_dirs(self.directory)

  def protect(self, steps) -> None:
    """Keeps checkpoints `steps` (those saved, and those saved later) past `max_to_keep`,
    in place of the steps an earlier call named (early stopping's best step; `()`: none).
    Rotation decides when a save starts: a step dropped here goes at the next save."""
    self._protected.steps = frozenset(int(s) for s in steps)

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(int(step))

  def check(self, step: int, full: bool = False) -> dict:
    """Raises if checkpoint `step` is unreadable; `full` also reads every array and checks
    its fingerprint. Returns the step's manifest."""
    return storage.check_step(self.step_dir(step), full=full, step=step)

  def latest_valid_step(self, full: bool = False) -> int | None:
    """Newest step that passes `check` (warning about each newer corrupt one; one deleted
    meanwhile by a run saving into the directory is skipped quietly); None when there are
    no checkpoints. Raises `CheckpointError` if none is valid (`rotation.Rotated` if every
    one was deleted while it was checked)."""
    return steps_lib.latest_valid(self.directory, self.all_steps(),
                                  lambda step: self.check(step, full))

  # ----------------------------------------------------------------------------- save
  def save(self, step: int, state: Mapping, collection, data_state: Mapping | None = None,
           meta: Mapping | None = None, force: bool = False) -> bool:
    """Starts saving `state` as checkpoint `step`; returns whether it did.

    Saves unless `step` is already saved or (without `force`) `save_every > 0` does not
    divide it.
    Blocks to wait for a previous save still in flight and to copy the tables to host
    (with `device_copy`, only to copy them on their devices); with `async_save` everything
    else (orbax's save, writing, commit) runs in background threads, and an error there is
    raised by the next `save`, `wait` or `close`.

    Args:
      step: the global step (checkpoint name).
      state: `{"step", "params", "opt_state", "emb", "rng"}`; `emb` laid out by
        `collection`. Dense keys that are missing are not saved.
      collection: the `EmbeddingCollection` that laid out `state["emb"]`.
      data_state: JSON-able state of the data iterator.
      meta: JSON-able run metadata (plan json, mesh shape, gin text, ...).
    """
    step = int(step)
    if self.read_only:
      raise CheckpointError(f"{self.directory} was opened read-only")
    if not force and self.save_every > 0 and step % self.save_every:
      return False
    canonical_lib.check_keys(state)   # others were left out (`save -> True`) unsaid
    dense = canonical_lib.canonical_dense(state, collection.mesh)   # async: fresh copies
    emb = state["emb"]
    in_background = self.copies_on_device(emb)
    if in_background:
      emb = device_copy.copy(emb)   # async too: the host copy waits for the background
    self.wait()   # the previous save commits first: one save in memory, buffers reusable
    if step in self.all_steps():
      logging.info("checkpoint %s already exists; not saving it again", self.step_dir(step))
      return False
    copy_to_host = lambda: tables_lib.host_pieces(collection, emb, self._host_buffers)
    pieces = copy_to_host if in_background else copy_to_host()
    arrays = tables_lib.stored_arrays(collection)
    manifest = {"key_impls": canonical_lib.key_impls(state),
                "saved_plan": collection.plan.to_json(),
                "saved_mesh": mesh_shape(collection.mesh),
                # `opt`: the table's own optimizer's state (`storage` checks the index)
                "tables": {t.name: {"rows": t.rows, "dim": t.dim, "dtype": t.dtype,
                                    "opt": sorted(collection.optimizer_of(t.name)
                                                  .state_layout())}
                           for t in collection.tables}}
    self._write(step, dense, arrays, pieces, manifest, data_state, meta)
    return True

  def copies_on_device(self, emb) -> bool:
    """Whether `save` copies the tables `emb` on their devices and leaves the copy to host
    to the background thread (`device_copy`; needs `async_save`)."""
    return self._executor is not None and (
        self._device_copy is True or (self._device_copy == "auto" and device_copy.fits(emb)))

  def save_arrays(self, step: int, tables: Mapping[str, np.ndarray],
                  table_opt: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                  data_state: Mapping | None = None, meta: Mapping | None = None) -> None:
    """Saves per-table host arrays alone as checkpoint `step` (tools: import). A run
    restoring it takes dense values from `init` or its `target`; see `restore`. A table
    may also be given as an object with `shape`, `dtype` and `load()`, read when it is
    written (one table in memory at a time)."""
    arrays, pieces = {}, []
    for name, x in tables.items():
      arrays[tables_lib.table_name(name)] = (tuple(x.shape), str(x.dtype))
      pieces.append(tables_lib.Piece(tables_lib.table_name(name), (0,) * len(x.shape),
                                     getattr(x, "load", x)))
    for name, opt in (table_opt or {}).items():
      for k, x in opt.items():
        arrays[tables_lib.opt_name(name, k)] = (tuple(x.shape), str(x.dtype))
        pieces.append(tables_lib.Piece(tables_lib.opt_name(name, k), (0,) * x.ndim, x))
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("d",))
    dense = canonical_lib.canonical_dense({"step": jnp.int32(step)}, mesh)
    manifest = {"key_impls": {},
                "tables": {n: {"rows": int(x.shape[0]), "dim": int(x.shape[1]),
                               "dtype": str(x.dtype),
                               "opt": sorted((table_opt or {}).get(n, {}))}
                           for n, x in tables.items()}}
    self._write(int(step), dense, arrays, pieces, manifest, data_state, meta)

  def _write(self, step, dense, arrays, pieces, manifest, data_state, meta):
    """Hands the save to orbax: in the background thread when `async_save` (orbax's own
    blocking part, e.g. starting its threads, then stays off the training loop too)."""
    data_state = _jsonable(dict(data_state or {}))   # snapshot now
    meta = _jsonable(dict(meta or {}))
    self._saving, self._threads_at_save = step, set(threading.enumerate())
    if self._executor is None:
      with self._save_errors():
        self._orbax_save(step, dense, arrays, pieces, manifest, data_state, meta)
    else:
      self._pending = self._executor.submit(self._orbax_save, step, dense, arrays, pieces,
                                            manifest, data_state, meta)

  def _orbax_save(self, step, dense, arrays, pieces, manifest, data_state, meta):
    """`pieces`: the tables' host pieces, or a function that copies them to host."""
    if callable(pieces):
      pieces = pieces()
    manifest = dict(
        manifest, format=canonical_lib.FORMAT, version=canonical_lib.VERSION, step=step,
        contents=sorted(k for k in dense if k != "fingerprint"),
        **canonical_lib.describe_dense(dense))
    self._mgr.save(step, force=True, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(dense),
        TABLES: tables_lib.TablesSave(arrays, pieces, self._chunk_bytes),
        DATA_STATE: ocp.args.JsonSave(data_state),
        META: ocp.args.JsonSave(meta),
        MANIFEST: ocp.args.JsonSave(manifest)}))

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is committed; raises its error if it
    failed."""
    pending, self._pending = self._pending, None
    with self._save_errors():
      if pending is not None:
        pending.result()
      self._mgr.wait_until_finished()
    self._saving = None

  @contextlib.contextmanager
  def _save_errors(self):
    """A save failing on the filesystem (disk full, read-only, ...) raises `CheckpointError`
    naming the step, the file and the checkpoint kept; other errors pass unchanged."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      futures_lib.join_threads(self._threads_at_save, "orbax.")   # its other items' writers
      step, self._saving = self._saving, None      # this save is over, whatever failed
      cause = storage.io_failure(e)
      if cause is None or step is None:
        raise
      kept = [s for s in self.steps_on_disk() if s != step]
      last = (f"the last checkpoint (step {kept[-1]}) is intact" if kept
              else "no earlier checkpoint exists")
      self._failed_save = step   # orbax's close() raises the same failure again
      raise CheckpointError(f"saving checkpoint {step} in {self.directory} failed: {cause}; "
                            f"{last}") from e

  def close(self) -> None:
    """Waits for the save in flight, then releases orbax's threads."""
    try:
      self.wait()
    finally:
      # orbax's close() does not wait for the clean-up of old tmp directories it starts in a
      # thread at creation: a run stopping early (a data error) printed its traceback at exit
      await_cleanup = getattr(self._mgr, "_maybe_await_cleanup_tmp_directory", None)
      if await_cleanup is not None:   # a private orbax method: absent in other versions
        await_cleanup()
      try:
        self._mgr.close()
      except Exception:  # pylint: disable=broad-except  (orbax raises a failed save's
        if self._failed_save is None:   # error again: a full disk ended in its traceback)
          raise
        logging.debug("orbax's close() raised checkpoint %d's failure again", self._failed_save,
                      exc_info=True)
      if self._executor is not None:
        self._executor.shutdown()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # ----------------------------------------------------------------------------- restore
  def restore(self, target: Mapping, collection, step: int | None = None,
              require_finite: bool = False, init=None,
              offloaded: Mapping[str, Any] | None = None,
              snapshot_check: str = "full") -> Restored | None:
    """Restores the newest usable checkpoint (at or before `step` when given).

    Tries steps newest first. A step that cannot be read or fails its fingerprint check
    is reported (`logging.warning`, naming its directory) and skipped; with
    `require_finite`, so is one holding NaN/inf. Once a step restores, every newer step
    (skipped ones, and those after an explicit `step`: the run continues from the
    restored one) is moved to `rejected/`, unless read-only; nothing is ever deleted.

    Args:
      target: the new run's state or its dense part, `{"params", "opt_state", "rng"[,
        "step"]}`, as arrays (e.g. the freshly created state) or `ShapeDtypeStruct`s with
        shardings; `emb` is ignored. Leaves give shape, dtype and placement. Dense keys the
        checkpoint lacks (an imported TorchRec checkpoint holds only tables) come from
        `init` when given, else from `target`, which must then hold arrays; its step is
        then the directory's.
      collection: the new run's `EmbeddingCollection`, any mesh and plan; tables are
        placed with `collection.shardings()`, each device reading only its shard.
      step: newest step to consider; None: the latest.
      require_finite: skip checkpoints with non-finite values (rollback after NaN).
      init: optional; called (no arguments) for fresh values (arrays, e.g.
        `state.create_dense`) of the dense keys the checkpoint lacks, which then do not come
        from `target` (a NaN rollback to a tables-only import must not keep the diverged
        dense parameters).
      offloaded: `{table: TableSpec}` (the whole table) of the tables this run offloads,
        whose `collection` spec is their device cache. Tables may have moved since the
        save: one offloaded then but not now is read whole from its offload snapshot; one
        the checkpoint holds whole but offloaded now comes back in `Restored.host_tables`
        (see `jaxrec.checkpoint.offloaded`).
      snapshot_check: what is checked of the offload snapshot of a step before it is
        used (`OffloadConfig.snapshot_check`): `full` (sizes and CRC32s) or `sizes`.

    Returns:
      `Restored`, or None if `directory` has no checkpoint.

    Raises:
      ConfigError: the checkpoint does not fit the configuration (tables, shapes, dense
        structure, optimizer); not a corruption, so there is no fallback.
      CheckpointError: checkpoints exist but none is usable, `step` is not saved, or a
        file of one cannot be read (EIO: `steps.stop_if_unreadable`; no fallback then).
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
        restored = self._restore_step(s, collection, target, init, offloaded, require_finite,
                                      snapshot_check == "full")
        if require_finite and not dense_lib.all_finite(restored.state):
          raise _NonFinite()
      except ConfigError:
        raise
      except _NonFinite:
        logging.warning("checkpoint %s holds NaN/inf values; rolling back further",
                        self.step_dir(s))
        skipped.append((s, ValueError("non-finite values"), "nonfinite"))
        continue
      except Exception as e:  # pylint: disable=broad-except
        steps_lib.stop_if_unreadable(self.step_dir(s), e)
        steps_lib.warn_corrupt(self.step_dir(s), e)
        skipped.append((s, e, "corrupt"))
        continue
      if skipped:
        logging.warning("restored checkpoint %s after skipping step(s) %s", self.step_dir(s),
                        ", ".join(str(x[0]) for x in skipped))
        first = skipped[0]
        self.restore_warnings.append(
            f"checkpoint(s) {', '.join(str(x[0]) for x in skipped)} of {self.directory} "
            f"skipped ({first[2]}: {steps_lib.first_line(first[1], 200)}) and moved to "
            f"{self.directory / REJECTED_DIR}; resumed from step {s}")
      reasons = {bad: reason for bad, _, reason in skipped}
      for newer in [n for n in self.all_steps() if n > s]:
        self._reject(newer, reasons.get(newer, "superseded"))
      return restored
    if require_finite and all(reason == "nonfinite" for _, _, reason in skipped):
      # a rollback whose every checkpoint holds NaN/inf (a state can overflow while its
      # loss stays finite): set them aside and start from the initial state, as when nothing
      # was saved (it was "no valid checkpoint", and the rerun resumed the same inf state)
      for bad, _, reason in skipped:
        self._reject(bad, reason)
      return None
    raise steps_lib.none_valid(self.directory, [(s, e) for s, e, _ in skipped])

  def _restore_step(self, step, collection, target, init=None, offloaded=None,
                    require_finite=False, full_check=True) -> Restored:
    step_dir = self.step_dir(step)
    # read directly (not orbax's JsonRestore): a damaged one is named by its file and line
    manifest, meta, data_state = (storage.read_json(step_dir, item)
                                  for item in (MANIFEST, META, DATA_STATE))
    if not manifest or manifest.get("format") != canonical_lib.FORMAT:
      raise ValueError(f"{step_dir} has no jaxrec manifest")
    storage.check_manifest_step(manifest, step_dir, step)   # copied or renamed by hand
    # Tables offloaded now are checked whole and not read (their caches start empty): from
    # the checkpoint if it held them on the device (then copied to the tier: `host_tables`),
    # else from the step's offload snapshot, which also gives the whole arrays of tables
    # offloaded when saved but on the device now. Cache sizes may differ between the runs.
    now = dict(offloaded or {})
    then = (meta.get("offload") or {}).get("tables") or {}
    _check_whole_specs(collection, then, now, step_dir)
    stored_index = tables_lib.read_index(step_dir / TABLES)
    saved = tables_lib.saved_fingerprints(step_dir / TABLES)
    snapshot = offloaded_lib.snapshot_arrays(step_dir, sorted(then), full_check, own_only=True)
    index = offloaded_lib.with_sources(stored_index, snapshot)
    fresh_opt = compatible_lib.check_compatible(index, collection, str(step_dir), now)
    sources = {n: a for n, a in snapshot.items() if n.split("/")[1] not in now}
    # what restoring does not read of the tables offloaded now (caches, or whole tables
    # for the tier) is still checked: fingerprints, and NaN/inf for a rollback
    unread = [n for n in stored_index["arrays"] if n.split("/")[1] in now]
    unread += tables_lib.dequantized_parts(stored_index, [   # read as float32, not as saved
        tables_lib.table_name(t.name) for t in collection.tables if t.name not in now])
    if not offloaded_lib.check_stored(step_dir / TABLES, unread, saved) and require_finite:
      raise _NonFinite()
    if require_finite and not offloaded_lib.all_finite(   # offloaded then and now: the tier
        {n: a for n, a in snapshot.items() if n.split("/")[1] in now},   # takes them unread
        f"checkpoint {step_dir}"):
      raise _NonFinite()
    _warn_fresh(step_dir, fresh_opt, collection, index)
    target = {k: v for k, v in target.items() if k != "emb"}
    abstract = dense_lib.abstract_tree(manifest, collection, target, step_dir)
    try:
      restored = self._mgr.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract),
          TABLES: tables_lib.TablesRestore(collection, fresh_opt, sources, tuple(now))}))
    except ValueError as e:   # the leaves matched (abstract_tree), the nodes between not
      if "tree structures do not match" not in str(e):
        raise
      raise dense_lib.structure_error(step_dir) from None
    dense, (emb, table_prints) = restored[STATE], restored[TABLES]
    dense_lib.verify(dense, manifest, table_prints, saved, step_dir)

    state, fresh = {}, None
    initialised = [k for k in canonical_lib.DENSE_KEYS
                   if k not in dense and k in target and k != "step"]
    if "params" in initialised:   # an import holds tables only: say what starts over
      logging.warning("checkpoint %s holds tables only (e.g. a TorchRec import): %s start "
                      "from their initial values", step_dir, ", ".join(initialised))
    elif initialised:   # e.g. item_freq: saved without TwoTower.logq_correction
      logging.warning("checkpoint %s holds no %s: it starts from its initial values",
                      step_dir, ", ".join(initialised))
    for key in canonical_lib.DENSE_KEYS:
      if key in dense:
        state[key] = dense_lib.wrap_keys(dense[key], target.get(key),
                                         manifest.get("key_impls", {}), key)
      elif key == "step":   # a tables-only checkpoint: its step is the directory's
        state[key] = jax.device_put(jnp.int32(step), NamedSharding(collection.mesh, P()))
      # ... and its dense values fresh, even when `target` has some (only for keys the target
      # wants: every resume built and discarded a fresh dense model for `item_freq`)
      elif init is not None and key in target and key in (
          fresh := init() if fresh is None else fresh):
        state[key] = fresh[key]
      elif key in target:
        state[key] = target[key]
    missing = [k for k, v in state.items()
               if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(v))]
    if missing:
      raise ConfigError(f"checkpoint {step_dir} holds no {missing} (contents: "
                        f"{manifest['contents']}); pass initial values (arrays) for them in "
                        "`target`")
    state["emb"] = emb
    host = offloaded_lib.host_tables(step_dir / TABLES, stored_index, snapshot, now, then,
                                     collection.optimizer, fresh_opt, str(step_dir))
    return Restored(state, data_state, meta, host)

  # ----------------------------------------------------------------------------- failures
  def _reject(self, step, reason) -> None:
    """Moves step directory `step` to `rejected/`, and its offload snapshot beside the
    checkpoints (if any) to `offload_snapshots/rejected/` under the same name: saving that
    step again would replace it, and a rejected checkpoint is never deleted (read-only
    managers leave both)."""
    if self.read_only:
      return
    dest = self.directory / REJECTED_DIR / f"{step}.{reason}.{time.time_ns()}"
    if jax.process_index() == 0:
      from jaxrec.offload import snapshots  # pylint: disable=import-outside-toplevel
      dest.parent.mkdir(parents=True, exist_ok=True)
      self.step_dir(step).rename(dest)
      logging.warning("moved checkpoint %s to %s (%s)", self.step_dir(step), dest.parent,
                      steps_lib.rejected_note(dest.parent))   # they add up over rollbacks
      beside = str(offloaded_lib.snapshots_beside(self.directory))
      if snapshots.set_aside(beside, [dest.name]):
        logging.warning("moved its offload snapshot to %s",
                        os.path.join(beside, snapshots.REJECTED))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxrec_checkpoint_reject_{step}")
    self._mgr.reload()
