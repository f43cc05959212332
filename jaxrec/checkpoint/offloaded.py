"""Offloaded tables in checkpoints, and tables that changed tier since the save.

A table offloaded by the run that saved a checkpoint (`jaxrec.offload`) is stored there as
its device cache; its whole arrays are in the offload snapshot of the same step
(`W/offload_snapshots/<step>`, named in the checkpoint's `meta["offload"]`). A run may
restore with a table moved between device and host:

- offloaded then, on the device now: the whole arrays are read from the snapshot
  (`snapshot_arrays`, given to `tables.read_state` as `sources`);
- on the device then (or an imported tables-only checkpoint), offloaded now: the
  checkpoint's whole arrays are checked against their saved fingerprints while the
  checkpoint is restored (`check_stored`: a mismatch makes the step unreadable, so the
  restore falls back), then copied into the new run's tensorstore store
  (`StoredTable.copy_to`).

A table offloaded now is never read into the device state (its cache starts empty), so
its cache size may change between runs; the checkpoint's arrays of it are still checked
(`check_stored`: fingerprints, and NaN/inf for a rollback).

Both work on any device count and plan, like every restore.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterable, Mapping

import numpy as np
import tensorstore as ts
from absl import logging
from etils import epath

from jaxrec import signals, workdir_layout
from jaxrec.checkpoint import storage
from jaxrec.checkpoint import tables as tables_lib
from jaxrec.embedding import optimizers as optimizers_lib
from jaxrec.errors import CheckpointError, ConfigError, in_order

STORE_OPT = "opt."   # a store's arrays: `offload.store.TABLE` and `opt.<name>`
REJECTED = "rejected"   # `manager.REJECTED_DIR` and `offload.snapshots.REJECTED`


def stored_name(table: str, store_name: str) -> str:
  """Checkpoint array name of a store array (`table` → `tables/<t>`, `opt.<k>` →
  `table_opt/<t>/<k>`)."""
  from jaxrec.offload.store import TABLE  # pylint: disable=import-outside-toplevel
  if store_name == TABLE:
    return tables_lib.table_name(table)
  return tables_lib.opt_name(table, store_name[len(STORE_OPT):])


def snapshots_beside(checkpoint_dir) -> epath.Path:
  """`W/offload_snapshots` of the checkpoint directory `W/checkpoints`: where the run of
  that workdir keeps its offload snapshots (`workdir_layout.snapshots_dir`)."""
  return epath.Path(checkpoint_dir).parent / workdir_layout.SNAPSHOTS_DIR


def rejected_step(step_dir) -> int | None:
  """The step of `step_dir` when it is a rejected checkpoint
  (`W/checkpoints/rejected/<step>.<reason>.<ns>`, see `CheckpointManager`), else None."""
  step_dir = epath.Path(step_dir)
  head, dot, _ = step_dir.name.partition(".")
  if step_dir.parent.name == REJECTED and dot and head.isdigit():
    return int(head)
  return None


def snapshot_of(step_dir, own_only: bool = False) -> tuple[str, dict] | None:
  """`(snapshot path, {table: info})` when checkpoint `step_dir` has offloaded tables
  (their full values are in the offload snapshot of its step), else None. The snapshot is
  looked for in `../offload_snapshots` beside the checkpoint directory (the one the run's
  offload tier restores from, also in a copied workdir), then (conversion: not `own_only`)
  in the one recorded at save time; a rejected checkpoint's is under their `rejected/`, by
  the same name. Raises `CheckpointError` when neither has it; with `own_only` (a
  training restore), `ConfigError` naming both when only the recorded one has it: another
  workdir's (this one copied without its snapshots), which its run may replace or prune."""
  from jaxrec.offload import snapshots  # pylint: disable=import-outside-toplevel
  step_dir = epath.Path(step_dir)
  info = storage.read_json(step_dir, storage.META).get("offload")
  if not info or not info.get("tables"):
    return None
  checkpoints, key, label = step_dir.parent, step_dir.name, f"of step {step_dir.name}"
  if rejected_step(step_dir) is not None:
    checkpoints, key = checkpoints.parent, f"{REJECTED}/{key}"
    label = f"'{key}'"
  beside = str(snapshots_beside(checkpoints))
  candidates = list(dict.fromkeys(filter(None, [beside, info.get("snapshots")])))
  for directory in candidates:
    path = os.path.join(directory, key)
    if os.path.exists(os.path.join(path, snapshots.META)):
      if own_only and directory != beside:
        raise ConfigError(
            f"{beside} has no offload snapshot {label}; the one in {directory} is another "
            f"workdir's (where checkpoint {step_dir} was saved: is this workdir a copy made "
            f"without its {workdir_layout.SNAPSHOTS_DIR}?), which that run may replace or "
            f"prune, so it is not read: copy {path} to {os.path.join(beside, key)} (cp -r of "
            "the whole workdir keeps it), or start afresh in an empty workdir")
      if directory != beside:   # conversion of a checkpoint directory copied alone
        _warn_elsewhere(path, str(step_dir), beside)
      return path, info["tables"]
  raise CheckpointError(f"checkpoint {step_dir} has offloaded tables {in_order(info['tables'])} "
                        f"but no offload snapshot {label} (looked in {', '.join(candidates)})")


@functools.lru_cache(maxsize=None)   # once per snapshot (a conversion looks several times)
def _warn_elsewhere(path: str, step_dir: str, beside: str) -> None:
  logging.warning("offload snapshot %s: read from where checkpoint %s was saved (%s has "
                  "none)", path, step_dir, beside)


def snapshot_arrays(step_dir, tables: Iterable[str] | None = None,
                    full_check: bool = True, own_only: bool = False
                    ) -> dict[str, ts.TensorStore]:
  """`{checkpoint array name: tensorstore}` of the offloaded tables' whole arrays in the
  snapshot of checkpoint `step_dir` (only `tables` when given; none offloaded: {}), after
  checking their files (`snapshots.open_table`; CRC32s too with `full_check`). `own_only`:
  see `snapshot_of`."""
  tables = None if tables is None else list(tables)
  if tables == []:
    return {}
  found = snapshot_of(step_dir, own_only)
  if found is None:
    return {}
  from jaxrec.offload import snapshots  # pylint: disable=import-outside-toplevel
  path, offloaded = found
  out = {}
  for table in sorted(offloaded if tables is None else tables):
    for name, array in snapshots.open_table(path, table, full_check).items():
      out[stored_name(table, name)] = array
  return out


def with_sources(index: Mapping, sources: Mapping[str, ts.TensorStore]) -> dict:
  """`index` (`tables.read_index`) with the arrays of the tables in `sources` replaced by
  the shapes and dtypes of `sources`."""
  tables = {n.split("/")[1] for n in sources}
  arrays = {n: a for n, a in index["arrays"].items() if n.split("/")[1] not in tables}
  for name, array in sources.items():
    arrays[name] = {"shape": list(array.shape), "dtype": array.dtype.numpy_dtype.name}
  return dict(index, arrays=arrays)


def check_stored(tables_dir, names: Iterable[str], saved: Mapping[str, int]) -> bool:
  """Reads the stored arrays `names` of the `embeddings` item `tables_dir` block by block;
  raises ValueError when one differs from its saved fingerprint (`saved`). Returns whether
  every value is finite. A large array's read is a logged phase, as `storage.check_step`'s."""
  nonfinite, context = [], tables_lib.read_context()
  for name in names:
    array = tables_lib.open_stored(tables_dir, name, context)
    what = f"checkpoint {epath.Path(tables_dir).parent}: checking '{name}'"
    total = storage.array_fingerprint(
        array, lambda block: nonfinite.append(not np.isfinite(block).all()),
        blocks=storage.logged_blocks(array, what))
    if total != saved[name]:
      raise ValueError(f"'{name}' in {tables_dir} fails its fingerprint check: the stored "
                       "data differ from what was saved")
  return not any(nonfinite)


def all_finite(arrays: Mapping[str, ts.TensorStore], where: str) -> bool:
  """Whether every value of the snapshot `arrays` is finite, read block by block: a NaN
  rollback checked only the device caches of tables offloaded then and now, so a row that
  went non-finite and was evicted before the save was restored as it was. Each large
  array's read is a logged phase (`storage.logged_blocks`) named for `where` (e.g.
  `checkpoint W/checkpoints/8`), so a long check says what it reads and how far it got."""
  for name, array in arrays.items():
    what = f"{where}: checking '{name}' (offload snapshot) for NaN/inf"
    for _, block in storage.logged_blocks(array, what):
      signals.check()
      if not np.isfinite(block).all():
        return False
  return True


@dataclasses.dataclass(frozen=True)
class StoredTable:
  """A table a checkpoint holds whole, for a run that offloads it.

  Attributes:
    name: the table.
    where: the checkpoint's step directory (for messages).
    arrays: `{store array name: tensorstore}` (`table`, `opt.<name>`; no optimizer state
      when the checkpoint has none), checked by `check_stored` during the restore.
  """

  name: str
  where: str
  arrays: Mapping[str, Any]

  def copy_to(self, store) -> None:
    """Writes the arrays into `store` (an `offload.store.TableStore` just created; its
    other arrays keep their initial values), block by block, widening as configured."""
    for name, array in self.arrays.items():
      for start, block in storage.row_blocks(array):
        signals.check()   # Ctrl-C: between blocks (the next run writes the store afresh)
        store.write_block(name, start, block)


def host_tables(tables_dir, index: Mapping, snapshot: Mapping, now: Mapping, then: Mapping,
                optimizer, fresh: Iterable[str], where: str) -> dict[str, StoredTable]:
  """`Restored.host_tables`: the tables offloaded now that the checkpoint holds whole
  (`stored_tables`), and those offloaded then too whose snapshot arrays their store cannot
  take as they are (`from_snapshot`). `optimizer`: the sparse optimizer, or one per table;
  `fresh`: the tables whose optimizer state starts fresh (`compatible.check_compatible`)."""
  fresh = tuple(fresh)
  host = stored_tables(tables_dir, index, sorted(set(now) - set(then)), fresh, where)
  host.update(from_snapshot(snapshot, {n: now[n] for n in now if n in then}, optimizer,
                            fresh, where))
  return host


def from_snapshot(snapshot: Mapping[str, ts.TensorStore], specs: Mapping[str, Any],
                  optimizer, fresh: Iterable[str], where: str) -> dict[str, StoredTable]:
  """`{table: StoredTable}` of the offloaded tables (`specs`) whose arrays in `snapshot`
  (`snapshot_arrays`) differ from what their store holds: a narrower dtype (bfloat16 saved,
  float32 now: written widened) or no optimizer state (a table in `fresh`, e.g. SGD then,
  Adagrad now: it starts fresh, as on the device). The others are linked from the
  snapshot as they are. `optimizer`: the sparse optimizer, or one per table."""
  from jaxrec.offload.store import TABLE  # pylint: disable=import-outside-toplevel
  out = {}
  for table, spec in specs.items():
    layout = optimizers_lib.of(optimizer, table).state_layout()
    want = {TABLE: spec.dtype, **{STORE_OPT + k: "float32" for k in layout}}
    have = {k: snapshot[stored_name(table, k)] for k in want
            if stored_name(table, k) in snapshot and (k == TABLE or table not in fresh)}
    if set(have) != set(want) or any(a.dtype.numpy_dtype.name != want[k]
                                     for k, a in have.items()):
      out[table] = StoredTable(table, f"the offload snapshot of {where}", have)
  return out


def stored_tables(tables_dir, index: Mapping, tables: Iterable[str], fresh: Iterable[str],
                  where: str) -> dict[str, StoredTable]:
  """`{table: StoredTable}` of `tables` in the checkpoint's `embeddings` item `tables_dir`
  (its `index`, `tables.read_index`), with their optimizer state unless in `fresh`."""
  from jaxrec.offload.store import TABLE  # pylint: disable=import-outside-toplevel
  out = {}
  for table in tables:
    names = {TABLE: tables_lib.table_name(table)}
    if table not in fresh:
      prefix = tables_lib.opt_name(table, "")
      names.update({STORE_OPT + n[len(prefix):]: n for n in index["arrays"]
                    if n.startswith(prefix)})
    out[table] = StoredTable(table, where, {
        k: tables_lib.open_restorable(tables_dir, n, index["arrays"]) for k, n in names.items()})
  return out
